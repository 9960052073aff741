import time, torch, draftwise
from draftwise.models.transformer import prefill
torch.set_num_threads(2)
eng = draftwise.load("qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct", progress=False)
# draft step time, full head vs subset head (0.5B)
net = eng.draft_model
sub = eng.vocab_subset(32768)
head_sub = net.lm_head.rows(sub.ids)
cache = net.new_cache(1024)
ids = eng.encode("def quicksort(xs):\n    ", chat=False)
with torch.inference_mode():
    prefill(net, cache, torch.tensor(ids))
    for name, head in (("full", net.lm_head), ("subset32k", head_sub), ("full", net.lm_head), ("subset32k", head_sub)):
        ts = []
        for r in range(12):
            t0 = time.perf_counter()
            out = net.forward(torch.tensor([5]), torch.tensor([cache.length]), cache, compute_logits=False)
            head(out.hidden[-1:])
            ts.append(time.perf_counter() - t0)
        ts.sort(); print(f"draft step 0.5B {name}: median {ts[len(ts)//2]*1e3:.1f} ms", flush=True)
    ts=[]
    for r in range(9):
        t0 = time.perf_counter(); head_sub(out.hidden[-1:]); ts.append(time.perf_counter()-t0)
    ts.sort(); print(f"subset head alone {ts[4]*1e3:.1f} ms", flush=True)
    ts=[]
    for r in range(9):
        t0 = time.perf_counter(); net.lm_head(out.hidden[-1:]); ts.append(time.perf_counter()-t0)
    ts.sort(); print(f"full head alone {ts[4]*1e3:.1f} ms", flush=True)
prompts = ["Write a Python function that checks whether a number is prime.",
           "Explain the difference between a list and a tuple in Python."]
for p in prompts:
    ar = eng.generate(p, chat=True, method="ar", max_new_tokens=64)
    for opts in ({"k": 3, "vocab_subset": 0}, {"k": 3}, {"k": 5}):
        r = eng.generate(p, chat=True, method="draft", max_new_tokens=64, method_opts=opts)
        print(opts, f"same={r.token_ids == ar.token_ids} tau={r.stats.tau:.2f} tok/s={r.stats.tokens_per_s:.2f} ar={ar.stats.tokens_per_s:.2f} x{r.stats.tokens_per_s/ar.stats.tokens_per_s:.2f} draft_s={r.stats.draft_s:.1f} verify_s={r.stats.verify_s:.1f}", flush=True)

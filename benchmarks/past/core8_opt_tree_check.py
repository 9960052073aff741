import torch, draftwise, json
torch.set_num_threads(2)
eng = draftwise.load("qwen2.5-coder-1.5b-instruct", draft="qwen2.5-coder-0.5b-instruct", progress=False)
eng.cost_curve(); eng.vocab_subset(32768)
prompts = ["Write a Python function that checks whether a number is prime.",
           "Explain the difference between a list and a tuple in Python.",
           "Write a function that merges two sorted lists into one sorted list."]
configs = [("ar", None), ("draft", {"k": 5}), ("opt-tree", {}), ("opt-tree", {"delta": 0.6})]
for m, o in configs:
    eng.generate("def f(x):", method=m, method_opts=o, max_new_tokens=8)    # warm-up
tot = {}
for p in prompts:
    ref = None
    for m, o in configs:
        r = eng.generate(p, chat=True, method=m, method_opts=o, max_new_tokens=96)
        if ref is None: ref = r
        key = f"{m} {json.dumps(o) if o else ''}"
        tot.setdefault(key, []).append((r.stats.tokens_per_s / ref.stats.tokens_per_s, r.stats.tau, r.token_ids == ref.token_ids, r.stats.as_dict()["mean_tree_size"]))
        print(p[:30], key, f"tok/s {r.stats.tokens_per_s:.2f} x{r.stats.tokens_per_s/ref.stats.tokens_per_s:.2f} tau {r.stats.tau:.2f} tree {r.stats.as_dict()['mean_tree_size']:.1f} same {r.token_ids == ref.token_ids} draft_s {r.stats.draft_s:.1f} verify_s {r.stats.verify_s:.1f}", flush=True)
print("== mean over prompts")
for k, v in tot.items():
    print(f"{k:28s} x{sum(a for a,*_ in v)/len(v):.2f} tau {sum(b for _,b,*_ in v)/len(v):.2f} same {sum(c for _,_,c,_ in v)}/{len(v)} tree {sum(d for *_,d in v)/len(v):.1f}")

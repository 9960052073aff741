import ctypes, time, torch, draftwise
from draftwise import kernels
from draftwise.models.transformer import Transformer, prefill
torch.set_num_threads(2)
eng = draftwise.load("qwen2.5-coder-0.5b-instruct", progress=False)
m = eng.model
slow = Transformer.from_pretrained(eng.path, fast=False)           # torch GEMM (F.linear, MKL)
new_lib = kernels.library()
old_lib = ctypes.CDLL("/tmp/old.so"); old_lib.dw_linear.argtypes = new_lib.dw_linear.argtypes
text = open(draftwise.__file__.replace("__init__.py", "decoding.py")).read() * 3
def ttft(model, n, reps=3):
    ids = eng.tokenizer.encode(text)[:n]
    ts = []
    for _ in range(reps):
        c = model.new_cache(n + 8)
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = prefill(model, c, torch.tensor(ids))
        ts.append(time.perf_counter() - t0)
    return min(ts), out.logits
for n in (512, 1000):
    kernels._lib = old_lib; t_old, l_old = ttft(m, n)
    kernels._lib = new_lib; t_new, l_new = ttft(m, n)
    t_torch, l_t = ttft(slow, n)
    print(f"prefill {n} tokens (incl. last-row LM head): old kernel {t_old:.2f} s ({n/t_old:.0f} tok/s), "
          f"new kernel {t_new:.2f} s ({n/t_new:.0f} tok/s), torch GEMM {t_torch:.2f} s ({n/t_torch:.0f} tok/s); "
          f"new/torch {t_new/t_torch:.2f}; max|dlogits| new-old {float((l_new-l_old).abs().max()):.2e}", flush=True)
# cost curve, old vs new kernel
from draftwise.policies.budget import measure
for name, lib in (("old", old_lib), ("new", new_lib)):
    kernels._lib = lib
    c = measure(m, ns=(1, 2, 4, 8, 12, 16, 32, 64), reps=5)
    print(name, "t(n) ms:", " ".join(f"{n}:{t:.0f}" for n, t in zip(c.ns, c.ms)), flush=True)

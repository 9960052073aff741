"""Server numbers for the closing note: time to first token and tokens/s of one streaming request
per method, and 8 concurrent (queued) requests against 8 sequential ones.

    python benchmarks/server_bench.py [--model qwen2.5-coder-0.5b-instruct] [--out FILE.json]
"""
import argparse
import json
import socket
import threading
import time

import httpx
import uvicorn

import draftwise
from draftwise.server import create_app


def stream(url, prompt, method, max_tokens):
    body = {"messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens, "stream": True,
            "stream_options": {"include_usage": True}, "draftwise": {"method": method}}
    t0 = time.perf_counter()
    first, n, tau = None, 0, None
    with httpx.Client(timeout=600) as h, h.stream("POST", url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            d = json.loads(line[6:])
            if d["choices"] and d["choices"][0]["delta"].get("content") and first is None:
                first = time.perf_counter() - t0
            if d.get("usage"):
                n = d["usage"]["completion_tokens"]
            if d.get("draftwise"):
                tau = d["draftwise"]["tau"]
    total = time.perf_counter() - t0
    return {"ttft_s": first, "total_s": total, "tokens": n, "tokens_per_s": n / total, "tau": tau}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--methods", default="ar,recycling,lookup")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    eng = draftwise.load(a.model, progress=False)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    srv = uvicorn.Server(uvicorn.Config(create_app(eng, method="ar"), host="127.0.0.1", port=port, log_level="warning"))
    threading.Thread(target=srv.run, daemon=True).start()
    while not srv.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}"
    prompt = "Write a Python function that checks whether a number is prime."
    out = {"model": a.model, "max_tokens": a.max_tokens, "per_method": {}}
    for m in a.methods.split(","):
        stream(url, "Hi", m, 4)                                    # warm-up (drafter built, curves loaded)
        out["per_method"][m] = stream(url, prompt, m, a.max_tokens)
        print(m, out["per_method"][m], flush=True)
    prompts = [f"Write a Python function number {i} that adds {i} to its argument." for i in range(8)]
    t0 = time.perf_counter()
    seq = [stream(url, p, "ar", 64) for p in prompts]
    out["sequential_8_s"] = time.perf_counter() - t0
    res = [None] * 8
    t0 = time.perf_counter()
    ths = [threading.Thread(target=lambda i=i: res.__setitem__(i, stream(url, prompts[i], "ar", 64))) for i in range(8)]
    for t in ths:
        t.start()
    for t in ths:
        t.join()
    out["concurrent_8_s"] = time.perf_counter() - t0
    out["concurrent_ttft_s"] = [r["ttft_s"] for r in res]
    out["sequential_tokens"], out["concurrent_tokens"] = [r["tokens"] for r in seq], [r["tokens"] for r in res]
    print(json.dumps(out, indent=1))
    if a.out:
        with open(a.out, "w") as fh:
            json.dump(out, fh, indent=1)
    srv.should_exit = True


if __name__ == "__main__":
    main()

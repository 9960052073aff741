"""Before/after numbers of issue 25's items 3-5, against `draftwise serve` started from a checkout.

    python benchmarks/server_hardening.py [--repo PATH] [--model qwen2.5-coder-0.5b-instruct] --out FILE.json

--repo: the checkout whose server runs (default: this one); run it once on the old commit (a
`git worktree`) and once on this one. Measures: the server's RSS after one request with an
out-of-range option and after 40 distinct option sets (item 3); /health latency while a 20 MB and a
7 MB body are posted (item 4); tokens generated after a non-streaming client hangs up, the answer
time of a ~4,000-token prompt under --timeout 2, and the tokens/s reported for a deadline-cut answer
(item 5).
"""
import argparse
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import psutil


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def post(url, body, timeout=300, path="/v1/chat/completions"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    t0 = time.monotonic()
    try:
        r = httpx.post(url + path, content=data, timeout=timeout, headers={"Content-Type": "application/json"})
        return r.status_code, r.text, time.monotonic() - t0
    except httpx.HTTPError as e:
        return type(e).__name__, "", time.monotonic() - t0


def generated(url) -> float:
    total = 0.0
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        if line.startswith("draftwise_generated_tokens_total{"):
            total += float(line.split()[-1])
    return total


def health_during(url, body) -> dict:
    worst, res = [0.0], {}

    def send():
        res["status"], _, res["post_s"] = post(url, body)

    th = threading.Thread(target=send)
    th.start()
    while th.is_alive():
        t0 = time.monotonic()
        httpx.get(url + "/health", timeout=120)
        worst[0] = max(worst[0], time.monotonic() - t0)
        time.sleep(0.05)
    return {**res, "worst_health_s": round(worst[0], 3), "post_s": round(res["post_s"], 2)}


def msg(text, **kw):
    return {"messages": [{"role": "user", "content": text}], **kw}


def start(repo: Path, model: str, timeout: float):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(repo)}
    p = subprocess.Popen([sys.executable, "-m", "draftwise.cli", "serve", "--model", model, "--port", str(port),
                          "--timeout", str(timeout)], cwd=repo, env=env, stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return p, url
        except httpx.HTTPError:
            time.sleep(0.25)
    p.kill()
    raise SystemExit("the server did not start")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repo", default=str(Path(__file__).resolve().parents[1]))
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    repo = Path(a.repo)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=repo, capture_output=True,
                            text=True).stdout.strip()
    out = {"repo": str(repo), "commit": commit, "model": a.model}

    p, url = start(repo, a.model, 600)
    try:
        post(url, msg("Hi", max_tokens=4))
        out["rss_start_mb"] = round(rss_mb(p.pid))
        st, text, s = post(url, msg("Hi", max_tokens=8, draftwise={"method": "eagle", "method_opts": {
            "head": "untrained", "max_depth": 1_000_000}}), timeout=600)
        out["item3_kmax_1e6"] = {"status": st, "s": round(s, 2), "rss_after_mb": round(rss_mb(p.pid))}
        base = rss_mb(p.pid)
        for i in range(40):
            post(url, msg("Hi", max_tokens=2, draftwise={"method": "recycling",
                                                          "method_opts": {"decay": 0.5 + i / 100}}))
        out["item3_40_option_sets"] = {"rss_growth_mb": round(rss_mb(p.pid) - base)}
        out["item4_20MB_body"] = health_during(url, json.dumps(msg("word " * 4_000_000, max_tokens=4)).encode())
        out["item4_7MB_body"] = health_during(url, json.dumps(msg("word " * 1_400_000, max_tokens=4)).encode())
        before = generated(url)
        st, _, s = post(url, msg("Tell me a very long story about a dragon.", max_tokens=400), timeout=1.0)
        time.sleep(20)
        out["item5_hangup_after_1s"] = {"client": st, "tokens_generated": generated(url) - before}
    finally:
        p.terminate()
        p.wait(60)
    p, url = start(repo, a.model, 2)
    try:
        post(url, msg("Hi", max_tokens=2))
        words = "alpha beta gamma delta " * 1000
        st, text, s = post(url, {"prompt": words, "max_tokens": 4}, path="/v1/completions")
        out["item5_4000_token_prompt_timeout_2s"] = {"status": st, "answer_s": round(s, 2), "body": text[:200]}
        st, text, s = post(url, {"prompt": ", ".join(map(str, range(1, 40))) + ",", "max_tokens": 3000},
                           path="/v1/completions")
        d = json.loads(text) if st == 200 else {}
        out["item5_deadline_cut"] = {"status": st, "answer_s": round(s, 2), "draftwise": d.get("draftwise"),
                                     "completion_tokens": d.get("usage", {}).get("completion_tokens")}
    finally:
        p.terminate()
        p.wait(60)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=1))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()

"""The OpenAI-compatible server, live on a free 127.0.0.1 port, called with the real `openai`
client (SmolLM2-135M), and the interactive chat command driven through stdin."""
import json
import socket
import subprocess
import sys
import threading
import time

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

MODEL = "smollm2-135m-instruct"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    import uvicorn

    import draftwise
    from draftwise.server import create_app

    eng = draftwise.load(MODEL, progress=False)
    port = _free_port()
    app = create_app(eng, method="lookup", max_queue=32, timeout_s=120)
    srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    for _ in range(200):
        if srv.started:
            break
        time.sleep(0.05)
    assert srv.started
    yield eng, f"http://127.0.0.1:{port}", app
    srv.should_exit = True
    t.join(timeout=10)


def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)


def chat(c, text, **kw):
    return c.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": text}], **kw)


def stream_text(c, text, **kw):
    parts, last = [], None
    for ch in chat(c, text, stream=True, **kw):
        if ch.choices:
            parts.append(ch.choices[0].delta.content or "")
            last = ch.choices[0].finish_reason or last
    return "".join(parts), last


def test_chat_and_completion_equal_the_engine(server):
    eng, url, _ = server
    c = client(url)
    r = chat(c, "Name three colors.", max_tokens=20)
    ref = eng.generate("Name three colors.", chat=True, method="lookup", max_new_tokens=20)
    assert r.choices[0].message.content == ref.text and r.choices[0].message.role == "assistant"
    assert r.usage.completion_tokens == len(ref.token_ids) and r.usage.prompt_tokens > 5
    ext = r.model_extra["draftwise"]
    assert ext["method"] == "lookup" and ext["tau"] >= 1.0
    text, fin = stream_text(c, "Name three colors.", max_tokens=20)
    assert text == ref.text and fin in ("length", "stop")
    comp = c.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16,
                                extra_body={"draftwise": {"method": "recycling"}})
    ref2 = eng.generate("def fibonacci(n):", method="recycling", max_new_tokens=16)
    assert comp.choices[0].text == ref2.text and comp.model_extra["draftwise"]["method"] == "recycling"
    pieces = [ch.choices[0].text for ch in c.completions.create(model=MODEL, prompt="def fibonacci(n):", max_tokens=16,
                                                                  stream=True) if ch.choices]
    assert "".join(pieces) == ref2.text


def test_stop_strings_and_seeded_sampling(server):
    eng, url, _ = server
    c = client(url)
    full = chat(c, "Count from 1 to 10, separated by commas.", max_tokens=40).choices[0].message.content
    assert "5" in full
    cut = chat(c, "Count from 1 to 10, separated by commas.", max_tokens=40, stop=["5"])
    assert cut.choices[0].message.content == full[: full.index("5")] and cut.choices[0].finish_reason == "stop"
    # plain decoding: a seed fixes the text (a drafter that adapts its trees draws differently, exactly
    # from the same distribution)
    ar = {"draftwise": {"method": "ar"}}
    a = chat(c, "Write a word.", max_tokens=12, temperature=1.0, seed=7, extra_body=ar).choices[0].message.content
    b = chat(c, "Write a word.", max_tokens=12, temperature=1.0, seed=7, extra_body=ar).choices[0].message.content
    assert a == b


def test_sixteen_concurrent_streams_get_their_own_answers(server):
    _, url, _ = server
    c = client(url)
    prompts = [f"Say the number {i} in words." for i in range(16)]
    single = {p: chat(c, p, max_tokens=12).choices[0].message.content for p in prompts}
    got, errors = {}, []

    def run(p):
        try:
            got[p] = stream_text(client(url), p, max_tokens=12)[0]
        except Exception as e:  # noqa: BLE001 - collected and asserted below
            errors.append(repr(e))

    threads = [threading.Thread(target=run, args=(p,)) for p in prompts]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors and got == single


def test_disconnect_frees_the_engine(server):
    _, url, app = server
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story."}],
            "max_tokens": 3000, "stream": True}
    with httpx.Client(timeout=60) as h:
        with h.stream("POST", url + "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            for line in r.iter_lines():
                if line.startswith("data: ") and '"content"' in line:
                    break                       # one piece arrived: hang up
    t0 = time.monotonic()
    r = chat(client(url), "Hi", max_tokens=4)
    assert r.choices[0].message.content and time.monotonic() - t0 < 30   # 3,000 tokens would take minutes
    worker = app.state.worker
    for _ in range(100):
        if not worker.busy and worker.waiting == 0:
            break
        time.sleep(0.05)
    assert not worker.busy and worker.waiting == 0


@pytest.mark.parametrize("body,needle", [
    (b"{not json", "not valid JSON"),
    ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, "unknown model"),
    ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n = 1"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": -3}, "max_tokens"),
    ({"messages": [{"role": "user", "content": "x"}], "draftwise": {"method": "nope"}}, "unknown method"),
    ({"messages": [{"role": "user", "content": "x"}], "draftwise": {"method": "draft-model"}}, "draft model"),
    ({"messages": [{"role": "user", "content": "x"}], "logprobs": True}, "logprobs"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "role"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": -1}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "draftwise": {"method": "lookup", "method_opts": {"zz": 1}}},
     "unknown option"),
])
def test_bad_requests_are_400_and_the_server_stays_up(server, body, needle):
    _, url, _ = server
    with httpx.Client(timeout=60) as h:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        r = h.post(url + "/v1/chat/completions", content=data, headers={"Content-Type": "application/json"})
        assert r.status_code == 400
        err = r.json()["error"]
        assert needle in err["message"] and err["type"] == "invalid_request_error"
        assert h.get(url + "/health").json()["status"] == "ok"
    with pytest.raises(openai.BadRequestError):
        client(url).chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], n=3)


def test_models_health_and_metrics(server):
    _, url, _ = server
    with httpx.Client(timeout=30) as h:
        assert [m["id"] for m in h.get(url + "/v1/models").json()["data"]] == [MODEL]
        chat(client(url), "Hi", max_tokens=3)
        text = h.get(url + "/metrics").text
    for name in ("draftwise_requests_total", "draftwise_queue_depth", "draftwise_generated_tokens_total",
                 "draftwise_tokens_per_second", "draftwise_tau"):
        assert name in text
    assert 'method="lookup"' in text


def test_full_queue_answers_503():
    import asyncio

    from draftwise.server import Job, RequestError, Worker

    class Slow:
        def stream(self, *a, **k):
            time.sleep(0.5)
            yield "x"

    class M:
        class _G:
            def set(self, v):
                pass
        queue = _G()

        def record(self, *a):
            pass

    w = Worker(Slow(), max_queue=1, metrics=M())
    loop = asyncio.new_event_loop()
    job = lambda: Job([1], "ar", None, 4, 0.0, 1.0, None, None, time.monotonic() + 9, loop)  # noqa: E731
    w.submit(job())
    time.sleep(0.1)                                  # the first is running, the queue is empty again
    w.submit(job())
    with pytest.raises(RequestError) as e:
        w.submit(job())
    assert e.value.status == 503 and e.value.headers["Retry-After"]


def test_chat_command_two_turns_and_reset():
    script = "Say hello.\nSay it again.\n/stats\n/reset\n/method recycling\nSay bye.\n/quit\n"
    p = subprocess.run([sys.executable, "-m", "draftwise.cli", "chat", "--model", MODEL, "--max-new-tokens", "8"],
                       input=script, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stdout.count("\n") >= 3 and p.stdout.strip()            # three streamed answers
    assert "tok/s" in p.stderr and "conversation cleared" in p.stderr and "method recycling" in p.stderr

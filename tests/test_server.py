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


class Live:
    """An app served by uvicorn on a free 127.0.0.1 port in this process."""

    def __init__(self, app):
        import uvicorn

        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.srv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning"))
        self.t = threading.Thread(target=self.srv.run, daemon=True)
        self.t.start()
        for _ in range(200):
            if self.srv.started:
                break
            time.sleep(0.05)
        assert self.srv.started

    def stop(self):
        self.srv.should_exit = True
        self.t.join(timeout=10)


@pytest.fixture(scope="module")
def engine():
    import draftwise

    return draftwise.load(MODEL, progress=False)


@pytest.fixture(scope="module")
def server(engine):
    from draftwise.server import create_app

    app = create_app(engine, method="lookup", max_queue=32, timeout_s=120)
    live = Live(app)
    yield engine, live.url, app
    live.stop()


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


# ---------------------------------------------------------------- hardening: limits, deadlines, auth, files
def _post(url, body, headers=None, path="/v1/chat/completions", timeout=60):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return httpx.post(url + path, content=data, timeout=timeout,
                      headers={"Content-Type": "application/json", **(headers or {})})


def _msg(text="Hi", **kw):
    return {"messages": [{"role": "user", "content": text}], "max_tokens": 4, **kw}


def _ext(method, **opts):
    return _msg(draftwise={"method": method, "method_opts": opts})


NESTED = b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


@pytest.mark.parametrize("body,needle", [
    (NESTED, "nested too deeply"),
    ({**_msg(), "draftwise": {"method": "lookup", "method_opts": [1, 2]}}, "method_opts' must be an object"),
    ('{"messages": [{"role": "user", "content": "bad \\ud800 text"}]}'.encode(), "not valid Unicode"),
    (_msg(seed=2**70), "seed"),
    (_msg(temperature=1e-320), "temperature"),
    (_msg(stream="false"), "'stream' must be true or false"),
    (_msg(n=True), "n = 1"),
    (_msg(response_format={"type": "json_object"}), "response_format"),
    (_msg(stream_options=[1]), "stream_options"),
    (_ext("recycling", k=9), "'k' must be in [1, 8]"),
    (_ext("lookup", min_ngram=5), "min_ngram <= max_ngram"),
    (_ext("eagle", head="untrained", max_depth=1_000_000), "max_depth"),
    (_ext("eagle", head="untrained", max_depth=0), "max_depth"),
    (_ext("eagle", head="untrained", tree="bogus"), "tree"),
    (_ext("early-exit", layer=999), "layer"),                       # refused when the drafter is built
    ({**_ext("early-exit", layer=999), "stream": True}, "layer"),   # ... and before a stream starts: a 400
    (_ext("retrieval", datastore="/nonexistent/x.dwds"), "opens only the files"),
    (_ext("eagle", head="/etc/passwd"), "opens only the files"),
])
def test_client_errors_are_400_in_openai_format(server, body, needle):
    _, url, _ = server
    r = _post(url, body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert needle in err["message"] and err["type"] == "invalid_request_error", err
    assert httpx.get(url + "/health", timeout=10).json()["status"] == "ok"


def test_text_content_parts_are_accepted(server):
    _, url, _ = server
    parts = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Say hi."}]}], "max_tokens": 6}
    plain = {"messages": [{"role": "user", "content": "Say hi."}], "max_tokens": 6}
    a, b = _post(url, parts), _post(url, plain)
    assert a.status_code == b.status_code == 200
    assert a.json()["choices"][0]["message"]["content"] == b.json()["choices"][0]["message"]["content"]


def test_a_path_refusal_does_not_reveal_whether_the_file_exists(server):
    _, url, _ = server
    msgs = [_post(url, _ext("retrieval", datastore=p)).json()["error"]["message"]
            for p in ("/etc/passwd", "/nonexistent/none.dwds")]
    assert msgs[0] == msgs[1]


def test_large_body_does_not_block_the_event_loop(server):
    _, url, _ = server
    body = json.dumps(_msg("word " * 1_400_000)).encode()          # ~7 MB: parsed and tokenized off the loop
    done, worst = {}, [0.0]

    def send():
        t0 = time.monotonic()
        done["status"] = _post(url, body, timeout=300).status_code
        done["s"] = time.monotonic() - t0

    th = threading.Thread(target=send)
    th.start()
    while th.is_alive():
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=60).status_code == 200
        worst[0] = max(worst[0], time.monotonic() - t0)
        time.sleep(0.05)
    th.join()
    assert done["status"] == 400                                    # longer than the context
    assert worst[0] < done["s"]                                     # /health answered while the body was parsed


def test_body_size_limit_is_413(engine):
    from draftwise.server import create_app

    live = Live(create_app(engine, max_body=4096))
    try:
        big = json.dumps(_msg("x" * 10_000)).encode()
        r = _post(live.url, big)
        assert r.status_code == 413 and "--max-body" in r.json()["error"]["message"]

        def chunks():                                               # no Content-Length: counted while read
            for i in range(0, len(big), 1000):
                yield big[i:i + 1000]

        r = httpx.post(live.url + "/v1/chat/completions", content=chunks(), timeout=30,
                       headers={"Content-Type": "application/json"})
        assert r.status_code == 413
        r = httpx.post(live.url + "/v1/chat/completions", content=b"{}", timeout=30,
                       headers={"Content-Type": "text/plain"})
        assert r.status_code == 415
    finally:
        live.stop()


def _tokens_generated(url) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith('draftwise_generated_tokens_total{method="lookup"}'):
            return float(line.split()[-1])
    return 0.0


def test_non_streaming_client_that_hangs_up_frees_the_engine(server):
    _, url, app = server
    before = _tokens_generated(url)
    with pytest.raises(httpx.ReadTimeout):
        _post(url, {**_msg("Tell me a very long story."), "max_tokens": 3000}, timeout=1.5)
    worker = app.state.worker
    for _ in range(200):
        if not worker.busy:
            break
        time.sleep(0.05)
    assert not worker.busy
    time.sleep(0.3)
    assert _tokens_generated(url) - before < 3000                  # stopped, not run to the end


@pytest.fixture(scope="module")
def guarded(tmp_path_factory):
    """A second engine behind an API key, a 2 s deadline and an allowed directory holding a datastore."""
    import draftwise
    from draftwise import datastore
    from draftwise.server import create_app

    eng = draftwise.load(MODEL, progress=False)
    allowed = tmp_path_factory.mktemp("allowed")
    (allowed / "docs.txt").write_text("def add(a, b):\n    return a + b\n" * 50)
    datastore.build(eng.tokenizer, [str(allowed / "docs.txt")], allowed / "code.dwds", progress=False)
    app = create_app(eng, method="ar", timeout_s=2.0, api_key="test-key-0123", allow_paths=(str(allowed),))
    live = Live(app)
    yield eng, live.url, app, allowed
    live.stop()


KEY = {"Authorization": "Bearer test-key-0123"}


def test_api_key_and_host_header(guarded):
    _, url, _, _ = guarded
    assert _post(url, _msg()).status_code == 401
    assert _post(url, _msg(), headers={"Authorization": "Bearer wrong"}).status_code == 401
    assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
    assert httpx.get(url + "/metrics", timeout=10).status_code == 401
    assert httpx.get(url + "/health", timeout=10).status_code == 200              # health stays open
    c = openai.OpenAI(base_url=url + "/v1", api_key="test-key-0123", max_retries=0, timeout=60)
    assert chat(c, "Hi", max_tokens=3).choices[0].message.content is not None
    r = httpx.get(url + "/v1/models", headers={**KEY, "Host": "attacker.example"}, timeout=10)
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_host"


def test_files_under_an_allowed_directory(guarded):
    _, url, _, allowed = guarded
    ok = _post(url, _ext("retrieval", datastore="code.dwds"), headers=KEY)
    assert ok.status_code == 200, ok.text
    assert _post(url, _ext("retrieval", datastore=str(allowed / "code.dwds")), headers=KEY).status_code == 200
    for escape in ("../code.dwds", "/etc/passwd"):
        r = _post(url, _ext("retrieval", datastore=escape), headers=KEY)
        assert r.status_code == 400 and "opens only the files" in r.json()["error"]["message"]


def test_deadline_covers_prefill(guarded):
    eng, url, _, _ = guarded
    ctx = eng.model.max_len
    words = "alpha beta gamma delta " * (ctx // 5)
    n = len(eng.encode(words))
    assert 4 * 512 < n < ctx                                        # many prefill chunks
    t0 = time.monotonic()
    r = _post(url, {"prompt": words, "max_tokens": 4}, headers=KEY, path="/v1/completions", timeout=120)
    assert r.status_code == 504 and r.json()["error"]["type"] == "timeout_error", r.text
    assert time.monotonic() - t0 < 30


def test_deadline_cut_reports_real_rates(guarded):
    _, url, _, _ = guarded
    prompt = ", ".join(str(i) for i in range(1, 40)) + ","
    r = _post(url, {"prompt": prompt, "max_tokens": 5000}, headers=KEY, path="/v1/completions", timeout=120)
    assert r.status_code == 200
    d = r.json()
    assert d["draftwise"]["stopped"] == "deadline" and d["choices"][0]["finish_reason"] == "length"
    assert d["usage"]["completion_tokens"] > 0 and d["draftwise"]["tokens_per_s"] > 0 and d["draftwise"]["tau"] > 0


def test_requests_expired_in_the_queue_are_dropped():
    import asyncio

    from draftwise.server import Job, Worker

    class Engine:
        built = []

        def drafter(self, method, opts):
            self.built.append(method)

    class M:
        class _G:
            def set(self, v):
                pass

            def inc(self, v=1):
                pass
        queue = expired = _G()

    loop = asyncio.new_event_loop()
    job = Job([1], "ar", None, 4, 0.0, 1.0, None, None, time.monotonic() - 1, loop)
    eng = Engine()
    Worker(eng, max_queue=2, metrics=M())._run(job)
    loop.run_until_complete(asyncio.sleep(0))
    kind, err = job.out.get_nowait()
    assert kind == "reject" and err.status == 504 and eng.built == []       # never started


def test_openapi_publishes_request_and_response_models(server):
    _, url, _ = server
    doc = httpx.get(url + "/openapi.json", timeout=10).json()
    chat_op = doc["paths"]["/v1/chat/completions"]["post"]
    ref = chat_op["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref.endswith("/ChatCompletionRequest")
    comps = doc["components"]["schemas"]
    assert {"ChatCompletionRequest", "CompletionRequest", "Message", "ChatCompletion", "ErrorResponse"} <= set(comps)
    assert "text/plain" in doc["paths"]["/metrics"]["get"]["responses"]["200"]["content"]
    assert "400" in chat_op["responses"] and "413" in chat_op["responses"]


def test_published_request_model_and_parser_agree(engine):
    """Bodies the schema accepts are accepted by the parser; bodies it rejects, the parser rejects."""
    import pydantic

    from draftwise.server import Policy, RequestError, parse
    from draftwise.server.schema import ChatCompletionRequest

    pol = Policy("lookup", None, engine.model.max_len)
    good = [_msg(), _msg(temperature=0.7, top_p=0.9, seed=3, stop=["\n"]), _msg(stream=True,
            stream_options={"include_usage": True}), {"messages": [{"role": "user", "content": [
                {"type": "text", "text": "a"}]}]}, _msg(response_format={"type": "text"}, n=1)]
    bad = [_msg(n=2), _msg(temperature=3), _msg(top_p=0), _msg(seed=-1), _msg(stream="false"), {"messages": []},
           _msg(response_format={"type": "json_object"}), {"messages": [{"role": "robot", "content": "x"}]}]
    for b in good:
        ChatCompletionRequest.model_validate(b)
        parse(engine, b, True, pol)
    for b in bad:
        with pytest.raises(pydantic.ValidationError):
            ChatCompletionRequest.model_validate(b, strict=True)
        with pytest.raises(RequestError):
            parse(engine, b, True, pol)


def test_drafter_cache_is_bounded(engine):
    from draftwise.api import MAX_DRAFTERS

    first = engine.drafter("recycling", {"decay": 0.5})
    assert engine.drafter("recycling", {"decay": 0.5}) is first          # kept while recently used
    for i in range(MAX_DRAFTERS + 2):
        engine.drafter("recycling", {"decay": 0.9 + i / 1000})
    assert engine.drafter("recycling", {"decay": 0.5}) is not first      # the least recently used was dropped

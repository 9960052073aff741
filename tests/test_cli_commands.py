"""Every `draftwise` subcommand run end to end (SmolLM2-135M, a few steps), a check that no subcommand
is left out, and the one-line errors of bad arguments, reported before any model loads."""
import argparse
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from draftwise import commands
from draftwise.cli import build_parser, main

SMOL = ["--model", "smollm2-135m-instruct"]

# every leaf command of the parser, and the test below that runs it end to end
COVERED = {
    "generate": "test_generate_prints_text_and_stats (test_cli.py), test_generate_with_a_draft_model",
    "bench": "test_bench_command",
    "serve": "test_serve_command_with_an_api_key",
    "chat": "test_chat_command_two_turns_and_reset (test_server.py)",
    "datastore build": "test_datastore_build_and_info",
    "datastore info": "test_datastore_build_and_info",
    "train early-exit": "test_train_commands",
    "train eagle": "test_train_commands",
    "train ldlp": "test_train_commands",
    "head export": "test_train_eagle3_export_and_generate",
    "methods": "test_methods_command",
    "models list": "test_models_list (test_cli.py)",
    "models install": "test_models_install",
    "models bench-forward": "test_models_bench_forward",
}


def _leaves(p: argparse.ArgumentParser, prefix=()) -> list[str]:
    subs = [a for a in p._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        return [" ".join(prefix)]
    return [leaf for name, sp in subs[0].choices.items() for leaf in _leaves(sp, (*prefix, name))]


def test_every_subcommand_is_run_by_a_test():
    assert sorted(_leaves(build_parser())) == sorted(COVERED)


@pytest.fixture
def no_model_load(monkeypatch):
    """Argument errors must be reported before any model loads."""
    import draftwise

    def refuse(*a, **k):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(draftwise, "load", refuse)
    monkeypatch.setattr(commands, "_load", refuse)


@pytest.mark.parametrize("argv,msg", [
    (["generate", *SMOL, "--temperature", "1e-320", "hi"], "temperature"),
    (["generate", *SMOL, "--seed", "1180591620717411303424", "hi"], "seed"),
    (["generate", *SMOL, "--device", "tpu", "hi"], "device"),
    (["generate", *SMOL, "--method", "recycling", "--method-opts", '{"k": 9}', "hi"], "'k' must be in [1, 8]"),
    (["generate", *SMOL, "--method", "lookup", "--method-opts", '{"min_ngram": 4}', "hi"], "min_ngram <= max_ngram"),
    (["generate", *SMOL, "--method", "eagle", "--method-opts", '{"head": "untrained", "max_depth": 1000000}', "hi"],
     "max_depth"),
    (["generate", *SMOL, "--method", "eagle", "--method-opts", '{"head": "untrained", "tree": "bogus"}', "hi"],
     "tree"),
    (["generate", *SMOL, "--method", "early-exit", "--method-opts", '{"length": "fixed:0"}', "hi"], "fixed:"),
    (["generate", *SMOL, "--max-new-tokens", "0", "hi"], "--max-new-tokens"),
    (["generate", *SMOL, ""], "empty prompt"),
    (["generate", *SMOL, "--threads", "0", "hi"], "--threads"),
    (["serve", *SMOL, "--port", "70000"], "--port"),
    (["serve", *SMOL, "--timeout", "0"], "--timeout"),
    (["serve", *SMOL, "--max-queue", "0"], "--max-queue"),
    (["datastore", "build", "--input", "stdlib:", "--out", "x.dwds", "--max-tokens", "0"], "--max-tokens"),
    (["bench", *SMOL, "--limit", "0"], "--limit"),
    (["train", "eagle", *SMOL, "--out", "h.safetensors", "--batch", "0"], "--batch"),
    (["train", "ldlp", *SMOL, "--head", "h", "--out", "l.safetensors", "--k-max", "0"], "--k-max"),
])
def test_bad_arguments_are_one_line_errors_before_loading(capsys, no_model_load, argv, msg):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("draftwise: error:") and len(err.strip().splitlines()) == 1 and msg in err, err


def test_port_in_use_is_reported_before_loading(capsys, no_model_load):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        assert main(["serve", *SMOL, "--port", str(port)]) == 2
    assert "cannot listen on 127.0.0.1" in capsys.readouterr().err


def test_corrupt_files_are_one_line_errors(capsys, tmp_path):
    import struct

    bad = tmp_path / "bad.gguf"                   # the magic, a version, then garbage counts
    bad.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 3) + b"\x05" + b"\x00" * 70)
    assert main(["generate", "--model", str(bad), "hi"]) == 2
    err = capsys.readouterr().err
    assert "could not read GGUF file" in err and len(err.strip().splitlines()) == 1
    from draftwise import datastore as D

    for header in ({"version": D.VERSION}, {"version": D.VERSION, "tokens": 3, "sa_dtype": "object", "separator": 0}):
        blob = json.dumps(header).encode()
        p = tmp_path / "x.dwds"
        p.write_bytes(D.MAGIC + len(blob).to_bytes(4, "little") + blob)
        assert main(["datastore", "info", str(p)]) == 2
        err = capsys.readouterr().err
        assert "corrupt header" in err and len(err.strip().splitlines()) == 1


def test_invariant_kernels_where_they_cannot_run_are_a_one_line_error(capsys, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")               # the CPU without Triton's interpreter
    assert main(["generate", *SMOL, "--dtype", "bfloat16", "--kernels", "invariant", "--max-new-tokens", "2", "hi"]) == 2
    err = capsys.readouterr().err
    assert "invariant kernels run on CUDA" in err and len(err.strip().splitlines()) == 1
    assert main(["models", "bench-forward", "smollm2-135m-instruct", "--kernels", "invariant"]) == 2
    assert "invariant kernels run on CUDA" in capsys.readouterr().err


def test_datastore_build_and_info(capsys, tmp_path):
    src = tmp_path / "docs"
    src.mkdir()
    (src / "a.py").write_text("def add(a, b):\n    return a + b\n" * 20)
    out = tmp_path / "d.dwds"
    stale = tmp_path / ".d.dwds.tmp999999999"        # a killed build's leftover (no such process)
    stale.write_bytes(b"partial")
    assert main(["datastore", "build", *SMOL, "--input", str(src), "--out", str(out), "--quiet"]) == 0
    assert out.is_file() and not stale.exists()
    assert main(["datastore", "info", str(out)]) == 0
    assert "tokens" in capsys.readouterr().out
    assert main(["datastore", "build", *SMOL, "--input", str(src), "--out", "/proc/x.dwds", "--quiet"]) == 2
    assert "could not write datastore /proc/x.dwds" in capsys.readouterr().err


def test_train_commands(capsys, tmp_path):
    data = tmp_path / "data.py"
    data.write_text(open(json.__file__).read())
    common = [*SMOL, "--data", str(data), "--max-tokens", "2048", "--max-steps", "2", "--batch", "1",
              "--vocab-subset", "0", "--quiet"]
    head, ex, ldlp = tmp_path / "head.safetensors", tmp_path / "exit.safetensors", tmp_path / "ldlp.safetensors"
    assert main(["train", "eagle", *common, "--out", str(head)]) == 0
    assert main(["train", "early-exit", *common, "--layer", "4", "--out", str(ex)]) == 0
    assert main(["train", "ldlp", *SMOL, "--head", str(head), "--out", str(ldlp), "--prompts", "2",
                 "--max-new-tokens", "12", "--max-steps", "10", "--vocab-subset", "0", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "EAGLE head" in out and "exit layer after layer 4" in out and "LDLP from" in out
    assert head.is_file() and ex.is_file() and ldlp.is_file()
    # the trained parts load and decode through the CLI
    assert main(["generate", *SMOL, "--max-new-tokens", "6", "--method", "eagle", "--method-opts",
                 json.dumps({"head": str(head), "ldlp": str(ldlp), "vocab_subset": 0}), "--compare-ar",
                 "def f(x):"]) == 0
    assert main(["generate", *SMOL, "--max-new-tokens", "6", "--method", "early-exit", "--method-opts",
                 json.dumps({"exit": str(ex), "vocab_subset": 0}), "--compare-ar", "def f(x):"]) == 0
    assert capsys.readouterr().err.count("text identical") == 2


def test_train_eagle3_export_and_generate(capsys, tmp_path):
    data = tmp_path / "data.py"
    data.write_text(open(json.__file__).read())
    head, out = tmp_path / "h3.safetensors", tmp_path / "exported"
    assert main(["train", "eagle", *SMOL, "--arch", "eagle3", "--ttt", "2", "--data", str(data), "--max-tokens", "2048",
                 "--max-steps", "2", "--batch", "1", "--vocab-subset", "4096", "--quiet", "--out", str(head)]) == 0
    assert "EAGLE-3 head" in capsys.readouterr().out
    assert main(["head", "export", *SMOL, "--head", str(head), "--out", str(out)]) == 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["LlamaForCausalLMEagle3"] and cfg["draft_vocab_size"] == 4096
    assert cfg["eagle_config"]["eagle_aux_hidden_state_layer_ids"] == [2, 15, 27]      # SmolLM2: 30 layers
    for h in (head, out):             # ours, and the exported directory read as a public head
        assert main(["generate", *SMOL, "--max-new-tokens", "6", "--method", "eagle", "--method-opts",
                     json.dumps({"head": str(h), "length": "fixed:2"}), "--compare-ar", "def f(x):"]) == 0
    assert capsys.readouterr().err.count("text identical") == 2
    assert main(["head", "export", *SMOL, "--head", str(head), "--out", str(out)]) == 2     # not empty
    assert "not an empty directory" in capsys.readouterr().err
    assert main(["head", "export", *SMOL, "--head", str(tmp_path / "nope"), "--out", str(tmp_path / "o2")]) == 2


def test_generate_with_a_draft_model(capsys, tmp_path):
    assert main(["generate", *SMOL, "--draft", "smollm2-135m-instruct", "--draft-weights", "gguf-f32",
                 "--method", "draft-model", "--method-opts", '{"tree": "chain", "vocab_subset": 0}',
                 "--max-new-tokens", "8", "--compare-ar", "1, 2, 3,"]) == 0
    assert "text identical" in capsys.readouterr().err
    from tests.test_core import edited_smol_tokenizers

    other = edited_smol_tokenizers(tmp_path)["eos"]          # another tokenizer: drafts through the shared vocabulary
    for cross in ("tli", "string"):
        assert main(["generate", *SMOL, "--draft", str(other), "--method", "draft-model", "--method-opts",
                     json.dumps({"tree": "chain", "cross": cross}), "--max-new-tokens", "8", "--compare-ar",
                     "1, 2, 3,"]) == 0
        err = capsys.readouterr().err
        assert "text identical" in err and "has another tokenizer" in err


def test_bench_command(capsys, tmp_path):
    qs = tmp_path / "q.jsonl"
    qs.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["def add(a, b):"]}) + "\n")
    assert main(["bench", *SMOL, "--methods", "ar,lookup,lookup/noguard", "--dataset", str(qs), "--max-new-tokens",
                 "8", "--method-opts", '{"lookup/noguard": {"guard": false}}', "--out", str(tmp_path / "b")]) == 0
    assert "lookup/noguard" in capsys.readouterr().out and (tmp_path / "b" / "report.md").is_file()
    assert main(["bench", *SMOL, "--methods", "ar,lookup", "--dataset", str(qs), "--method-opts",
                 '{"lookup": {"guard": "no"}}', "--out", str(tmp_path / "c")]) == 2


def test_methods_command(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    assert "recycling" in out and "1..8" in out        # option ranges are listed
    assert "another tokenizer" in out and "tli|string" in out


def test_models_install(capsys):
    assert main(["models", "install", "smollm2-135m-instruct"]) == 0     # installed already: prints its path
    assert os.path.isdir(capsys.readouterr().out.strip())


def test_models_bench_forward(capsys):
    assert main(["models", "bench-forward", "smollm2-135m-instruct"]) == 0
    assert "n=1 " in capsys.readouterr().out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_command_with_an_api_key():
    httpx = pytest.importorskip("httpx")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "DRAFTWISE_API_KEY": "secret-key-123"}
    p = subprocess.Popen([sys.executable, "-m", "draftwise.cli", "serve", *SMOL, "--port", str(port),
                          "--method", "lookup"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        for _ in range(600):
            try:
                if httpx.get(url + "/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                time.sleep(0.2)
        body = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4}
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(url + "/v1/models", timeout=10).status_code == 401
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=60,
                       headers={"Authorization": "Bearer secret-key-123"})
        assert r.status_code == 200 and r.json()["draftwise"]["method"] == "lookup"
    finally:
        p.terminate()
        p.wait(timeout=30)


def test_chat_refuses_input_that_is_not_utf8():
    p = subprocess.run([sys.executable, "-m", "draftwise.cli", "chat", *SMOL, "--max-new-tokens", "4"],
                       input=b"hi \xff\xfe\n/quit\n", capture_output=True, timeout=300)
    err = p.stderr.decode()
    assert p.returncode == 0 and "Traceback" not in err and "not valid Unicode" in err

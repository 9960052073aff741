"""Bench runner: metric arithmetic, answer schema, resume, and the lossless check."""
import json

import pytest

from draftwise.bench.runner import Runner, Sample, summarize
from draftwise.drafters.base import Drafter
from draftwise.errors import ConfigError


def test_summary_arithmetic():
    ar = [Sample("ar", "q1", "a", new_tokens=[10], wall_time=[2.0], decoding_steps=[10], accept_lengths=[[1] * 10]),
          Sample("ar", "q2", "b", new_tokens=[20], wall_time=[2.0], decoding_steps=[20], accept_lengths=[[1] * 20])]
    tr = [Sample("x", "q1", "a", new_tokens=[10], wall_time=[1.0], decoding_steps=[5], accept_lengths=[[2] * 5],
                 proposed_by_depth=[0, 10, 4], accepted_by_depth=[0, 5, 1]),
          Sample("x", "q2", "b", new_tokens=[20], wall_time=[4.0], decoding_steps=[10], accept_lengths=[[3, 1] * 5])]
    s = summarize({"ar": ar, "x": tr})
    o = s["x"]["overall"]
    assert o["new_tokens"] == 30 and o["wall_time"] == 5.0 and o["tokens_per_s"] == 6.0
    assert o["speedup_vs_ar"] == pytest.approx((10 / 1 / 5 + 20 / 4 / 10) / 2)    # mean per-sample ratio
    assert o["tau"] == pytest.approx(30 / 15)
    assert s["x"]["categories"]["a"]["speedup_vs_ar"] == pytest.approx(2.0)
    assert s["ar"]["overall"]["speedup_vs_ar"] == pytest.approx(1.0)
    assert s["x"]["overall"]["acceptance_by_depth"] == pytest.approx([0.5, 0.25])


@pytest.fixture(scope="module")
def engine():
    import draftwise

    return draftwise.load("smollm2-135m-instruct", progress=False)


@pytest.fixture
def questions(tmp_path):
    p = tmp_path / "q.jsonl"
    p.write_text("\n".join(json.dumps(q) for q in [
        {"question_id": 1, "category": "count", "turns": ["Count from one to ten.", "Now backwards."]},
        {"question_id": 2, "category": "code", "turns": ["Write a Python hello world."]}]))
    from draftwise import corpora as datasets

    return datasets.load(str(p))


def test_run_schema_and_resume(engine, questions, tmp_path):
    out = tmp_path / "out"
    s = Runner(engine, ["ar", "lookup"], questions, out, max_new_tokens=8, progress=False).run()
    assert not s["mismatches"]
    lines = (out / "answers-lookup.jsonl").read_text().splitlines()
    assert len(lines) == 2
    rec = json.loads(lines[0])
    ch = rec["choices"][0]
    for k in ("turns", "new_tokens", "wall_time", "decoding_steps", "accept_lengths"):
        assert len(ch[k]) == 2, k
    assert sum(ch["accept_lengths"][0]) == ch["new_tokens"][0]
    assert (out / "report.md").is_file() and (out / "summary.json").is_file()
    assert (out / "speedup.png").stat().st_size > 1000 and (out / "tau_hist.png").is_file()   # plots out of the box
    # resume: nothing is run twice
    Runner(engine, ["ar", "lookup"], questions, out, max_new_tokens=8, progress=False).run()
    assert len((out / "answers-lookup.jsonl").read_text().splitlines()) == 2
    # a different configuration never mixes into the same directory
    with pytest.raises(ConfigError, match="different configuration"):
        Runner(engine, ["ar"], questions, out, max_new_tokens=9, progress=False).run()


class BrokenDrafter(Drafter):
    """Corrupts the target's KV cache: the lossless check must catch it."""
    name = "broken"

    def observe(self, tree, logits, accepted, ctx):
        ctx.cache.v[:, :, : ctx.cache.length].mul_(-1.0)


def test_mismatch_is_reported_and_fails(engine, questions, tmp_path):
    engine.register("broken", BrokenDrafter())
    s = Runner(engine, ["ar", "broken"], questions, tmp_path / "o", max_new_tokens=8, progress=False).run()
    assert s["mismatches"] and all(m["method"] == "broken" for m in s["mismatches"])
    from draftwise.cli import bench_exit_code

    assert bench_exit_code(s) == 1


def test_unknown_method_and_dataset(engine, tmp_path):
    from draftwise import corpora as datasets

    with pytest.raises(ConfigError):
        Runner(engine, ["nope"], [], tmp_path)
    with pytest.raises(ConfigError):
        datasets.load("nope")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question_id": 1}\n')
    with pytest.raises(ConfigError, match="not a Spec-Bench question"):
        datasets.load(str(bad))


def test_balanced_limit_covers_categories():
    from draftwise.corpora import balanced

    qs = [{"question_id": i, "category": c} for i, c in enumerate("aaabbc")]
    assert [q["question_id"] for q in balanced(qs, 4)] == [0, 3, 5, 1]
    assert balanced(qs, None) == qs and len(balanced(qs, 100)) == 6


def test_baselines_run_on_the_same_prompts_and_report_agreement(questions, tmp_path):
    import draftwise

    exact = draftwise.load("smollm2-135m-instruct", weights="gguf-f32", progress=False)   # HF's fp32 weights
    s = Runner(exact, ["ar", "hf"], questions[:1], tmp_path / "o", max_new_tokens=6, progress=False).run()
    hf = s["methods"]["hf"]["overall"]
    assert hf["turns"] == 2 and hf["same_as_ar"] == 1      # HF generate on the same fp32 weights agrees
    assert s["methods"]["ar"]["overall"]["speedup_vs_hf"] > 0


def test_baseline_preconditions_fail_before_any_sample(engine, tmp_path, monkeypatch):
    import builtins

    with pytest.raises(ConfigError, match="needs --draft"):
        Runner(engine, ["hf-assisted"], [], tmp_path)
    real_import = builtins.__import__

    def no_llama(name, *a, **kw):
        if name == "llama_cpp":
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_llama)
    with pytest.raises(ConfigError, match="llama-cpp-python"):
        Runner(engine, ["llamacpp"], [], tmp_path)


def test_llamacpp_peer_needs_a_gguf(tmp_path):
    from draftwise.bench.baselines import gguf_file

    with pytest.raises(ConfigError, match="GGUF"):
        gguf_file(tmp_path)
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert gguf_file(tmp_path).name == "m.gguf"


def test_llamacpp_peer_generates_when_installed(engine, questions, tmp_path):
    pytest.importorskip("llama_cpp")     # optional peer: not installed in CI
    s = Runner(engine, ["ar", "llamacpp", "llamacpp-lookup"], questions[1:], tmp_path / "o", max_new_tokens=6,
               progress=False).run()
    for m in ("llamacpp", "llamacpp-lookup"):
        o = s["methods"][m]["overall"]
        assert o["new_tokens"] > 0 and o["tokens_per_s"] > 0
    assert not s["mismatches"]            # a peer's different text is reported, not a lossless failure


def test_llamacpp_peer_runs_prompts_longer_than_its_batch(engine):
    """llama-cpp-python's lookup failed past 512 prompt tokens (a logits buffer sized by n_batch)."""
    pytest.importorskip("llama_cpp")
    from draftwise.bench.baselines import Baselines

    b = Baselines(engine)
    ids = engine.encode("The quick brown fox jumps over the lazy dog. " * 80 + "Again:")
    assert len(ids) > 700
    for m in ("llamacpp", "llamacpp-lookup"):
        assert len(b.generate(m, ids, 4)) > 0 and b.first_token_s > 0

"""GGUF block weights kept quantized (draftwise/quant.py, kernels/qgemm.c): exact unpacking per
type (random blocks and the real files), the block kernel (int8 and nibble-packed layouts) against a
float64 reference with rows bit-identical for any n, the gguf path of a real model against its fp32
path (within 1e-4), and every registered method lossless on a model whose linears run through the
block kernel."""
import numpy as np
import pytest
import torch

from draftwise import kernels, methods
from draftwise.decoding import generate
from draftwise.errors import CheckpointError, ConfigError
from draftwise.quant import SUPPORTED, QWeight, concat_rows, from_gguf_tensor, unpack
from tests.conftest import make_tiny_hf
from tests.fixtures import TinyEngine

needs_kernels = pytest.mark.skipif(not kernels.available(), reason=f"kernels unavailable: {kernels.why_unavailable()}")
# byte offsets of each type's fp16 fields (random payload elsewhere)
F16_FIELDS = {"Q8_0": [0], "Q5_0": [0], "Q4_1": [0, 2], "Q6_K": [208], "Q4_K": [0, 2]}


def random_blocks(kind: str, n: int, seed: int = 0) -> np.ndarray:
    import gguf

    size = gguf.GGML_QUANT_SIZES[getattr(gguf.GGMLQuantizationType, kind)][1]
    rng = np.random.default_rng(seed)
    b = rng.integers(0, 256, (n, size), dtype=np.uint8)
    for off in F16_FIELDS[kind]:
        b[:, off:off + 2] = rng.uniform(-0.05, 0.05, n).astype(np.float16).view(np.uint8).reshape(n, 2)
    return b


@pytest.mark.parametrize("kind", SUPPORTED)
def test_unpacked_blocks_dequantize_exactly_like_gguf(kind):
    import gguf
    from gguf.quants import dequantize

    blocks = random_blocks(kind, 64)
    q, scale, offset, group, factors = unpack(kind, blocks)
    per = q.shape[1]
    if kind in ("Q4_K", "Q6_K"):          # the k-quants' factors give the same fp32 scales and offsets
        sb, si, ob, oi = factors
        assert np.array_equal(np.repeat(sb, si.shape[1], axis=1) * si.astype(np.float32), scale)
        assert ob is None if offset is None else np.array_equal(np.repeat(ob, oi.shape[1], axis=1) * oi, offset)
    else:
        assert factors is None
    w = QWeight(torch.from_numpy(q.reshape(-1, per)), torch.from_numpy(scale.reshape(-1, per // group)),
                None if offset is None else torch.from_numpy(offset.reshape(-1, per // group)), group, kind)
    ref = dequantize(blocks, getattr(gguf.GGMLQuantizationType, kind)).reshape(w.shape)
    got = w.dequantize().numpy()
    assert np.isfinite(ref).all() and np.array_equal(got.view(np.uint32), ref.view(np.uint32))   # bit for bit
    lo, hi = {"Q8_0": (-128, 127), "Q5_0": (-16, 15), "Q4_1": (0, 15), "Q6_K": (-32, 31), "Q4_K": (0, 15)}[kind]
    assert int(q.min()) == lo and int(q.max()) == hi                # the full range, no more


def test_unpack_refuses_other_types():
    with pytest.raises(CheckpointError, match="not supported"):
        unpack("IQ2_XS", np.zeros((1, 10), dtype=np.uint8))


def test_real_gguf_tensors_dequantize_exactly_and_equal_the_fp32_checkpoint():
    """Every quantized tensor type in each installed model file (SmolLM2 in CI: Q8_0, Q4_1), and every
    linear of the file mapped to its Hugging Face name equals the fp32 checkpoint we import from it."""
    import gguf
    from gguf.quants import dequantize
    from safetensors.torch import load_file

    from draftwise.models import catalog
    from draftwise.models.checkpoint import load_config
    from draftwise.models.gguf import load_gguf_linears

    tested = 0
    for name in ("smollm2-135m-instruct", "qwen2.5-coder-0.5b-instruct"):     # the 0.5B where installed
        d = catalog.model_dir(name)
        files = sorted(d.glob("*.gguf")) if d.is_dir() else []
        if not files or not (d / "model.safetensors").is_file():
            continue
        seen = set()
        for t in gguf.GGUFReader(str(files[0])).tensors:
            if t.tensor_type.name in SUPPORTED and t.tensor_type.name not in seen:
                seen.add(t.tensor_type.name)
                w = from_gguf_tensor(t)
                ref = torch.from_numpy(dequantize(t.data, t.tensor_type).reshape(w.shape))
                assert torch.equal(w.dequantize().view(torch.int32), ref.view(torch.int32)), (name, t.name)
        state = load_file(str(d / "model.safetensors"))
        lin = load_gguf_linears(files[0], load_config(d))
        assert len(lin) == 7 * load_config(d).num_layers + 1
        for hf, w in lin.items():
            fp = state.get(hf, state.get("model.embed_tokens.weight"))
            assert torch.equal(w.dequantize(), fp), (name, hf)
        tested += 1
    assert tested >= 1          # CI installs SmolLM2


def _random_qweight(rows, cols, group, offset, seed, lo=-32, hi=32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(lo, hi, (rows, cols), generator=g, dtype=torch.int8)
    s = torch.rand(rows, cols // group, generator=g) * 0.02 + 0.001
    m = (torch.rand(rows, cols // group, generator=g) - 0.5) * 0.05 if offset else None
    return QWeight(q, s, m, group, "test")


@needs_kernels
@pytest.mark.parametrize("rows,cols,group,offset,lo,hi,bits", [
    (37, 64, 32, False, -32, 32, 8), (16, 96, 16, True, -8, 8, 8), (3, 32, 16, False, -128, 128, 8),
    (70, 544, 16, False, -32, 32, 8),                       # large-n path: chunks of 256 columns + a tail
    (16, 96, 16, True, 0, 16, 4), (50, 160, 32, True, 0, 16, 4), (130, 544, 32, True, 0, 16, 4),
    (21, 64, 32, False, 0, 16, 4)])
def test_block_kernel_matches_float64_and_rows_do_not_depend_on_n(rows, cols, group, offset, lo, hi, bits):
    from draftwise.models.layers import QLinear

    w = _random_qweight(rows, cols, group, offset, seed=rows, lo=lo, hi=hi)
    bias = torch.randn(rows)
    lin = QLinear(w, bias)
    assert lin.bits == bits                                   # 4-bit values are nibble-packed
    ref_w = w.dequantize().double()
    x = torch.randn(40, cols)
    for n in (1, 2, 3, 4, 5, 6, 7, 11, 12, 13, 20, 40):      # every tile shape, and the chunked path from 12
        y = lin(x[:n])
        ref = x[:n].double() @ ref_w.T + bias.double()
        assert float((y.double() - ref).abs().max() / ref.abs().max()) < 1e-5
        for j in range(n):                                    # a row equals itself computed alone
            assert torch.equal(y[j], lin(x[j:j + 1])[0]), (n, j)
    sub = lin.rows(torch.tensor([0, rows - 1, 2]))
    assert sub.bits == bits and torch.equal(sub(x[:3]), lin(x[:3])[:, [0, rows - 1, 2]])


def test_nibble_packing_round_trips():
    q = torch.randint(0, 16, (35, 64), dtype=torch.int8)
    p = kernels.pack_quant(QWeight(q, torch.ones(35, 2), None, 32, "t"))
    assert p.bits == 4 and p.Q.dtype == torch.uint8 and p.Q.shape == (3, 32, 16)
    assert torch.equal(kernels.unpack_nibbles(p.Q), kernels.pack_weight(q))
    assert kernels.pack_quant(QWeight(q - 1, torch.ones(35, 2), None, 32, "t")).bits == 8   # -1: no nibble


@needs_kernels
def test_compact_scale_forms_give_the_fp32_scales_results_bit_for_bit():
    """fp16 scales (Q8_0/Q5_0/Q4_1-like) and base x int factors (k-quants, regrouped and fused too) are
    read by the kernel as the very same fp32 values: outputs equal the fp32-scale layout's bit for bit; a
    fusion of both forms falls back to fp32 scales."""
    from draftwise.models.layers import QLinear
    from draftwise.quant import Factors

    g = torch.Generator().manual_seed(3)
    rows, cols = 40, 512
    q4 = torch.randint(0, 16, (rows, cols), generator=g, dtype=torch.int8)
    q6 = torch.randint(-32, 32, (rows, cols), generator=g, dtype=torch.int8)
    d = torch.rand(rows, cols // 256, generator=g).half().float()
    sc = torch.randint(0, 64, (rows, cols // 32), generator=g, dtype=torch.int8)
    mn = torch.randint(0, 64, (rows, cols // 32), generator=g, dtype=torch.int8)
    k4 = QWeight(q4, Factors(d, sc).value(), Factors(-d, mn).value(), 32, "Q4_K", Factors(d, sc), Factors(-d, mn))
    sc6 = torch.randint(-128, 128, (rows, cols // 16), generator=g, dtype=torch.int8)
    k6 = QWeight(q6, Factors(d, sc6).value(), None, 16, "Q6_K", Factors(d, sc6), None)
    h = QWeight(q6, torch.rand(rows, cols // 32, generator=g).half().float(), None, 32, "Q8_0")
    x = torch.randn(13, cols, generator=g)
    for w, fmt in ((k4, 2), (k6, 2), (concat_rows([k4, k6]), 2), (h, 1), (concat_rows([h, k4]), 0)):
        plain = QWeight(w.q, w.scale, w.offset, w.group, w.kind)                 # no factors
        a, b = QLinear(w, None), QLinear(plain, None)
        assert a.fmt == fmt and b.fmt in (0, 1)
        if fmt == 2:
            b.fmt, b.S, b.M = 0, kernels.pack_weight(w.scale), None if w.offset is None else kernels.pack_weight(w.offset)
        for n in (1, 2, 5, 13):
            assert torch.equal(a(x[:n]), b(x[:n])), (w.kind, n)
        ids = torch.tensor([1, 39, 17])
        sub = a.rows(ids)
        assert torch.equal(sub(x[:3]), a(x[:3])[:, ids]) and (fmt != 2 or sub.fmt == 2)


def test_concat_rows_unifies_groups_and_offsets():
    a, b = _random_qweight(4, 64, 32, False, 1), _random_qweight(3, 64, 16, True, 2)
    c = concat_rows([a, b])
    assert c.group == 16 and c.shape == (7, 64)
    assert torch.equal(c.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))


def _quantized_tiny(tmp_path, group: int = 16):
    """A tiny model whose linears are Q8_0-like int8 blocks and Q4_K-like 4-bit blocks with offsets (the
    MLP), and its fp32 twin holding the same values. group 32: real Q8_0 and Q4_1 blocks (fp16 scales),
    which the 8-bit-activation kernels take (the down projection, 112 columns, stays on fp32 activations)."""
    from draftwise.models.checkpoint import load_config, load_state_dict
    from draftwise.models.transformer import Transformer

    make_tiny_hf("qwen2", tmp_path, seed=11, vocab=96)
    cfg, state = load_config(tmp_path), load_state_dict(tmp_path)
    quant = {}
    for name, w in state.items():
        if w.dim() == 2 and "embed" not in name:
            g = group if w.shape[1] % group == 0 else 16
            blocks = w.view(w.shape[0], -1, g)                                   # tiny dims: groups of 16
            f16 = (lambda t: t.half().float()) if g == 32 else (lambda t: t)      # noqa: E731
            if "mlp" in name:          # 4-bit with offsets, Q4_K-like (nibble-packed by the kernel)
                lo, hi = f16(blocks.amin(-1)), blocks.amax(-1)
                s = f16(((hi - lo) / 15).clamp_min(1e-4))
                q = torch.round((blocks - lo.unsqueeze(-1)) / s.unsqueeze(-1)).clamp(0, 15).to(torch.int8).view(w.shape)
                quant[name] = QWeight(q, s.float(), lo.float(), g, "Q4_1" if g == 32 else "Q4_K")
            else:                      # int8, Q8_0-like
                s = f16(blocks.abs().amax(-1).clamp_min(1e-4) / 127)
                q = torch.round(blocks / s.unsqueeze(-1)).clamp(-127, 127).to(torch.int8).view(w.shape)
                quant[name] = QWeight(q, s.float(), None, g, "Q8_0")
            state[name] = quant[name].dequantize()
    return Transformer(cfg, state, max_len=256, quant=quant), Transformer(cfg, state, max_len=256)


@needs_kernels
def test_gguf_path_matches_fp32_path_and_every_method_is_lossless_on_it(tmp_path):
    qm, fm = _quantized_tiny(tmp_path)
    assert qm.weights == "gguf" and fm.weights == "fp32" and qm.weight_bytes() < fm.weight_bytes() / 2
    assert {L.gate_up.bits for L in qm.layers} == {4} and {L.qkv.bits for L in qm.layers} == {8}
    assert all(p is not None for p in qm._plans + fm._plans)    # both run a layer per C call (layer.c)
    prompt = [(i * 5) % 90 + 1 for i in range(24)]
    with torch.inference_mode():
        a = qm.forward(torch.tensor(prompt), torch.arange(24), qm.new_cache(64)).logits
        b = fm.forward(torch.tensor(prompt), torch.arange(24), fm.new_cache(64)).logits
    # same weights; the block kernel scales once per group, so the last bits differ
    assert float((a - b).abs().max() / b.abs().max()) < 1e-5
    ref, _ = generate(qm, prompt, max_new_tokens=30)
    for label, name, opts in methods.test_cases():
        if name == "draft-model" or (name == "rasd" and opts.get("base") == "draft-model"):
            engine = TinyEngine(qm, qm)          # the quantized model drafts for itself
        else:
            engine = TinyEngine(qm)
        spec = methods.get(name)
        d = spec.factory(engine, **spec.validate(opts))
        assert generate(qm, prompt, drafter=d, max_new_tokens=30)[0] == ref, label


@needs_kernels
def test_int8_activation_path_is_lossless_for_every_method(tmp_path):
    """The default gguf mode (8-bit activations, q8gemm.c) on a tiny model of real Q8_0/Q4_1 blocks: every
    layer runs as one C call with the q8 linears inside, logits stay close to the exact weights' (int8
    activations: within 5%), and every registered method's greedy output equals this model's own greedy
    decoding (rows do not depend on how many share a pass)."""
    qm, fm = _quantized_tiny(tmp_path, group=32)
    assert qm.weights == "gguf" and qm.lm_head.act == "q8"
    assert all(L.qkv.act == L.o.act == L.gate_up.act == "q8" and L.down.act == "f32" for L in qm.layers)
    assert all(p is not None for p in qm._plans)
    prompt = [(i * 7) % 90 + 1 for i in range(24)]
    with torch.inference_mode():
        a = qm.forward(torch.tensor(prompt), torch.arange(24), qm.new_cache(64)).logits
        b = fm.forward(torch.tensor(prompt), torch.arange(24), fm.new_cache(64)).logits
    assert 0 < float((a - b).abs().max() / b.abs().max()) < 0.05
    ref, _ = generate(qm, prompt, max_new_tokens=30)
    for label, name, opts in methods.test_cases():
        engine = TinyEngine(qm, qm) if name == "draft-model" or opts.get("base") == "draft-model" else TinyEngine(qm)
        spec = methods.get(name)
        d = spec.factory(engine, **spec.validate(opts))
        assert generate(qm, prompt, drafter=d, max_new_tokens=30)[0] == ref, label


def test_gguf_weights_need_the_file_and_the_cpu_kernels(tmp_path):
    from draftwise.models.transformer import Transformer

    make_tiny_hf("llama", tmp_path, seed=0)
    with pytest.raises(CheckpointError, match=r"\.gguf"):
        Transformer.from_pretrained(tmp_path, weights="gguf")
    with pytest.raises(ConfigError, match="weights must be"):
        Transformer.from_pretrained(tmp_path, weights="int4")
    assert Transformer.from_pretrained(tmp_path, weights="auto").weights == "fp32"     # no file: fp32
    from draftwise.models.checkpoint import load_config, load_state_dict

    with pytest.raises(ConfigError, match="CPU kernels in float32"):
        Transformer(load_config(tmp_path), load_state_dict(tmp_path), dtype=torch.float64,
                    quant={"lm_head.weight": _random_qweight(96, 64, 32, False, 0)})


@needs_kernels
def test_real_model_gguf_weights_match_the_fp32_logits_and_load_from_the_cache():
    """SmolLM2 (its GGUF installed in CI): weights='auto' picks the GGUF blocks with 8-bit activations on
    CPU (Q4_1 layers, Q8_0 head); gguf-f32 logits match the fp32 path's within 1e-4 relative, the int8
    activations' within 10% (measured 2.6%) with the same argmax at >= 90% of positions (measured 100%);
    methods on each are lossless against that mode's own greedy decoding; the second load is cached."""
    import time

    import draftwise
    from draftwise.models import catalog
    from draftwise.models.transformer import Transformer, prefill

    d = catalog.model_dir("smollm2-135m-instruct")
    eng = draftwise.load("smollm2-135m-instruct", progress=False)
    assert eng.model.weights == "gguf" and type(eng.model.lm_head).__name__ == "QLinear"
    assert eng.model.lm_head.act == "q8" and all(L.gate_up.act == "q8" for L in eng.model.layers)
    fp = Transformer.from_pretrained(d, weights="fp32")
    t0 = time.perf_counter()
    f32 = Transformer.from_pretrained(d, weights="gguf-f32")
    assert f32.weights == "gguf-f32" and time.perf_counter() - t0 < 30
    ids = eng.encode("def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n")
    with torch.inference_mode():
        a = prefill(eng.model, eng.model.new_cache(64), torch.tensor(ids)).logits
        b = prefill(fp, fp.new_cache(64), torch.tensor(ids)).logits
        c = prefill(f32, f32.new_cache(64), torch.tensor(ids)).logits
    assert float((c - b).abs().max() / b.abs().max()) < 1e-4
    assert float((a - b).abs().max() / b.abs().max()) < 0.1
    assert float((a.argmax(-1) == b.argmax(-1)).float().mean()) >= 0.9
    assert any(getattr(L.gate_up, "bits", 8) == 4 for L in f32.layers)
    for m in (eng.model, f32):
        ref = generate(m, ids, max_new_tokens=24)[0]
        for method in ("recycling", "lookup"):
            d_ = methods.get(method)
            drafter = d_.factory(TinyEngine(m), **d_.validate({}))
            assert generate(m, ids, drafter=drafter, max_new_tokens=24)[0] == ref, (m.weights, method)

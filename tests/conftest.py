import os

import pytest
import torch

# Keep test artifacts (compiled kernels, converted models) out of the user's cache unless asked.
os.environ.setdefault("DRAFTWISE_CACHE", os.path.join(os.path.dirname(__file__), "..", ".test-cache"))
torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))

# Model tests run on this device: `DRAFTWISE_TEST_DEVICE=cuda pytest tests/test_model_parity.py ...`
# repeats them on a GPU (CI has none, so it runs them on the CPU).
DEVICE = os.environ.get("DRAFTWISE_TEST_DEVICE", "cpu")
if DEVICE == "cpu":     # the batch-invariant Triton kernels run in Triton's CPU interpreter (tests/test_invariant.py)
    os.environ.setdefault("TRITON_INTERPRET", "1")

ARCHS = ["llama", "qwen2", "qwen3", "mistral"]


def tiny_hf_config(arch: str, vocab: int = 96, tie: bool = False):
    from transformers import AutoConfig

    kw = dict(vocab_size=vocab, hidden_size=64, intermediate_size=112, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
              rms_norm_eps=1e-6, tie_word_embeddings=tie, rope_theta=10000.0, eos_token_id=vocab - 1,
              bos_token_id=0)
    if arch == "qwen3":
        kw["head_dim"] = 16
    if arch == "llama":
        kw["rope_scaling"] = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                              "high_freq_factor": 4.0, "original_max_position_embeddings": 64}
    if arch == "mistral":
        kw["sliding_window"] = None
    return AutoConfig.for_model(arch, **kw)


def make_tiny_hf(arch: str, path, seed: int = 0, vocab: int = 96, tie: bool = False):
    """A random HF model of the given architecture, saved to path. Returns the HF model (fp32)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = tiny_hf_config(arch, vocab=vocab, tie=tie)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():   # random init is tiny; widen it so logits are not all near-ties
        for name, p in model.named_parameters():
            if p.dim() == 2:
                p.normal_(0, 0.08)
            elif "norm" in name:
                p.uniform_(0.8, 1.2)
            else:
                p.normal_(0, 0.05)
    model.eval()
    model.save_pretrained(str(path))
    return model


@pytest.fixture(params=ARCHS)
def arch(request):
    return request.param

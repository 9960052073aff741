import torch

from draftwise.models.transformer import Transformer
from tests.conftest import DEVICE, make_tiny_hf


def tiny_model(tmp_path, arch="llama", seed=0, dtype=torch.float64, vocab=96, max_len=256):
    make_tiny_hf(arch, tmp_path, seed=seed, vocab=vocab)
    return Transformer.from_pretrained(tmp_path, dtype=dtype, max_len=max_len, device=DEVICE)

"""The prepacked CPU kernel as a torch custom op (``torch.ops.draftwise.linear``), so code under
``torch.compile`` can call it without a graph break and fuse the operations around it.

No ``from __future__ import annotations`` here: torch.library reads the schema from the annotations.
"""
from typing import Optional

import torch

from draftwise import kernels


@torch.library.custom_op("draftwise::linear", mutates_args=())
def linear(x: torch.Tensor, packed: torch.Tensor, bias: Optional[torch.Tensor], out_features: int) -> torch.Tensor:
    """y = x W^T (+ b) with a prepacked weight [ceil(O/16), I, 16]; x [n, I] fp32 on CPU."""
    return kernels.linear(x.contiguous(), packed, bias, out_features)


@linear.register_fake
def _(x, packed, bias, out_features):
    return x.new_empty((x.shape[0], out_features))

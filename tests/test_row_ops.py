"""Native row reductions over logits (kernels/ops.c) against torch: argmax picks the first largest value
(as torch does, ties included), top-k returns the k largest values in order."""
import pytest
import torch

from draftwise import kernels

pytestmark = pytest.mark.skipif(not kernels.available(), reason="CPU kernels unavailable")


@pytest.mark.parametrize("n,V", [(1, 7), (1, 151936), (3, 1000), (9, 49152), (2, 13)])
def test_argmax_rows_equals_torch_including_ties(n, V):
    g = torch.Generator().manual_seed(V + n)
    x = torch.randn(n, V, generator=g)
    x[0, V // 2] = x[0, V - 1] = x[0].max() + 1                    # a tie at the maximum: the first wins
    if n > 1:
        x[1] = 0.0                                                  # all equal
        x[-1, :] = -torch.inf
        x[-1, V - 1] = 5.0                                          # the last column
    assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))
    assert int(kernels.argmax_rows(x[0])) == int(x[0].argmax())
    sliced = torch.randn(n, V + 5, generator=g)[:, :V]              # rows with a stride
    assert torch.equal(kernels.argmax_rows(sliced), sliced.argmax(-1))
    x[0, 3] = float("nan")                                          # NaN: torch's rule (it is the largest)
    assert torch.equal(kernels.argmax_rows(x), x.argmax(-1))


@pytest.mark.parametrize("k", [1, 8, 64])
def test_topk_rows_equals_torch(k):
    g = torch.Generator().manual_seed(k)
    x = torch.randn(5, 20000, generator=g)
    x[2, :100] = x[2].max() + 1                                     # many equal values: lower index first
    idx = kernels.topk_rows(x, k)
    ref = torch.topk(x, k, dim=-1)
    assert torch.equal(x.gather(1, idx), ref.values)
    assert idx[2].tolist()[: min(k, 100)] == list(range(min(k, 100)))
    assert torch.equal(kernels.topk_rows(x.double(), k), ref.indices)   # other dtypes: torch itself

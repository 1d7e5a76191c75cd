"""talkgen.kernels.layout.view_2d: the 2-D views both attention kernels hand to TMA descriptors.
A wrong row or column would make a kernel read another head's or batch's tokens."""

import torch

from talkgen.kernels.layout import view_2d


def element(t: torch.Tensor, view, b: int, h: int, n: int) -> torch.Tensor:
    """Token n of (b, h) read through the 2-D view, as a kernel's descriptor would."""
    (rows, cols), (row_stride, _), row_b, row_h, col_h = view
    flat = torch.as_strided(t, (rows, cols), (row_stride, 1), t.storage_offset())
    return flat[b * row_b + h * row_h + n, h * col_h: h * col_h + t.shape[-1]]


def test_both_layouts_address_every_token():
    B, H, L, D = 2, 3, 5, 8
    blhd = torch.randn(B, L, H, D).transpose(1, 2)  # the DiT's layout
    bhld = torch.randn(B, H, L, D)
    for t in (blhd, bhld):
        view = view_2d(t)
        assert view is not None
        for b in range(B):
            for h in range(H):
                for n in range(L):
                    assert torch.equal(element(t, view, b, h, n), t[b, h, n])


def test_unaddressable_layouts_are_refused():
    t = torch.randn(2, 3, 5, 8)
    assert view_2d(t.transpose(-1, -2).contiguous().transpose(-1, -2)) is None  # last stride not 1
    assert view_2d(torch.randn(2, 5, 3, 8).permute(2, 0, 1, 3)) is None  # [H, B, L, D] in memory
    odd = torch.randn(2 * 3 * 5 * 7).view(2, 3, 5, 7)
    assert view_2d(odd) is None  # rows of 7 bf16/fp32 elements are not 16-byte multiples

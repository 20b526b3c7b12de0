"""The pure weight formulas, each checked against the function it must preserve, written out
here with plain torch in float64 on random tensors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normtool.passes.weight_math import centre, crms_reader, crms_writer, fold_forward

# float64 end to end: only rounding of a few dozen products/sums remains, far below 1e-12
TOL64 = 1e-12


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("has_bias", [True, False])
@pytest.mark.parametrize("has_shift", [True, False])
def test_fold_forward_preserves_linear_of_affine(has_bias, has_shift):
    g = _g(0)
    w = torch.randn(7, 5, generator=g, dtype=torch.float64)
    b = torch.randn(7, generator=g, dtype=torch.float64) if has_bias else None
    s = torch.randn(5, generator=g, dtype=torch.float64)
    t = torch.randn(5, generator=g, dtype=torch.float64) if has_shift else None
    x = torch.randn(11, 5, generator=g, dtype=torch.float64)
    want = F.linear(x * s + (t if t is not None else 0.0), w, b)
    w2, b2 = fold_forward(w, b, s, t)
    assert (b2 is None) == (not has_bias and not has_shift)  # a bias is created only when needed
    got = F.linear(x, w2, b2)
    assert torch.allclose(got, want, atol=TOL64, rtol=0)


def test_fold_forward_restores_dtype_and_computes_in_fp64():
    g = _g(1)
    w = torch.randn(64, 64, generator=g).half()
    s = torch.randn(64, generator=g).half()
    t = torch.randn(64, generator=g).half()
    w2, b2 = fold_forward(w, None, s, t)
    assert w2.dtype == torch.float16 and b2.dtype == torch.float16
    # the created bias is W·t rounded once to fp16 from the exact value: within half an fp16 ulp
    exact = w.double() @ t.double()
    assert torch.allclose(b2.double(), exact, rtol=2**-11, atol=1e-6)


def test_centre_makes_layernorm_equal_rmsnorm():
    """A stream summed from centred writers has zero mean, and LayerNorm of the original stream
    equals RMSNorm of the centred one (the identity ln→rms rests on)."""
    g = _g(2)
    d = 9
    emb = torch.randn(20, d, generator=g, dtype=torch.float64)  # [V, d], stream axis 1
    proj = torch.randn(d, 6, generator=g, dtype=torch.float64)  # [d, I], stream axis 0
    bias = torch.randn(d, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 20, (4,), generator=g)
    h = torch.randn(4, 6, generator=g, dtype=torch.float64)
    x = emb[ids] + F.linear(h, proj, bias)
    xc = centre(emb, 1)[ids] + F.linear(h, centre(proj, 0), centre(bias, 0))
    assert torch.allclose(xc.mean(-1), torch.zeros(4, dtype=torch.float64), atol=TOL64)
    ln = F.layer_norm(x, (d,), eps=1e-5)
    rms = xc / torch.sqrt(xc.pow(2).mean(-1, keepdim=True) + 1e-5)
    assert torch.allclose(rms, ln, atol=TOL64, rtol=0)


def test_crms_reader_and_writer_preserve_readers_of_a_zero_mean_stream():
    g = _g(3)
    d = 8
    emb = centre(torch.randn(10, d, generator=g, dtype=torch.float64), 1)
    reader = torch.randn(5, d, generator=g, dtype=torch.float64)
    x = emb[torch.tensor([1, 4, 7])]  # zero-mean rows, width d
    xr = crms_writer(emb, 1)[torch.tensor([1, 4, 7])]  # width d-1
    assert xr.shape == (3, d - 1)
    assert torch.allclose(F.linear(xr, crms_reader(reader)), F.linear(x, reader), atol=TOL64)
    # and CRMSNorm of the short vector is RMSNorm of the full one, first d-1 entries
    eps = 1e-6
    crms = xr / torch.sqrt(
        (xr.pow(2).sum(-1, keepdim=True) + xr.sum(-1, keepdim=True) ** 2) / d + eps
    )
    rms = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    assert torch.allclose(crms, rms[:, : d - 1], atol=TOL64, rtol=0)


def test_row_blocks_give_the_same_result():
    """The passes apply these to row blocks of large tensors: per-row independence is required."""
    g = _g(4)
    w = torch.randn(12, 6, generator=g)
    s, t = torch.randn(6, generator=g), torch.randn(6, generator=g)
    b = torch.randn(12, generator=g)
    whole = fold_forward(w, b, s, t)
    parts = [fold_forward(w[i : i + 5], b[i : i + 5], s, t) for i in range(0, 12, 5)]
    # fp64 inside, one rounding to fp32: block shapes may only change the last fp32 bit
    assert torch.allclose(whole[0], torch.cat([p[0] for p in parts]), atol=1e-6, rtol=0)
    assert torch.allclose(whole[1], torch.cat([p[1] for p in parts]), atol=1e-6, rtol=0)
    assert torch.equal(
        crms_reader(w), torch.cat([crms_reader(w[i : i + 5]) for i in range(0, 12, 5)])
    )
    assert torch.equal(centre(w, 1), torch.cat([centre(w[i : i + 5], 1) for i in range(0, 12, 5)]))

"""CRMS with a chosen dropped coordinate (weight_math.crms_writer/crms_reader ``drop``,
crms_column_energy, crms_drop_index), against the maths written out here in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from normtool.passes.weight_math import (
    crms_column_energy,
    crms_drop_index,
    crms_reader,
    crms_writer,
)

# float64 sums of ~10 products of O(1) values: ~1e-15; 1e-12 leaves headroom, a wrong column
# or a missed subtraction moves results by O(1).
TOL64 = 1e-12


@pytest.mark.parametrize("k", [0, 3, 7])
def test_dropping_any_coordinate_preserves_readers_of_a_zero_mean_stream(k):
    g = torch.Generator().manual_seed(k)
    d = 8
    x = torch.randn(5, d, generator=g, dtype=torch.float64)
    x = x - x.mean(1, keepdim=True)  # the zero-mean stream
    w = torch.randn(6, d, generator=g, dtype=torch.float64)
    keep = [i for i in range(d) if i != k]
    assert torch.equal(crms_writer(x, 1, k), x[:, keep])  # writers: coordinate k gone
    assert torch.equal(crms_writer(x.t(), 0, k), x.t()[keep])  # any stream axis
    # the reader on the d−1 stored coordinates computes what the original reader did on all d
    got = F.linear(x[:, keep], crms_reader(w, drop=k))
    assert (got - F.linear(x, w)).abs().max() <= TOL64


def test_default_drops_the_last_coordinate():
    w = torch.randn(4, 6, dtype=torch.float64)
    assert torch.equal(crms_reader(w), w[:, :5] - w[:, 5:])
    assert torch.equal(crms_writer(w, 1), w[:, :5])


def test_column_energy_is_the_reader_norm_growth():
    """‖W[:, i≠k] − W[:, k]‖² = S + d·energy[k], S the row-centred norm² (the docstring's
    claim the choice rests on), written out per k; and the energy adds over row blocks."""
    g = torch.Generator().manual_seed(1)
    w = torch.randn(10, 7, generator=g, dtype=torch.float64) + 0.5
    e = crms_column_energy(w)
    s = (w - w.mean(1, keepdim=True)).pow(2).sum()
    for k in range(7):
        keep = [i for i in range(7) if i != k]
        norm2 = (w[:, keep] - w[:, k : k + 1]).pow(2).sum()
        assert abs(float(norm2 - (s + 7 * e[k]))) <= TOL64 * float(norm2)
    assert torch.allclose(e, crms_column_energy(w[:4]) + crms_column_energy(w[4:]), atol=TOL64)


def test_drop_index_minimises_the_worst_reader():
    """Reader A is indifferent between columns 2 and 5, reader B (a 2-row head) strongly
    prefers 5: the worst-reader rule must drop 5, not the last (6) nor A's best alone."""
    g = torch.Generator().manual_seed(2)
    a = torch.randn(16, 7, generator=g, dtype=torch.float64)
    m = a[:, [0, 1, 3, 4, 6]].mean(1)  # set columns 2 and 5 to it: A's row means stay m,
    a[:, 2] = a[:, 5] = m  # so A's energy is 0 at both
    b = torch.randn(2, 7, generator=g, dtype=torch.float64)
    b[:, 2] = b[:, 1] + 3.0  # column 2 far from B's means
    b[:, 5] = (b.sum(1) - b[:, 5]) / 6  # the mean of the other 6: B's row mean falls on column 5
    ea, eb = crms_column_energy(a), crms_column_energy(b)
    assert float(ea[2]) <= TOL64 and float(eb[5]) <= TOL64
    assert crms_drop_index([ea, eb]) == 5

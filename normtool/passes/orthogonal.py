"""The orthogonal matrices ``rotate`` multiplies the residual stream by (float64, ``d × d``).

* ``hadamard``: a randomised Hadamard matrix ``H·diag(s)/√d`` with seeded signs ``s`` (QuaRot,
  Ashkboos et al. 2024): spreads every coordinate over all others, flattening outliers. ``H`` is
  Sylvester's ``H₂^{⊗k}`` when ``d = 2^k``, else ``H_m ⊗ H_{2^k}`` with ``H_m`` Paley's
  construction I (order ``m = q + 1``, ``q`` a prime ≡ 3 mod 4: 12, 20, 24, 44, 48, …); sizes
  without such a factor are refused, naming the size.
* ``random``: QR of a seeded Gaussian matrix, signs fixed by ``diag(R) > 0`` (so the result is
  Haar-distributed and the same for the same seed on every platform's torch CPU generator).
* ``pca``: the eigenvectors of the stream's second-moment matrix on calibration activations,
  largest first (SliceGPT's basis: the stream's energy concentrates in the first coordinates).
"""

from __future__ import annotations

import math

import torch

from normtool.errors import NormtoolError

F64 = torch.float64


def _is_prime(n: int) -> bool:
    return n > 1 and all(n % p for p in range(2, math.isqrt(n) + 1))


def sylvester(n: int) -> torch.Tensor:
    """The ±1 Hadamard matrix of order ``n = 2^k``."""
    h = torch.ones(1, 1, dtype=F64)
    while h.shape[0] < n:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)])
    return h


def paley(m: int) -> torch.Tensor:
    """Paley construction I: the ±1 Hadamard matrix of order ``m = q + 1``, ``q`` prime ≡ 3 mod 4:
    ``I + [[0, 1ᵀ], [−1, J]]`` with ``J[i, j] = χ(j − i)``, χ the quadratic character mod q."""
    q = m - 1
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=F64)
    idx = (torch.arange(q)[None, :] - torch.arange(q)[:, None]) % q
    s = torch.zeros(m, m, dtype=F64)
    s[0, 1:] = 1.0
    s[1:, 0] = -1.0
    s[1:, 1:] = chi[idx]
    return torch.eye(m, dtype=F64) + s


def hadamard_factor(d: int) -> int | None:
    """The smallest ``m`` (1, or a Paley order) with ``d = m·2^k``, or None."""
    if d < 1:
        return None
    odd, twos = d, 0
    while odd % 2 == 0:
        odd, twos = odd // 2, twos + 1
    for k in range(twos + 1):
        m = odd << k
        if m == 1 or (m % 4 == 0 and _is_prime(m - 1) and (m - 1) % 4 == 3):
            return m
    return None


def hadamard(d: int, seed: int) -> torch.Tensor:
    m = hadamard_factor(d)
    if m is None:
        raise NormtoolError(
            f"no Hadamard matrix of size {d} here: it must be 2^k or 2^k times a Paley order "
            "q+1 (q prime, q ≡ 3 mod 4); use --kind random"
        )
    h = sylvester(d) if m == 1 else torch.kron(paley(m), sylvester(d // m))
    g = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, (d,), generator=g).to(F64) * 2 - 1
    return h * signs / math.sqrt(d)


def random_orthogonal(d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))


def pca(acts: torch.Tensor) -> torch.Tensor:
    """Eigenvectors of ``XᵀX`` (rows of ``acts`` = stream vectors), by decreasing eigenvalue."""
    x = acts.reshape(-1, acts.shape[-1]).to(F64)
    vals, vecs = torch.linalg.eigh(x.T @ x)
    return vecs[:, torch.argsort(vals, descending=True)]

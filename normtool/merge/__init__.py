"""Permutation symmetries of a network, weight matching and interpolation (DESIGN §3.3).

Why this works: a hidden unit's identity is arbitrary, so permuting the units of a space — and,
with them, every tensor axis labelled with that space — leaves the network's function unchanged.
Two networks trained from different seeds are often close to each other only up to such a
permutation (Ainsworth et al. 2022, "Git Re-Basin"); finding it makes averaging them work.

Modules: ``groups`` (which permutations a graph allows), ``permute`` (applying them),
``matching`` (weight matching of two models), ``many`` (three or more), ``interpolate``,
``bn_repair`` (BatchNorm statistics after interpolation), ``checks`` (refusals), ``data``
(labelled data files), ``merge`` (the whole recipe), ``path`` (loss along the linear path and
the barrier), ``barrier`` (naive and matched paths), ``plot``.
"""

"""Brute-force references, written from REFERENCE.md's math only (no code shared with the package)."""

from __future__ import annotations

import numpy as np


def normal(v: float) -> bool:
    """Magnitudes the package supports: squares must not underflow (|x| > 1e-150 or exactly 0)."""
    return v == 0 or abs(v) > 1e-100


def sparsity(x, w=None) -> float:
    a = np.abs(np.asarray(x, dtype=np.float64))
    w = np.ones_like(a) if w is None else np.asarray(w, dtype=np.float64)
    nrm = np.linalg.norm(a)
    if nrm == 0:
        return 1.0
    return float((np.linalg.norm(w) - np.dot(w, a) / nrm) / (np.linalg.norm(w) - w.min()))


def _x_of_mu(a, w, beta, mu):
    u = np.maximum(a - mu * beta * w, 0.0)
    if np.any(u > 0):
        return u / np.linalg.norm(u)
    x = np.zeros_like(a)
    x[np.argmax(a - mu * beta * w)] = 1.0
    return x


def gsp_bruteforce(vectors, s, weights=None, iters=400):
    """Plain bisection on the shared dual variable, feasible end returned (no Newton, no active sets)."""
    a_list = [np.abs(np.asarray(v, dtype=np.float64)) for v in vectors]
    w_list = [np.ones_like(a) for a in a_list] if weights is None else [np.asarray(w, np.float64) for w in weights]
    betas = [1.0 / (np.linalg.norm(w) - w.min()) for w in w_list]
    r = len(a_list)

    def avg_sp(mu):
        return np.mean([sparsity(_x_of_mu(a, w, b, mu), w) if a.any() else 1.0
                        for a, w, b in zip(a_list, w_list, betas)])

    if np.mean([sparsity(v, w) for v, w in zip(vectors, w_list)]) >= s:
        return [np.array(v, dtype=np.float64) for v in vectors], 0.0
    lo, hi = 0.0, max(a.max() / (w.min() * b) for a, w, b in zip(a_list, w_list, betas)) + 1.0
    while avg_sp(hi) < s:
        lo, hi = hi, 2 * hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):
            break
        if avg_sp(mid) >= s:
            hi = mid
        else:
            lo = mid
    out = []
    for v, a, w, b in zip(vectors, a_list, w_list, betas):
        if not a.any():
            out.append(np.zeros_like(a))
            continue
        x = _x_of_mu(a, w, b, hi)
        out.append(np.sign(np.asarray(v, np.float64)) * x * np.dot(x, a))
    assert r == len(out)
    return out, hi


def each_bruteforce(v, s, iters=300):
    """Nearest point with Hoyer sparsity exactly s and the same l2 norm, by bisection on the threshold."""
    a = np.abs(np.asarray(v, dtype=np.float64))
    n = a.size
    nrm = np.linalg.norm(a)
    if nrm == 0:
        return np.zeros_like(a)

    def sp(t):
        u = np.maximum(a - t, 0.0)
        if not u.any():
            return 1.0
        return (np.sqrt(n) - u.sum() / np.linalg.norm(u)) / (np.sqrt(n) - 1)

    lo, hi = -nrm, a.max()
    while sp(lo) > s:
        lo *= 2
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if sp(mid) >= s:
            hi = mid
        else:
            lo = mid
    u = np.maximum(a - hi, 0.0)
    if not u.any():
        u = np.zeros_like(a)
        u[np.argmax(a)] = 1.0
    return np.where(np.asarray(v) < 0, -1.0, 1.0) * u / np.linalg.norm(u) * nrm  # zeros that grow take +


def _unit_max(a, w, t):
    """max over unit x >= 0 of <a - t w, x> (the per-vector Lagrangian), computed on a normalized copy."""
    d = a - t * w
    pos = np.maximum(d, 0.0)
    return float(np.linalg.norm(pos)) if pos.any() else float(d.max())


def dual_bound(vectors, s, weights=None, grid=4000):
    """min over mu >= 0 of the Lagrangian dual D(mu) = sum_i max_x <a_i - mu beta_i w_i, x> + mu k: an upper bound on
    the objective sum_i <|c_i|, x_i> of every feasible point (weak duality). Vectors must be of moderate scale.
    D is convex in mu: a coarse grid, then golden-section refinement."""
    a_list = [np.abs(np.asarray(v, dtype=np.float64)) for v in vectors]
    w_list = [np.ones_like(a) for a in a_list] if weights is None else [np.asarray(w, np.float64) for w in weights]
    betas = [1.0 / (np.linalg.norm(w) - w.min()) for w in w_list]
    k = sum(b * np.linalg.norm(w) for b, w in zip(betas, w_list)) - len(a_list) * s

    def D(mu):
        return sum(_unit_max(a, w, mu * b) for a, w, b in zip(a_list, w_list, betas)) + mu * k

    top = max(float((a / w).max()) / b for a, w, b in zip(a_list, w_list, betas)) * 1.5 + 1e-300
    mus = np.linspace(0.0, top, grid)
    vals = np.array([D(m) for m in mus])
    j = int(vals.argmin())
    lo, hi = mus[max(j - 1, 0)], mus[min(j + 1, grid - 1)]
    g = (np.sqrt(5) - 1) / 2
    for _ in range(200):
        m1, m2 = hi - g * (hi - lo), lo + g * (hi - lo)
        if D(m1) <= D(m2):
            hi = m2
        else:
            lo = m1
    return min(D(0.5 * (lo + hi)), float(vals.min()))


def kkt_mu(vectors, outputs, weights=None):
    """The dual variable each output vector certifies, as (mu_i, kind): for a vector with at least two distinct
    nonzero magnitudes, x_i proportional to (a - tau w)_+ gives tau by least squares and mu_i = tau / beta_i; works
    at any scale (each vector is normalized by its own peak first). kind: 'interior', 'flat' (threshold
    too small to read back), 'onehot', 'tied', 'zero'."""
    res = []
    for i, (c, z) in enumerate(zip(vectors, outputs)):
        a = np.abs(np.asarray(c, dtype=np.float64))
        zz = np.abs(np.asarray(z, dtype=np.float64))
        w = np.ones_like(a) if weights is None else np.asarray(weights[i], np.float64)
        w = w / w.max()
        beta = 1.0 / (np.linalg.norm(w) - w.min())
        pa = a.max()
        if pa == 0:
            res.append((np.nan, "zero"))
            continue
        pz = zz.max()
        if pz == 0:  # weighted: the one-hot may sit on a zero entry of lighter weight (alpha = 0)
            res.append((np.nan, "onehot"))
            continue
        an, zn = a / pa, zz / pz
        sup = zn > 0
        if sup.sum() == 1:
            res.append((np.nan, "onehot"))
            continue
        if np.ptp((an / w)[sup]) == 0:
            res.append((np.nan, "tied"))
            continue
        # zn_j = c (an_j - tau w_j) on the support: regress zn on [an, -w]
        A = np.stack([an[sup], -w[sup]], 1)
        (c0, ct), *_ = np.linalg.lstsq(A, zn[sup], rcond=None)
        tau = ct / c0
        # tau far below the entries is read back with relative error eps / tau: not a usable certificate
        res.append((tau * pa / beta, "interior" if tau > 1e-4 else "flat"))
    return res

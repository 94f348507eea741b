r"""Kullback-Leibler NMF with an average-sparsity target:
:math:`\min D(X \,\|\, WH + \varepsilon)` over W, H >= 0, with the grouped-sparsity constraint on either factor.

.. math:: D(X\|V) = \sum_{(i,j)\ \mathrm{observed}} x_{ij}\log\frac{x_{ij}}{v_{ij}} - x_{ij} + v_{ij},
          \qquad V = WH + \varepsilon,

with :math:`\varepsilon` = 1e-10 times the mean observed entry, which keeps D finite when the projection zeroes a
whole column of a factor (a fixed extra rank-one term; every statement below holds with it).

The scheme, and why it converges (monotonically):

* A factor **without** a target takes one multiplicative update (Lee & Seung),
  :math:`H \leftarrow H \circ W^\top(M\circ X / V) / (W^\top M)`. It minimizes a majorizer of D that touches D
  at the current H, so D never increases.
* A factor **with** a target takes one projected-gradient step with Armijo backtracking:
  :math:`H^+ = P_s(\max(0, H - t\nabla_H D))`, accepted only if
  :math:`D(H^+) \le D(H) - \frac{\sigma}{t}\|H^+ - H\|_F^2` (:math:`\sigma` = 1e-4), else t is halved (at most 40
  times; if no step is accepted H stays, which is feasible). The next step starts from 2t. Every accepted step
  lowers D by a definite amount, so D is monotone and bounded below, and the steps :math:`\|H^+ - H\|` go to 0.
  The test holds for all t below about 1/L (L: the local Lipschitz constant of the gradient, finite because
  V >= eps), so backtracking always ends; this is the standard sufficient-decrease argument for projected
  gradient onto a closed (here non-convex) set.
* A *projected* multiplicative update (MU followed by P_s) would not do: the MU majorizer is minimized over the
  unconstrained set, and projecting its minimizer can increase D (we measured increases), so there is no descent
  guarantee and no stopping certificate.
* Balancing the rank-one terms (``||W_:k|| = ||H_k:||``) leaves WH, hence D, unchanged, and keeps feasibility
  (sparsity is scale invariant).

``history`` holds :math:`\sqrt{2D}/\|X\|_F` (scikit-learn reports :math:`\sqrt{2D}` as ``reconstruction_err_``).
Dense (NumPy or torch, masked or not) and scipy.sparse X (never densified: V is formed at the stored entries only
and :math:`\sum_{ij} V_{ij} = (W^\top 1)^\top (H 1) + \varepsilon nm`).
"""

from __future__ import annotations

import math
import time

import numpy as np

from ._data import Data
from ._solvers import Factor, Options, balance, finish_info

SIGMA = 1e-4
MAX_HALVINGS = 40


class _Side:
    """D as a function of the right factor F (r x m) for data X (n x m) and a fixed left factor G (n x r)."""

    def __init__(self, X, Xcsr, M, ops, eps, xlogx_minus_x):
        self.X, self.Xcsr, self.ops, self.eps, self.const = X, Xcsr, ops, eps, xlogx_minus_x
        self.Mf = None if M is None else (M.astype(np.float64) if ops.name == "numpy" else M.to(ops.dtype))
        if Xcsr is not None:
            self.rows = np.repeat(np.arange(Xcsr.shape[0]), np.diff(Xcsr.indptr))

    def _v_at_data(self, G, F):
        """V where X is stored (sparse) or everywhere (dense)."""
        if self.Xcsr is None:
            return G @ F + self.eps
        X = self.Xcsr
        out = np.empty(X.nnz)
        step = 1 << 16
        for a in range(0, X.nnz, step):
            b = min(a + step, X.nnz)
            out[a:b] = np.einsum("ik,ki->i", G[self.rows[a:b]], F[:, X.indices[a:b]])
        return out + self.eps

    def value(self, G, F) -> float:
        ops = self.ops
        V = self._v_at_data(G, F)
        if self.Xcsr is not None:
            total = float(G.sum(0) @ F.sum(1)) + self.eps * self.Xcsr.shape[0] * self.Xcsr.shape[1]
            return self.const - float(self.Xcsr.data @ np.log(V)) + total
        total = ops.vdot(self.Mf, V) if self.Mf is not None else float(V.sum())
        return self.const - ops.vdot(self.X, ops.log(V)) + total

    def grad_parts(self, G, F):
        """(G^T (M o X / V), G^T M): the gradient is their difference, MU their ratio."""
        V = self._v_at_data(G, F)
        if self.Xcsr is not None:
            Q = self.Xcsr.copy()
            Q.data = Q.data / V
            num = np.ascontiguousarray((Q.T @ G).T)
        else:
            num = G.T @ (self.X / V)  # hidden entries of X are 0
        den = G.T @ self.Mf if self.Mf is not None else G.sum(0)[:, None]
        return num, den


def _mu_step(side, G, Fac: Factor) -> None:
    num, den = side.grad_parts(G, Fac.F)
    ops = Fac.ops
    Fac.F = Fac.F * num / ops.where(den > 0, den, 1.0 + 0.0 * den)


def _pg_step(side, G, Fac: Factor, f0: float) -> float:
    """One Armijo-backtracked projected-gradient step on F; returns D at the (accepted or kept) F."""
    ops = Fac.ops
    num, den = side.grad_parts(G, Fac.F)
    grad = den - num
    if Fac.t is None:  # first step: move the factor by about 10 % of its norm
        gn = ops.norm(grad)
        Fac.t = 0.1 * ops.norm(Fac.F) / gn if gn > 0 else 1.0
    t = Fac.t * 2.0
    for _ in range(MAX_HALVINGS):
        Fn = Fac.proj(ops.clamp0(Fac.F - t * grad))
        d = Fn - Fac.F
        f1 = side.value(G, Fn)
        if math.isfinite(f1) and f1 <= f0 - SIGMA / t * ops.vdot(d, d):
            Fac.F, Fac.t = Fn, t
            return f1
        t *= 0.5
    Fac.t = t
    return f0


def factorize_kl(D: Data, Wt0, H0, opts: Options, callback=None):
    """The KL scheme from ``(W^T, H)``; returns the best ``(W^T, H)`` and info (``history`` monotone)."""
    t0 = time.perf_counter()
    ops = D.ops
    X = D.X
    if D.sparse:
        data = X.data
        n_obs, xsum = X.shape[0] * X.shape[1], float(data.sum())
        const = float(np.sum(data * np.log(data))) - xsum
        eps = 1e-10 * xsum / n_obs
        sideH = _Side(None, X, None, ops, eps, const)
        sideW = _Side(None, D.Xt, None, ops, eps, const)
    else:
        Mn = D.M
        n_obs = float(Mn.sum()) if Mn is not None else X.shape[0] * X.shape[1]
        xsum = float(X.sum())
        pos = X > 0
        const = float(ops.where(pos, X * ops.log(ops.where(pos, X, 1.0 + 0.0 * X)), 0.0 * X).sum()) - xsum
        eps = 1e-10 * xsum / n_obs
        sideH = _Side(X, None, Mn, ops, eps, const)
        sideW = _Side(D.Xt, None, None if Mn is None else Mn.T, ops, eps, const)
    Wf = Factor(ops.copy(Wt0), opts.sparsity_W, opts, ops)
    Hf = Factor(ops.copy(H0), opts.sparsity_H, opts, ops)
    Wf.t = Hf.t = None
    if opts.update_W:
        # Scale W so sum(WH) matches sum(X) over the observed entries: D's best multiple of a fixed WH.
        if D.sparse:
            tot = float(Wf.F.sum(1) @ Hf.F.sum(1))
        else:
            V = Wf.F.T @ Hf.F
            tot = float(V.sum()) if D.M is None else ops.vdot(sideH.Mf, V)
        if tot > 0:
            Wf.F = Wf.F * (xsum / tot)
        Wf.start()
    if opts.update_H:
        Hf.start()
    xnorm = math.sqrt(D.xnorm2) if D.xnorm2 > 0 else 1.0

    def rel(f):
        return math.sqrt(2 * max(f, 0.0)) / xnorm

    f = sideH.value(Wf.F.T, Hf.F)
    history = [rel(f)]
    best = (f, 0, ops.copy(Wf.F), ops.copy(Hf.F))
    converged = False
    n_iter = 0
    for it in range(1, opts.max_iter + 1):
        n_iter = it
        if opts.balance and opts.update_W and opts.update_H:
            balance(Wf, Hf)
        if opts.update_W:  # W^T is the right factor of X^T ~ H^T W^T
            if Wf.proj.s is None:
                _mu_step(sideW, Hf.F.T, Wf)
                f = None
            else:
                f = _pg_step(sideW, Hf.F.T, Wf, sideW.value(Hf.F.T, Wf.F))
        if opts.update_H:
            if Hf.proj.s is None:
                _mu_step(sideH, Wf.F.T, Hf)
                f = None
            else:
                f = _pg_step(sideH, Wf.F.T, Hf, f if f is not None else sideH.value(Wf.F.T, Hf.F))
        if f is None:
            f = sideH.value(Wf.F.T, Hf.F)
        new = rel(f)
        history.append(new)
        if callback is not None:
            callback(it, new)
        if f < best[0] or not opts.keep_best:
            best = (f, it, ops.copy(Wf.F), ops.copy(Hf.F))
        prev, cur = history[-2], new
        if cur == 0.0 or (opts.tol > 0 and abs(prev - cur) <= opts.tol * max(prev, 1e-300)):
            converged = True
            break
    f, best_it, Wt_best, H_best = best
    info = finish_info(dict(n_iter=n_iter, reconstruction_err=math.sqrt(2 * max(f, 0.0)),
                            history=np.asarray(history), converged=converged, best_iter=best_it),
                       Wf, Hf, Wt_best, H_best, t0)
    return Wt_best, H_best, info

r"""Kullback-Leibler NMF with an average-sparsity target:
:math:`\min D(X \,\|\, WH + \varepsilon)` over W, H >= 0, with the grouped-sparsity constraint on either factor.

.. math:: D(X\|V) = \sum_{(i,j)\ \mathrm{observed}} x_{ij}\log\frac{x_{ij}}{v_{ij}} - x_{ij} + v_{ij},
          \qquad V = WH + \varepsilon,

with :math:`\varepsilon` = 1e-10 times the mean observed entry, which keeps D finite when the projection zeroes a
whole column of a factor (a fixed extra rank-one term; every statement below holds with it).

The scheme, and why the objective never increases:

* A factor **without** a target takes one multiplicative update (Lee & Seung),
  :math:`H \leftarrow H \circ W^\top(M\circ X / V) / (W^\top M)`. It minimizes a majorizer of D that touches D
  at the current H, so D never increases (this is scikit-learn's ``solver="mu"`` step; our iterates match it).
* A factor **with** a target takes one *scaled projected-gradient* step with Armijo backtracking: trial points
  :math:`H(t) = P_s(\min(\max(0, H - t\, S \circ \nabla_H D), 2h_{\max}))` with the multiplicative-update
  scaling :math:`S = (H + \delta)/(W^\top M)` (:math:`\delta` = 0.1 of the row's largest entry, so entries the
  projection zeroed can come back; the cap :math:`2h_{\max}` at twice the row's largest entry stops an entry of
  a column no component covers, whose gradient is about x/eps, from swallowing the row), accepted only if
  :math:`D(H(t)) \le D(H) - \frac{\sigma}{t}\|H(t) - H\|^2_{S^{-1}}` (:math:`\sigma` = 1e-4); otherwise t is
  halved, at most 40 times, and H stays (feasible) if nothing passes. t starts at min(1, 2 t_prev). At t = 1
  and without the cap the trial is the projected multiplicative update, so where that update is good it is
  taken at once. Every accepted step lowers D by a definite amount, so D is monotone and bounded below and the
  accepted steps go to 0; for t small the trial stays near H (the projection leaves a feasible H unchanged and is
  continuous there) and the test holds, which is the usual sufficient-decrease argument for (scaled) projected
  gradient (Bonettini et al.'s scaled gradient projection); GSP's set is not convex, so we claim monotone
  decrease and stationarity of limit points only in that sense, not global optimality.
* Projected multiplicative updates alone (MU, then P_s) have no such guarantee: the MU majorizer is minimized
  over the unconstrained set and projecting its minimizer can raise D. The acceptance test is what makes the
  step safe; ``info.notes[0]["halvings"]`` records how often it had to backtrack.
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
from ._fastproj import dot_at
from ._solvers import Factor, Options, balance, finish_info

SIGMA = 1e-4
MAX_HALVINGS = 40
DELTA = 0.1  # revival floor of the scaling, relative to the row maximum
WARMUP = 10  # unconstrained multiplicative updates before the start is projected (targets only)


class _Side:
    """D as a function of the right factor F (r x m) for data X (n x m) and a fixed left factor G (n x r)."""

    def __init__(self, X, Xcsr, M, ops, eps, xlogx_minus_x):
        self.X, self.Xcsr, self.ops, self.eps, self.const = X, Xcsr, ops, eps, xlogx_minus_x
        self.Mf = None if M is None else (M.astype(np.float64) if ops.name == "numpy" else M.to(ops.dtype))

    def _v_at_data(self, G, F):
        """V where X is stored (sparse) or everywhere (dense)."""
        if self.Xcsr is None:
            return G @ F + self.eps
        X = self.Xcsr
        out = np.empty(X.nnz)
        dot_at(X.indptr, X.indices, np.ascontiguousarray(G), np.ascontiguousarray(F.T), self.eps, out)
        return out

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


def sparse_side(D: Data) -> _Side:
    """D as a function of H for a scipy.sparse X (every unstored entry an observed zero): the solver's objective
    and the estimator's sparse KL score."""
    data = D.X.data
    xsum = float(data.sum())
    return _Side(None, D.X, None, D.ops, 1e-10 * xsum / (D.n * D.m), float(np.sum(data * np.log(data))) - xsum)


def _mu_step(side, G, Fac: Factor) -> None:
    num, den = side.grad_parts(G, Fac.F)
    ops = Fac.ops
    Fac.F = Fac.F * num / ops.where(den > 0, den, 1.0 + 0.0 * den)


def _pg_step(side, G, Fac: Factor, f0: float) -> float:
    """One scaled projected-gradient step on F with Armijo backtracking; returns D at the (accepted or kept) F.

    Trial points F(t) = P_s(max(0, F - t S o grad)) with the multiplicative-update scaling S = (F + delta) / den:
    at t = 1 this is the projected multiplicative update (delta aside), the natural step length of KL; delta
    (0.1 of the row's largest entry) lets entries that the projection zeroed come back. A trial is accepted
    only if it lowers D by sigma ||F(t) - F||^2_{S^-1} / t; otherwise t is halved.
    """
    ops = Fac.ops
    num, den = side.grad_parts(G, Fac.F)
    grad = den - num
    top = Fac.F.max(1, keepdims=True) if ops.name == "numpy" else Fac.F.amax(1, keepdim=True)
    S = (Fac.F + DELTA * top + 1e-300) / ops.where(den > 0, den, 1.0 + 0.0 * den)
    t = min(1.0, 2.0 * Fac.t)  # grow back toward the multiplicative step after backtracking
    for h in range(MAX_HALVINGS):
        trial = ops.clamp0(Fac.F - t * (S * grad))
        # Entries at zero see gradients up to x/eps where no component covers a column; capping the trial at
        # twice the row's largest entry keeps one such entry from swallowing the row in the projection.
        trial = ops.where(trial > 2 * top, 2 * top + 0.0 * trial, trial)
        Fn = Fac.proj(trial)
        d = Fn - Fac.F
        f1 = side.value(G, Fn)
        if math.isfinite(f1) and f1 <= f0 - SIGMA / t * ops.vdot(d, d / S):
            Fac.F, Fac.t = Fn, t
            Fac.halvings.append(h)
            return f1
        t *= 0.5
    Fac.t = max(t, 2.0**-30)  # nothing passed (near stationary): keep the next start from decaying to 0
    Fac.halvings.append(MAX_HALVINGS)
    return f0


def factorize_kl(D: Data, Wt0, H0, opts: Options, callback=None):
    """The KL scheme from ``(W^T, H)``; returns the best ``(W^T, H)`` and info (``history`` monotone)."""
    t0 = time.perf_counter()
    ops = D.ops
    X = D.X
    if D.sparse:
        sideH = sparse_side(D)
        sideW = _Side(None, D.Xt, None, ops, sideH.eps, sideH.const)
        xsum = float(X.data.sum())
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
    Wf.t = Hf.t = 1.0
    Wf.halvings, Hf.halvings = [], []  # backtracking per accepted step: how often projected MU alone fails
    if opts.update_W:
        # Scale W so sum(WH) matches sum(X) over the observed entries: D's best multiple of a fixed WH.
        if D.sparse:
            tot = float(Wf.F.sum(1) @ Hf.F.sum(1))
        else:
            V = Wf.F.T @ Hf.F
            tot = float(V.sum()) if D.M is None else ops.vdot(sideH.Mf, V)
        if tot > 0:
            Wf.F = Wf.F * (xsum / tot)
    if opts.update_W and opts.update_H and (Wf.proj.s is not None or Hf.proj.s is not None):
        # Projecting a random start picks random supports, and KL cannot move a support far: an entry outside
        # it only returns through the small delta of the scaling (measured: topics stayed random word lists).
        # A few unconstrained multiplicative updates first let the data choose the supports; D is monotone
        # from the projected point on.
        for _ in range(WARMUP):
            balance(Wf, Hf)
            _mu_step(sideW, Hf.F.T, Wf)
            _mu_step(sideH, Wf.F.T, Hf)
    if opts.update_W:
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
    info.notes.append(dict(halvings=Wf.halvings + Hf.halvings))
    return Wt_best, H_best, info

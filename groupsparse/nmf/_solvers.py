r"""Alternating solvers for (sparse) NMF: the shared core of :class:`SparseNMF` and :func:`sparse_nmf`.

Orientation (scikit-learn's): ``X`` is (n, m), ``W`` is (n, r), ``H`` is (r, m). Both factors are handled as
*row factors* ``F`` of shape (r, p), ``F = W.T`` or ``F = H``, so one set of updates serves both: each
subproblem is the nonnegative least squares

.. math:: \min_{F \ge 0}\ \tfrac12 \langle A, F F^\top\rangle - \langle B, F\rangle,
          \qquad A = G^\top G \ (r\times r),\ B = G^\top X_{(\cdot)}\ (r\times p)

with ``G`` the other factor. A sparsity target constrains the *rows* of ``F`` (the columns of ``W`` or the rows of
``H``), so every projection is ``project(F, s, axis=1)``.

Update rules (REFERENCE.md §4):

* ``"hals"``: accelerated HALS, exact coordinate (row) updates, sweeps stop when a sweep moves less than
  ``delta**2`` times what the first sweep moved (at most ``max_inner`` sweeps); a row that becomes all zero is
  reset to a tiny positive value so its component can come back.
* ``"fgm"``: Nesterov's fast gradient on the NNLS subproblem, step ``1/L`` with ``L = ||A||_2``, followed by a
  projection ``P`` (identity for the unconstrained NeNMF-like solver, GSP for ``"group"``, the per-vector
  projection for ``"column"``); momentum restarts every outer iteration; at most ``max_inner`` steps, stopping when
  a step is shorter than ``inner_ratio`` times the first.
* ``"l1"``: HALS with a per-row l1 penalty ``lam_k``; every outer iteration all penalties are multiplied by
  ``1 + l1_rate`` when the average sparsity is below target and by ``1 - l1_rate`` otherwise, which steers the
  average sparsity to the target (approximately, and only in the long run).

The outer loops live in ``_frobenius.py`` (Frobenius loss) and ``_kl.py`` (Kullback-Leibler).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ._data import NumpyOps
from ._fastproj import _hals_rows, fgm_rows, gsp_rows_warm

FREE_SOLVERS = ("hals", "fgm")
PROJECTIONS = ("group", "column", "l1")
BETA_LOSSES = ("frobenius", "kullback-leibler")


def _hals_rows_torch(F, A, B, lam, max_sweeps, delta2):
    """The same sweeps as :func:`_hals_rows` with tensor rows (any device), in place."""
    r = F.shape[0]
    first = 0.0
    for sweep in range(max_sweeps):
        moved = 0.0
        for k in range(r):
            akk = float(A[k, k])
            if akk <= 0.0:
                continue
            g = B[k] - lam[k] - A[k] @ F
            new = (F[k] + g / akk).clamp(min=0)
            moved += float(((new - F[k]) ** 2).sum())
            if not bool((new > 0).any()):
                top = float(F.max())
                new.fill_(1e-16 * top if top > 0 else 1e-16)
            F[k] = new
        if sweep == 0:
            first = moved
        elif moved <= delta2 * first:
            break


def row_sparsity(F) -> np.ndarray:
    """Hoyer sparsity of each row (a zero row counts as 1, as in the projection core); NumPy or torch rows."""
    if not isinstance(F, np.ndarray):
        F = F.detach().cpu().double().numpy()
    p = F.shape[1]
    l1 = np.abs(F).sum(axis=1)
    l2 = np.sqrt(np.einsum("ij,ij->i", F, F))
    sq = math.sqrt(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        sp = (sq - l1 / l2) / (sq - 1.0)
    return np.where(l2 > 0, sp, 1.0)


class Projector:
    """The projection P applied after every (fast) gradient step on a constrained row factor.

    ``"group"``: GSP (average sparsity of the rows >= s, least-squares rescaled by the core). ``"column"``: every
    row exactly at s via ``project_each``, then rescaled by the same least-squares factor ``<x, c>/||x||^2`` so the
    two projections differ only in how sparsity is shared. ``None``: identity. ``mu`` is the last GSP root, the
    warm start of the next compiled solve.
    """

    def __init__(self, sparsity: float | None, kind: str, ops=None):
        self.s = sparsity
        self.kind = kind
        self.ops = ops or NumpyOps()
        self.calls = 0
        self.fallbacks = 0
        self.seconds = 0.0
        self.mu = 0.0

    def __call__(self, F):
        if self.s is None or F.shape[1] < 2:
            return F
        t0 = time.perf_counter()
        self.calls += 1
        out = None
        if self.kind == "group" and self.ops.name == "numpy":
            out = np.empty_like(F)
            status, mu = gsp_rows_warm(np.ascontiguousarray(F), self.s, self.mu, 1e-12, 100, out)
            if status == 1:
                self.mu = mu
            elif status < 0:
                out = None
                self.fallbacks += 1
        if out is None:
            out, mu = self.ops.project(F, self.s, self.kind, self.mu)
            if mu is not None:
                self.mu = float(mu)
        if self.kind == "column":
            num = (out * F).sum(1)
            den = (out * out).sum(1)
            out = out * self.ops.where(den > 0, num / self.ops.where(den > 0, den, 1.0), 0.0 * den)[:, None]
        self.seconds += time.perf_counter() - t0
        return out


def fast_gradient(F, A, B, proj: Callable, max_inner: int, inner_ratio: float, ops=None):
    """Projected Nesterov fast gradient on the NNLS subproblem from ``F``; returns the new factor and steps."""
    ops = ops or NumpyOps()
    L = ops.eigmax(A)
    if not L > 0:
        return F, 0
    Y = F
    alpha = 0.1
    first = None
    steps = 0
    for _ in range(max_inner):
        steps += 1
        Fn = proj(ops.clamp0(Y - (A @ Y - B) * (1.0 / L)))
        step = ops.norm(Fn - F)
        alpha_next = 0.5 * (math.sqrt(alpha**4 + 4 * alpha**2) - alpha**2)
        beta = alpha * (1 - alpha) / (alpha**2 + alpha_next)
        alpha = alpha_next
        Y = Fn + beta * (Fn - F)
        F = Fn
        if first is None:
            first = step
        elif step <= inner_ratio * first:
            break
    return F, steps


@dataclass
class Options:
    """Solver options shared by the estimator and the function (validated by the caller)."""

    sparsity_W: float | None = None
    sparsity_H: float | None = None
    projection: str = "group"
    free_solver: str = "hals"
    beta_loss: str = "frobenius"
    max_iter: int = 200
    tol: float = 1e-4
    max_inner: int = 10
    inner_ratio: float = 0.1
    hals_delta: float = 0.1
    l1_rate: float = 0.01
    l1_start: float = 0.01
    balance: bool = True
    keep_best: bool = True
    update_W: bool = True
    update_H: bool = True


@dataclass
class NMFInfo:
    """What a run did. ``history[i]`` is the relative error after i iterations (``history[0]``: the start):
    ||X - WH||_F / ||X||_F over the observed entries, or for KL sqrt(2 D(X || WH)) / ||X||_F (the 'beta
    divergence' scale scikit-learn reports)."""

    n_iter: int
    reconstruction_err: float
    history: np.ndarray
    converged: bool
    best_iter: int
    sparsity_W: float
    sparsity_H: float
    seconds: float
    projection_seconds: float = 0.0
    projection_calls: int = 0
    projection_fallbacks: int = 0  # subproblems the compiled GSP path handed to groupsparse.project (ties)
    notes: list = field(default_factory=list)


class Factor:
    """One row factor (W.T or H) and how it is updated on the NNLS subproblem (A, B)."""

    def __init__(self, F, sparsity: float | None, opts: Options, ops=None):
        self.F = F
        self.s = sparsity
        self.opts = opts
        self.ops = ops or NumpyOps()
        if sparsity is None or opts.projection == "l1":
            self.proj = Projector(None, "group", self.ops)
        else:
            self.proj = Projector(sparsity, opts.projection, self.ops)
        self.l1 = sparsity is not None and opts.projection == "l1"
        self.lam = None

    def start(self) -> None:
        """Make the starting point feasible."""
        self.F = self.proj(self.F)

    def _hals(self, A, B, lam) -> None:
        o = self.opts
        if self.ops.name == "numpy":
            _hals_rows(self.F, A, B, lam, o.max_inner, o.hals_delta**2)
        else:
            _hals_rows_torch(self.F, A, B, lam, o.max_inner, o.hals_delta**2)

    def update(self, A, B) -> None:
        o = self.opts
        if self.l1:
            # The penalty is relative to each row's data term max(B_k): the balancing step rescales the factors
            # every iteration, so an absolute penalty would change meaning from one iteration to the next.
            if self.lam is None:
                self.lam = np.full(A.shape[0], o.l1_start)
            else:
                avg = float(np.mean(row_sparsity(self.F)))
                self.lam *= (1.0 + o.l1_rate) if avg < self.s else (1.0 - o.l1_rate)
            bmax = np.maximum(self.ops.to_numpy(B.max(axis=1) if self.ops.name == "numpy" else B.max(dim=1).values),
                              0.0)
            self._hals(A, B, self.ops.asarray(self.lam * bmax))
        elif self.s is None and o.free_solver == "hals":
            self._hals(A, B, self.ops.asarray(np.zeros(A.shape[0])))
        else:
            mode = self.proj.kind if self.proj.s is not None else None
            if mode in (None, "group") and self.ops.name == "numpy":
                L = float(np.linalg.eigvalsh(A)[-1])
                if L > 0:
                    s = self.proj.s if mode == "group" else 0.0
                    F, _, ok, mu = fgm_rows(self.F, A, B, L, s, mode == "group", o.max_inner, o.inner_ratio,
                                            self.proj.mu)
                    if ok:
                        self.F = F
                        self.proj.mu = mu
                        return
                    self.proj.fallbacks += 1
            self.F, _ = fast_gradient(self.F, A, B, self.proj, o.max_inner, o.inner_ratio, self.ops)


def finish_info(info_kw: dict, Wf: Factor, Hf: Factor, Wt_best, H_best, t0: float) -> NMFInfo:
    """NMFInfo with the sparsities of the returned factors and the projection counters of both factors."""
    return NMFInfo(
        **info_kw,
        sparsity_W=float(np.mean(row_sparsity(Wt_best))) if Wt_best.shape[1] > 1 else float("nan"),
        sparsity_H=float(np.mean(row_sparsity(H_best))) if H_best.shape[1] > 1 else float("nan"),
        seconds=time.perf_counter() - t0,
        projection_seconds=Wf.proj.seconds + Hf.proj.seconds,
        projection_calls=Wf.proj.calls + Hf.proj.calls,
        projection_fallbacks=Wf.proj.fallbacks + Hf.proj.fallbacks,
    )


def balance(Wf: Factor, Hf: Factor) -> None:
    """Scale each rank-one term so ||W_:k|| = ||H_k:|| (WH unchanged; the grouped projection is not scale
    invariant, so the balance decides how the sparsity budget is shared)."""
    ops = Wf.ops
    nw = ops.rownorm(Wf.F)
    nh = ops.rownorm(Hf.F)
    ok = (nw > 0) & (nh > 0)
    d = ops.where(ok, nh / ops.where(ok, nw, 1.0), 1.0 + 0.0 * nh) ** 0.5
    Wf.F = Wf.F * d[:, None]
    Hf.F = Hf.F / d[:, None]

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

The error comes from products that the last update already formed,
``||X||^2 - 2<H, W^T X> + <W^T W, H H^T>``, so an iteration never forms ``WH``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numba as nb
import numpy as np

from ..projection import project, project_each
from ._fastproj import _fgm_rows, gsp_rows

FREE_SOLVERS = ("hals", "fgm")
PROJECTIONS = ("group", "column", "l1")


@nb.njit(cache=True)
def _hals_rows(F, A, B, lam, max_sweeps, delta2):
    """In place: HALS sweeps over the rows of F for min 1/2<A, FF^T> - <B - lam 1^T, F>, F >= 0.

    Returns the number of sweeps. The residual row is built with the row index outermost so the inner loops
    stream over contiguous rows of F and B.
    """
    r, p = F.shape
    g = np.empty(p)
    first = 0.0
    sweeps = 0
    for sweep in range(max_sweeps):
        sweeps += 1
        moved = 0.0
        for k in range(r):
            akk = A[k, k]
            if akk <= 0.0:
                continue
            for j in range(p):
                g[j] = B[k, j] - lam[k]
            for l in range(r):
                alk = A[k, l]
                if alk != 0.0:
                    for j in range(p):
                        g[j] -= alk * F[l, j]
            nonzero = False
            for j in range(p):
                old = F[k, j]
                new = old + g[j] / akk
                if new < 0.0:
                    new = 0.0
                else:
                    nonzero = nonzero or new > 0.0
                d = new - old
                moved += d * d
                F[k, j] = new
            if not nonzero:
                # A dead row would stay dead forever (its A_kk from the other side goes to 0); a tiny positive
                # value lets the next update of the other factor revive the component.
                top = 0.0
                for l in range(r):
                    for j in range(p):
                        top = max(top, F[l, j])
                tiny = 1e-16 * top if top > 0.0 else 1e-16
                for j in range(p):
                    F[k, j] = tiny
        if sweep == 0:
            first = moved
        elif moved <= delta2 * first:
            break
    return sweeps


def _row_sparsity(F: np.ndarray) -> np.ndarray:
    """Hoyer sparsity of each row (a zero row counts as 1, as in the projection core)."""
    p = F.shape[1]
    l1 = np.abs(F).sum(axis=1)
    l2 = np.sqrt(np.einsum("ij,ij->i", F, F))
    sq = math.sqrt(p)
    with np.errstate(invalid="ignore", divide="ignore"):
        sp = (sq - l1 / l2) / (sq - 1.0)
    return np.where(l2 > 0, sp, 1.0)


class Projector:
    """The projection P applied after every fast-gradient step on a constrained row factor.

    ``"group"``: GSP (average sparsity of the rows >= s, least-squares rescaled by the core). ``"column"``: every
    row exactly at s via ``project_each``, then rescaled by the same least-squares factor ``<x, c>/||x||^2`` so the
    two projections differ only in how sparsity is shared. ``None``: identity.
    """

    def __init__(self, sparsity: float | None, kind: str):
        self.s = sparsity
        self.kind = kind
        self.calls = 0
        self.fallbacks = 0
        # The compiled path covers float64 factors; anything else goes through the core.
        self.fast = True
        self.seconds = 0.0

    def __call__(self, F: np.ndarray) -> np.ndarray:
        if self.s is None or F.shape[1] < 2:
            return F
        t0 = time.perf_counter()
        if self.kind == "group":
            self.calls += 1
            out = gsp_rows(F, self.s) if self.fast else None
            if out is None:
                self.fallbacks += 1
                out = project(F, self.s, axis=1)
        else:
            self.calls += 1
            out = project_each(F, self.s, axis=1)
            num = np.einsum("ij,ij->i", out, F)
            den = np.einsum("ij,ij->i", out, out)
            out *= np.divide(num, den, out=np.zeros_like(num), where=den > 0)[:, None]
        self.seconds += time.perf_counter() - t0
        return out


def fast_gradient(F: np.ndarray, A: np.ndarray, B: np.ndarray, proj: Callable[[np.ndarray], np.ndarray],
                  max_inner: int, inner_ratio: float) -> tuple[np.ndarray, int]:
    """Projected Nesterov fast gradient on the NNLS subproblem from ``F``; returns the new factor and steps."""
    L = float(np.linalg.eigvalsh(A)[-1])
    if not L > 0:
        return F, 0
    Y = F
    alpha = 0.1
    first = None
    steps = 0
    for _ in range(max_inner):
        steps += 1
        G = A @ Y
        G -= B
        Fn = Y - G * (1.0 / L)
        np.maximum(Fn, 0.0, out=Fn)
        Fn = proj(Fn)
        step = float(np.linalg.norm(Fn - F))
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
    """What a run did. ``history[i]`` is ||X - WH||_F / ||X||_F after i iterations (``history[0]``: the start)."""

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


class _Factor:
    """One row factor (W.T or H) and how it is updated."""

    def __init__(self, F: np.ndarray, sparsity: float | None, opts: Options):
        self.F = F
        self.s = sparsity
        self.opts = opts
        if sparsity is None or opts.projection == "l1":
            self.proj = Projector(None, "group")
        else:
            self.proj = Projector(sparsity, opts.projection)
        self.l1 = sparsity is not None and opts.projection == "l1"
        self.lam: np.ndarray | None = None

    def start(self) -> None:
        """Make the starting point feasible."""
        self.F = self.proj(self.F)

    def update(self, A: np.ndarray, B: np.ndarray) -> None:
        o = self.opts
        if self.l1:
            # The penalty is relative to each row's data term max(B_k): the balancing step rescales the factors
            # every iteration, so an absolute penalty would change meaning from one iteration to the next.
            if self.lam is None:
                self.lam = np.full(A.shape[0], o.l1_start)
            else:
                avg = float(np.mean(_row_sparsity(self.F)))
                self.lam *= (1.0 + o.l1_rate) if avg < self.s else (1.0 - o.l1_rate)
            lam = self.lam * np.maximum(B.max(axis=1), 0.0)
            _hals_rows(self.F, A, B, lam, o.max_inner, o.hals_delta**2)
        elif self.s is None and o.free_solver == "hals":
            _hals_rows(self.F, A, B, np.zeros(A.shape[0]), o.max_inner, o.hals_delta**2)
        else:
            mode = self.proj.kind if self.proj.s is not None else None
            if mode in (None, "group"):
                L = float(np.linalg.eigvalsh(A)[-1])
                if L > 0:
                    s = self.proj.s if mode == "group" else 0.0
                    F, _, ok = _fgm_rows(self.F, A, B, L, s, mode == "group", o.max_inner, o.inner_ratio)
                    if ok:
                        self.F = F
                        return
                    self.proj.fallbacks += 1
            self.F, _ = fast_gradient(self.F, A, B, self.proj, o.max_inner, o.inner_ratio)


def _rel(err2: float, xnorm2: float) -> float:
    return math.sqrt(max(err2, 0.0) / xnorm2) if xnorm2 > 0 else 0.0


def factorize(X: np.ndarray, W: np.ndarray, H: np.ndarray, opts: Options,
              callback: Callable[[int, float], None] | None = None) -> tuple[np.ndarray, np.ndarray, NMFInfo]:
    """Run the alternating scheme from ``(W, H)`` (float64, not modified); return the best ``(W, H)`` and info.

    Per outer iteration: balance the rank-one terms (``||W_:k|| = ||H_k:||``; sparsity is scale invariant but the
    grouped projection is not, so the balance decides how the sparsity budget is shared), update W, then H
    (the paper's H then W when its X is passed transposed), then the error from cached products.
    """
    t0 = time.perf_counter()
    X = np.ascontiguousarray(X, dtype=np.float64)
    Xt = np.ascontiguousarray(X.T)
    xnorm2 = float(np.einsum("ij,ij->", X, X))
    Wf = _Factor(np.array(W, dtype=np.float64, order="C").T.copy(), opts.sparsity_W, opts)
    Hf = _Factor(np.array(H, dtype=np.float64, order="C"), opts.sparsity_H, opts)

    # Scale W so WH best fits X in least squares (a random start is off by an arbitrary factor), then make the
    # start feasible.
    if opts.update_W:
        WtX = Wf.F @ X
        WtW = Wf.F @ Wf.F.T
        HHt = Hf.F @ Hf.F.T
        den = float(np.einsum("ij,ij->", WtW, HHt))
        a = float(np.einsum("ij,ij->", WtX, Hf.F)) / den if den > 0 else 1.0
        if a > 0 and math.isfinite(a):
            Wf.F *= a
    if opts.update_W:
        Wf.start()
    if opts.update_H:
        Hf.start()

    def error2(Wt: np.ndarray, H_: np.ndarray) -> float:
        WtX = Wt @ X
        return xnorm2 - 2 * float(np.einsum("ij,ij->", WtX, H_)) + float(np.einsum("ij,ij->", Wt @ Wt.T, H_ @ H_.T))

    err = _rel(error2(Wf.F, Hf.F), xnorm2)
    history = [err]
    best = (err, 0, Wf.F.copy(), Hf.F.copy())
    converged = False
    n_iter = 0
    for it in range(1, opts.max_iter + 1):
        n_iter = it
        if opts.balance and opts.update_W and opts.update_H:
            nw = np.sqrt(np.einsum("ij,ij->i", Wf.F, Wf.F))
            nh = np.sqrt(np.einsum("ij,ij->i", Hf.F, Hf.F))
            ok = (nw > 0) & (nh > 0)
            d = np.sqrt(np.divide(nh, nw, out=np.ones_like(nh), where=ok))
            Wf.F *= d[:, None]
            Hf.F /= d[:, None]
        if opts.update_W:
            HHt = Hf.F @ Hf.F.T
            HXt = Hf.F @ Xt
            Wf.update(HHt, HXt)
        if opts.update_H:
            WtW = Wf.F @ Wf.F.T
            WtX = Wf.F @ X
            Hf.update(WtW, WtX)
            e2 = xnorm2 - 2 * float(np.einsum("ij,ij->", WtX, Hf.F)) + float(
                np.einsum("ij,ij->", WtW, Hf.F @ Hf.F.T))
        else:
            e2 = xnorm2 - 2 * float(np.einsum("ij,ij->", HXt, Wf.F)) + float(
                np.einsum("ij,ij->", HHt, Wf.F @ Wf.F.T))
        new = _rel(e2, xnorm2)
        history.append(new)
        if callback is not None:
            callback(it, new)
        if new < best[0] or not opts.keep_best:
            best = (new, it, Wf.F.copy(), Hf.F.copy())
        prev, err = err, new
        if new == 0.0 or (opts.tol > 0 and abs(prev - new) <= opts.tol * max(prev, 1e-300)):
            converged = opts.tol > 0 or new == 0.0
            break
    err, best_it, Wt_best, H_best = best
    W_out = Wt_best.T.copy()
    info = NMFInfo(
        n_iter=n_iter,
        reconstruction_err=err * math.sqrt(xnorm2),
        history=np.asarray(history),
        converged=converged,
        best_iter=best_it,
        sparsity_W=float(np.mean(_row_sparsity(Wt_best))) if Wt_best.shape[1] > 1 else float("nan"),
        sparsity_H=float(np.mean(_row_sparsity(H_best))) if H_best.shape[1] > 1 else float("nan"),
        seconds=time.perf_counter() - t0,
        projection_seconds=Wf.proj.seconds + Hf.proj.seconds,
        projection_calls=Wf.proj.calls + Hf.proj.calls,
        projection_fallbacks=Wf.proj.fallbacks + Hf.proj.fallbacks,
    )
    return W_out, H_best, info

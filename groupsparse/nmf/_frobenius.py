r"""The alternating loop for the Frobenius loss, :math:`\min \|M \circ (X - WH)\|_F^2` (M = 1: every entry).

Missing entries (M = 0) are handled by majorization (EM imputation): before each factor update the hidden entries
of X are replaced by the current model, :math:`\tilde X = M\circ X + (1 - M)\circ WH`. Because

.. math:: \|\tilde X - W'H\|_F^2 = \|M\circ(X - W'H)\|_F^2 + \|(1-M)\circ(WH - W'H)\|_F^2
          \ \ge\ \|M\circ(X - W'H)\|_F^2

with equality at the current W, any update that lowers the surrogate lowers the masked objective, so every
solver (HALS, fast gradient) and projection works unchanged on :math:`\tilde X`. Values at hidden entries never
enter (they are stored as 0 and replaced). Without a mask the error comes from products the updates already
formed, ``||X||^2 - 2<H, W^T X> + <W^T W, H H^T>``, so an iteration never forms ``WH`` (a sparse X stays sparse).
"""

from __future__ import annotations

import math
import time
from typing import Callable

import numpy as np

from ._data import Data
from ._fastproj import run_dense
from ._solvers import Factor, NMFInfo, Options, balance, finish_info


def err2_from_products(D: Data, WtW, WtX, H) -> float:
    """||X - WH||_F^2 = ||X||^2 - 2<W^T X, H> + <W^T W, H H^T> (fully observed X; never forms WH)."""
    return D.xnorm2 - 2 * D.ops.vdot(WtX, H) + D.ops.vdot(WtW, H @ H.T)


def _rel(err2: float, xnorm2: float) -> float:
    return math.sqrt(max(err2, 0.0) / xnorm2) if xnorm2 > 0 else 0.0


class _Imputed:
    """X with its hidden entries filled by the current model (dense only): the surrogate's data."""

    def __init__(self, D: Data):
        self.D = D
        self.WH = None

    def fill(self, Wt, H):
        self.WH = Wt.T @ H
        self.Xf = self.D.ops.where(self.D.M, self.D.X, self.WH)

    def err2(self) -> float:
        R = self.D.ops.where(self.D.M, self.D.X - self.WH, 0.0 * self.WH)
        return self.D.ops.vdot(R, R)


def _compiled_ok(D: Data, opts: Options, callback) -> bool:
    """The whole loop runs compiled for dense, fully observed NumPy X with GSP or no targets, no callback."""
    return (D.ops.name == "numpy" and not D.sparse and D.M is None and callback is None and opts.keep_best
            and (opts.projection == "group" or (opts.sparsity_W is None and opts.sparsity_H is None)))


def _run_compiled(D: Data, Wf, Hf, opts: Options, history: list, best: tuple):
    """Iterations in :func:`run_dense`; on a tie it stops before the iteration that needs ``groupsparse.project``
    and the Python loop takes over from there. Returns (iterations done, converged, best)."""
    hist = np.empty(opts.max_iter + 1)
    hist[0] = history[0]
    bW, bH = best[2].copy(), best[3].copy()
    mus = np.array([Wf.proj.mu, Hf.proj.mu])
    sW = -1.0 if opts.sparsity_W is None else opts.sparsity_W
    sH = -1.0 if opts.sparsity_H is None else opts.sparsity_H
    done, best_it, converged, ok, Wt, H = run_dense(
        D.X, D.Xt, np.ascontiguousarray(Wf.F), np.ascontiguousarray(Hf.F), sW, sH, opts.free_solver == "fgm",
        opts.update_W, opts.update_H, opts.balance, opts.max_iter, opts.tol, opts.max_inner, opts.inner_ratio,
        opts.hals_delta**2, D.xnorm2, hist, bW, bH, mus)
    Wf.F, Hf.F = Wt, H
    Wf.proj.mu, Hf.proj.mu = float(mus[0]), float(mus[1])
    Hf.proj.calls += 0 if ok else 1
    history[:] = list(hist[: done + 1])
    if best_it > 0:
        best = (hist[best_it], best_it, bW, bH)
    if not ok:
        Wf.proj.fallbacks += opts.sparsity_W is not None
        Hf.proj.fallbacks += opts.sparsity_H is not None
    return done, converged, best


def factorize(D: Data, Wt0, H0, opts: Options, callback: Callable[[int, float], None] | None = None):
    """Run the alternating scheme from ``(W^T, H)`` (not modified); return the best ``(W^T, H)`` and info.

    Per outer iteration: balance the rank-one terms, update W, then H (the paper's H then W when its X is passed
    transposed), then the error.
    """
    t0 = time.perf_counter()
    ops = D.ops
    masked = D.M is not None
    Wf = Factor(ops.copy(Wt0), opts.sparsity_W, opts, ops)
    Hf = Factor(ops.copy(H0), opts.sparsity_H, opts, ops)
    imp = _Imputed(D) if masked else None

    def products_W(H):  # (H H^T, H X^T) for the W update
        if masked:
            return H @ H.T, H @ imp.Xf.T
        return H @ H.T, D.HXt(H)

    def products_H(Wt):
        if masked:
            return Wt @ Wt.T, Wt @ imp.Xf
        return Wt @ Wt.T, D.WtX(Wt)

    def error2(Wt, H, WtW=None, WtX=None):
        if masked:
            imp.fill(Wt, H)
            return imp.err2()
        if WtX is None:
            WtW, WtX = products_H(Wt)
        return err2_from_products(D, WtW, WtX, H)

    # Scale W so WH best fits X in least squares (a random start is off by an arbitrary factor), then make the
    # start feasible.
    if opts.update_W:
        if masked:
            imp.fill(Wf.F, Hf.F)
            WH = imp.WH
            den = ops.vdot(ops.where(D.M, WH, 0.0 * WH), WH)
            a = ops.vdot(D.X, WH) / den if den > 0 else 1.0
        else:
            WtW, WtX = products_H(Wf.F)
            den = ops.vdot(WtW, Hf.F @ Hf.F.T)
            a = ops.vdot(WtX, Hf.F) / den if den > 0 else 1.0
        if a > 0 and math.isfinite(a):
            Wf.F = Wf.F * a
        Wf.start()
    if opts.update_H:
        Hf.start()

    err = _rel(error2(Wf.F, Hf.F), D.xnorm2)
    history = [err]
    best = (err, 0, ops.copy(Wf.F), ops.copy(Hf.F))
    converged = False
    n_iter = 0
    it0 = 1
    if _compiled_ok(D, opts, callback):
        done, converged, best = _run_compiled(D, Wf, Hf, opts, history, best)
        n_iter = done
        it0 = opts.max_iter + 1 if converged or done == opts.max_iter else done + 1
        err = history[-1]
    for it in range(it0, opts.max_iter + 1):
        n_iter = it
        if opts.balance and opts.update_W and opts.update_H:
            balance(Wf, Hf)
        if opts.update_W:
            Wf.update(*products_W(Hf.F))
        if opts.update_H:
            if masked:
                imp.fill(Wf.F, Hf.F)
            WtW, WtX = products_H(Wf.F)
            Hf.update(WtW, WtX)
            e2 = error2(Wf.F, Hf.F, WtW, WtX)  # masked: refills from the new H, products unused
        else:
            e2 = error2(Wf.F, Hf.F)
        new = _rel(e2, D.xnorm2)
        history.append(new)
        if callback is not None:
            callback(it, new)
        if new < best[0] or not opts.keep_best:
            best = (new, it, ops.copy(Wf.F), ops.copy(Hf.F))
        prev, err = err, new
        if new == 0.0 or (opts.tol > 0 and abs(prev - new) <= opts.tol * max(prev, 1e-300)):
            converged = opts.tol > 0 or new == 0.0
            break
    err, best_it, Wt_best, H_best = best
    info = finish_info(dict(n_iter=n_iter, reconstruction_err=err * math.sqrt(D.xnorm2), history=np.asarray(history),
                            converged=converged, best_iter=best_it), Wf, Hf, Wt_best, H_best, t0)
    return Wt_best, H_best, info

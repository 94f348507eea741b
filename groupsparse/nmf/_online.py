r"""Minibatch fitting (``SparseNMF.partial_fit``), the estimator's ``score`` and a held-out error for choosing
``n_components`` and sparsity targets by cross-validation on hidden entries.

Online NMF (Mairal et al. 2010; scikit-learn's ``MiniBatchNMF``): for a block :math:`X_b` the coefficients
:math:`W_b` are solved with H fixed, then :math:`A \leftarrow \rho A + W_b^\top W_b`,
:math:`B \leftarrow \rho B + W_b^\top \tilde X_b` (:math:`\tilde X_b`: the block with hidden entries filled by
:math:`W_b H`, the same majorization as the batch solver), and H takes one update of the NNLS subproblem
:math:`\min_H \tfrac12\langle A, HH^\top\rangle - \langle B, H\rangle` under its sparsity target.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.sparse as sp
from sklearn.base import clone
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_is_fitted

from ._data import is_torch, to_numpy
from ._estimator import _check_factor, _params, _run, _validated
from ._frobenius import err2_from_products
from ._input import start_factor, to_output
from ._kl import sparse_side
from ._solvers import Factor, row_sparsity
from ._params import check_beta_loss, check_real


def partial_fit(est, X, H=None, mask=None):
    # after ``fit`` (or earlier blocks) the components go on from ``components_``, as scikit-learn's MiniBatchNMF
    first = not hasattr(est, "components_")
    prep = _validated(est, X, mask, reset=first, need_cols=False)
    p = est.get_params()
    rho = check_real("forget_factor", p["forget_factor"], 0, 1, lo_open=True)
    opts, r = _params(p, True, prep.D.n, prep.D.m)
    if not first:
        if H is not None:
            raise ValueError("H: got starting components for a fitted estimator, expected H only on the first "
                             "partial_fit (components_ go on from the fit; clone the estimator to start over)")
        r_fit = est.components_.shape[0]
        if p["n_components"] is not None and r != r_fit:
            raise ValueError(f"n_components: got {p['n_components']}, expected {r_fit} (the fitted components_) "
                             "to continue with partial_fit; call fit to start over")
        r = r_fit
    if opts.beta_loss != "frobenius":
        raise ValueError(f"beta_loss: got {opts.beta_loss!r} with partial_fit, expected 'frobenius'")
    if getattr(est, "_online", None) is None:  # (H given by the caller: the statistics start with this block)
        est._online = dict(A=None, B=None, steps=0)
    ops = prep.D.ops
    if first:
        if H is not None:
            H0 = _check_factor("H", H, (r, prep.D.m))
        else:
            # scikit-learn's scale for a random start: entries of WH about the mean of X.
            scale = math.sqrt(prep.D.xnorm2 / (prep.D.n * prep.D.m)) / math.sqrt(r)
            H0 = check_random_state(p["random_state"]).random_sample((r, prep.D.m)) * scale
        Hf = Factor(start_factor(H0, prep), opts.sparsity_H, opts, ops)
        Hf.start()
        est.components_ = to_output(Hf.F, prep)
    state = est._online
    # (the components in this block's kind of array: blocks may alternate NumPy and torch)
    H_cur = start_factor(to_numpy(est.components_), prep)
    W_b, _, _ = _run(prep, {**p, "tol": max(p["tol"], 1e-4)}, H=to_output(H_cur, prep), update_H=False,
                     estimator_name=type(est).__name__)
    A, B = _stats(prep, start_factor(to_numpy(W_b).T, prep), H_cur)
    if state["A"] is not None:
        A, B = rho * ops.asarray(state["A"]) + A, rho * ops.asarray(state["B"]) + B
    state["A"], state["B"] = to_numpy(A), to_numpy(B)  # (kept in NumPy: the next block may be a tensor, or not)
    Hf = Factor(H_cur, opts.sparsity_H, opts, ops)
    Hf.update(A, B)
    state["steps"] += 1
    est.components_ = to_output(Hf.F, prep)
    est.n_components_ = r
    est.n_steps_ = state["steps"]
    est.sparsity_H_ = float(np.mean(row_sparsity(Hf.F))) if prep.D.m > 1 else float("nan")
    return est


def _stats(prep, Wt, H):
    """A = W^T W and B = W^T X~ of the data in ``prep`` (X~: hidden entries filled by W H)."""
    D = prep.D
    if D.M is not None:
        return Wt @ Wt.T, Wt @ D.ops.where(D.M, D.X, Wt.T @ H)
    return Wt @ Wt.T, D.WtX(Wt)


def seed_from_fit(est, prep, W, H) -> None:
    """After ``fit`` (Frobenius loss): the fitted data's statistics as those of a first block, so a later
    ``partial_fit`` weighs a new block against the whole fit, not against nothing (one block would otherwise
    move H as if it were all the data)."""
    if est.get_params()["beta_loss"] != "frobenius":
        est._online = None
        return
    A, B = _stats(prep, start_factor(to_numpy(W).T, prep), start_factor(to_numpy(H), prep))
    est._online = dict(A=to_numpy(A), B=to_numpy(B), steps=0)


def _observed_error(X, W, H, M, beta_loss):
    """(sum of the loss over observed entries, number of observed entries), NumPy float64."""
    V = W @ H
    if M is None:
        M = np.ones(X.shape, dtype=bool)
    x, v = X[M], V[M]
    if beta_loss == "frobenius":
        return float(np.sum((x - v) ** 2)), int(M.sum())
    v = v + 1e-10 * max(float(x.mean()), 1e-300)
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(x > 0, x * np.log(x / v), 0.0)
    return float(np.sum(t - x + v)), int(M.sum())


def _sparse_loss(D, W, H, loss):
    """The loss over all entries of a sparse X without densifying: cached products (Frobenius) or the KL
    solver's own objective (WH at the stored entries)."""
    if loss == "frobenius":
        return err2_from_products(D, W.T @ W, D.WtX(W.T), H)
    return sparse_side(D).value(W, H)


def _numpy(a):
    if is_torch(a):
        return a.detach().cpu().double().numpy()
    return a.toarray() if hasattr(a, "toarray") else np.asarray(a, dtype=np.float64)


def score(est, X, mask=None):
    check_is_fitted(est)
    loss = check_beta_loss(est.beta_loss)
    prep = _validated(est, X, mask, reset=False, need_cols=False)
    W, _, _ = _run(prep, est.get_params(), H=est.components_, update_H=False)  # transform, on the checked X
    if prep.D.sparse:
        total = _sparse_loss(prep.D, np.asarray(W, dtype=np.float64), np.asarray(est.components_, np.float64), loss)
        count = prep.D.n * prep.D.m
        return -math.sqrt(max(total, 0.0) / count) if loss == "frobenius" else -total / count
    M = None if prep.D.M is None else _numpy(prep.D.M).astype(bool)
    total, count = _observed_error(_numpy(prep.D.X), _numpy(W), _numpy(est.components_), M, loss)
    return -math.sqrt(total / count) if loss == "frobenius" else -total / count


def heldout_error(estimator, X, *, fraction=0.1, n_splits=3, mask=None, random_state=None):
    """Error on entries hidden from the fit, for choosing ``n_components`` or a sparsity target.

    Each split hides a random ``fraction`` of the observed entries of X (dense array or tensor), fits a clone of ``estimator``
    with them masked, and measures the root-mean-square error (Frobenius) or the mean KL divergence per entry
    on the hidden entries. Returns an array of ``n_splits`` errors (lower is better).
    """
    fraction = check_real("fraction", fraction, 0, 1, lo_open=True, hi_open=True)
    if isinstance(n_splits, bool) or not isinstance(n_splits, int) or n_splits < 1:
        raise ValueError(f"n_splits: got {n_splits!r}, expected an int >= 1")
    if sp.issparse(X):
        raise ValueError("X: got a scipy.sparse matrix, expected a dense array or tensor (hidden entries need a mask)")
    loss = check_beta_loss(estimator.get_params().get("beta_loss", "frobenius"))
    Xn = _numpy(X)
    observed = ~np.isnan(Xn)
    if mask is not None:
        observed &= np.asarray(mask, dtype=bool)
    rng = check_random_state(random_state)
    errors = []
    for _ in range(n_splits):
        hide = observed & (rng.random_sample(Xn.shape) < fraction)
        est = clone(estimator)
        W = est.fit_transform(X, mask=observed & ~hide)
        total, count = _observed_error(np.where(hide, Xn, 0.0), _numpy(W), _numpy(est.components_), hide, loss)
        count = max(count, 1)
        errors.append(math.sqrt(total / count) if loss == "frobenius" else total / count)
    return np.asarray(errors)

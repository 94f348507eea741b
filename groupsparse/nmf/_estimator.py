r"""Sparse NMF with grouped sparse projection: the :class:`SparseNMF` estimator and its twin :func:`sparse_nmf`."""

from __future__ import annotations

import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

from ._data import is_torch, to_numpy
from ._frobenius import factorize
from ._input import prepare, start_factor, to_output
from ._kl import factorize_kl
from ._params import INITS, OBJECTIVE_DOC, PARAMS_DOC, check_choice, check_int, options
from ._solvers import NMFInfo

_DTYPES = [np.float64, np.float32]


def _plain(A) -> bool:
    """A 2-D, non-empty float ndarray: what ``check_array`` would return unchanged (its checks, through narwhals,
    cost ~0.3 ms a call, measured: 2 % of a 500-iteration fit at 100 x 100)."""
    return type(A) is np.ndarray and A.ndim == 2 and A.dtype in _DTYPES and A.shape[0] > 0 and A.shape[1] > 0


def _check_factor(name, A, shape):
    if A is None:
        raise ValueError(f"{name}: got None with init='custom', expected an array of shape {shape}")
    if _plain(A) and A.shape == shape and 0.0 <= A.min() and A.max() < np.inf:  # NaN fails both: slow path
        return np.asarray(A, dtype=np.float64)
    if is_torch(A):
        A = A.detach().cpu().numpy()
    A = check_array(A, dtype=_DTYPES, input_name=name)
    if A.shape != shape:
        raise ValueError(f"{name}: got shape {A.shape}, expected {shape}")
    check_non_negative(A, f"{name} (initial factor)")
    return np.asarray(A, dtype=np.float64)


def _params(p: dict, update_H: bool, n: int, m: int, H=None):
    opts = options(p)
    r = check_int("n_components", p["n_components"], 1, allow_none=True)
    if r is None:
        r = m if update_H else H.shape[0]
    if opts.sparsity_H is not None and m < 2 and update_H:
        raise ValueError(f"sparsity_H: got a target for rows of length n_features={m}, expected n_features >= 2")
    if opts.sparsity_W is not None and n < 2:
        raise ValueError(f"sparsity_W: got a target for columns of length n_samples={n}, expected n_samples >= 2")
    if opts.beta_loss == "kullback-leibler" and opts.projection == "l1":
        raise ValueError("projection: got 'l1' with beta_loss='kullback-leibler', expected 'group' or 'column'")
    opts.update_H = update_H
    return opts, r


def _run(prep, p: dict, W=None, H=None, *, update_H=True, estimator_name="SparseNMF", callback=None):
    """The core shared by ``SparseNMF.fit``/``transform``/``partial_fit`` and ``sparse_nmf``."""
    D = prep.D
    n, m = D.n, D.m
    opts, r = _params(p, update_H, n, m, H)
    init = check_choice("init", p["init"], INITS)
    verbose = check_int("verbose", int(p["verbose"]) if isinstance(p["verbose"], bool) else p["verbose"], 0)
    rng = check_random_state(p["random_state"])
    if not update_H:  # transform: H is the fitted components_, W starts random
        H0 = H.detach().cpu().double().numpy() if is_torch(H) else np.asarray(H, dtype=np.float64)
        W0 = rng.random_sample((n, H0.shape[0]))
    else:
        custom = init == "custom" or (init is None and (W is not None or H is not None))
        if init == "random" and (W is not None or H is not None):
            raise ValueError("W, H: got starting factors with init='random', expected init='custom' or None")
        if custom:
            W0 = _check_factor("W", W, (n, r))
            H0 = _check_factor("H", H, (r, m))
        else:
            W0 = rng.random_sample((n, r))
            H0 = rng.random_sample((r, m))
    if callback is not None and not callable(callback):
        raise TypeError(f"callback: got {callback!r}, expected a callable (iteration, relative_error) or None")
    if verbose:
        every = max(1, 50 // verbose)
        user_cb = callback

        def callback(it, err):
            if it % every == 0:
                print(f"[{estimator_name}] iteration {it:5d}  relative error {err:.6e}")
            if user_cb is not None:
                user_cb(it, err)

    if D.xnorm2 == 0:
        # Nothing to fit: the exact factorization is zero (and a relative error would divide by zero).
        Wt_out, H_out = 0 * start_factor(W0.T, prep), start_factor(H0, prep) * (0 if update_H else 1)
        info = NMFInfo(0, 0.0, np.zeros(1), True, 0, 1.0, 1.0, 0.0)
    else:
        solve = factorize_kl if opts.beta_loss == "kullback-leibler" else factorize
        Wt_out, H_out, info = solve(D, start_factor(W0.T, prep), start_factor(H0, prep), opts, callback)
    if opts.tol > 0 and not info.converged:
        warnings.warn(
            f"{estimator_name}: maximum number of iterations {opts.max_iter} reached before the relative error "
            f"settled (tol={opts.tol}); increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
    return to_output(Wt_out.T, prep), to_output(H_out, prep), info


def _validated(est, X, mask, reset, need_cols):
    """scikit-learn's checks for NumPy/scipy input (NaN allowed: missing), ours for torch; then :func:`prepare`."""
    if is_torch(X):
        if reset:
            est.n_features_in_ = int(X.shape[1])
        elif X.ndim == 2 and X.shape[1] != est.n_features_in_:
            raise ValueError(f"X: got {X.shape[1]} features, expected {est.n_features_in_}")
    else:
        X = validate_data(est, X, dtype=_DTYPES, accept_sparse=("csr", "csc"), ensure_all_finite=False,
                          reset=reset)
    return prepare(X, mask, name=type(est).__name__, need_cols=need_cols)


class SparseNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    __doc__ = (
        r"""Non-negative matrix factorization with an average-Hoyer-sparsity constraint (gspNMF).
"""
        + OBJECTIVE_DOC
        + r"""
    Parameters
    ----------"""
        + PARAMS_DOC
        + r"""
    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        H, the best iterate.
    reconstruction_err_ : float
        :math:`\|X - WH\|_F` over the observed entries at the returned factors; KL: :math:`\sqrt{2D}` (as
        scikit-learn).
    n_iter_ : int
        Outer iterations run.
    history_ : ndarray of shape (n_iter_ + 1,)
        Relative error :math:`\|X - WH\|_F / \|X\|_F` (observed entries; KL: :math:`\sqrt{2D}/\|X\|_F`) at the
        start and after every iteration.
    best_iter_ : int
        Iteration of the returned iterate.
    sparsity_W_, sparsity_H_ : float
        Achieved average Hoyer sparsity of the columns of W and of the rows of H.
    n_features_in_ : int
    n_steps_ : int
        Blocks seen by :meth:`partial_fit` since the last ``fit`` (only after ``partial_fit``).
    feature_names_in_ : ndarray of str, only when X has string feature names.

    See Also
    --------
    sparse_nmf : the same computation as a function.
    heldout_error : error on hidden entries, for choosing ``n_components`` and targets by cross-validation.
    groupsparse.project : the grouped sparse projection.

    Examples
    --------
    >>> import numpy as np
    >>> from groupsparse.nmf import SparseNMF
    >>> X = np.random.default_rng(0).random((60, 40))
    >>> model = SparseNMF(5, sparsity_H=0.6, max_iter=100, tol=0, random_state=0)
    >>> W = model.fit_transform(X)
    >>> W.shape, model.components_.shape, model.sparsity_H_ >= 0.6 - 1e-9
    ((60, 5), (5, 40), True)
    """
    )

    def __init__(self, n_components=None, *, sparsity_H=None, sparsity_W=None, projection="group", init=None,
                 max_iter=200, tol=1e-4, random_state=None, verbose=0, solver="hals", max_inner=10,
                 inner_ratio=0.1, hals_delta=0.1, l1_rate=0.01, balance=True, beta_loss="frobenius",
                 forget_factor=0.7):
        self.n_components = n_components
        self.sparsity_H = sparsity_H
        self.sparsity_W = sparsity_W
        self.projection = projection
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose
        self.solver = solver
        self.max_inner = max_inner
        self.inner_ratio = inner_ratio
        self.hals_delta = hals_delta
        self.l1_rate = l1_rate
        self.balance = balance
        self.beta_loss = beta_loss
        self.forget_factor = forget_factor

    def _set_fitted(self, H_out, info):
        self.components_ = H_out
        self.n_components_ = H_out.shape[0]
        self.reconstruction_err_ = float(info.reconstruction_err)
        self.n_iter_ = int(info.n_iter)
        self.history_ = info.history
        self.best_iter_ = int(info.best_iter)
        self.sparsity_W_ = float(info.sparsity_W)
        self.sparsity_H_ = float(info.sparsity_H)

    def fit_transform(self, X, y=None, W=None, H=None, mask=None):
        """Fit to X and return W (n_samples, n_components).

        ``X``: array-like (NaN = missing), scipy.sparse CSR/CSC or a torch tensor. ``W``/``H``: starting factors
        (init="custom"). ``mask``: bool array of X's shape, True = observed (hidden entries are ignored)."""
        prep = _validated(self, X, mask, reset=True, need_cols=True)
        W_out, H_out, info = _run(prep, self.get_params(), W, H)
        self._set_fitted(H_out, info)
        from ._online import seed_from_fit

        seed_from_fit(self, prep, W_out, H_out)
        self.__dict__.pop("n_steps_", None)  # (partial_fit's count since the last fit)
        return W_out

    def fit(self, X, y=None, W=None, H=None, mask=None):
        """Fit to X (n_samples, n_features); returns self. See :meth:`fit_transform` for the arguments."""
        self.fit_transform(X, y, W=W, H=H, mask=mask)
        return self

    def transform(self, X, mask=None):
        """W for new data with ``components_`` fixed (same solver and loss, targets on W applied to the new
        samples). Rows may have missing entries (NaN or ``mask``), not all of them."""
        check_is_fitted(self)
        prep = _validated(self, X, mask, reset=False, need_cols=False)
        W_out, _, _ = _run(prep, self.get_params(), H=self.components_, update_H=False)
        return W_out

    def partial_fit(self, X, y=None, H=None, mask=None):
        """Update the components with one block of rows (data larger than memory); returns self.

        Online NMF in the style of scikit-learn's ``MiniBatchNMF``: the block's W is solved with H fixed, the
        statistics ``A = W^T W`` and ``B = W^T X`` are accumulated with weight ``forget_factor`` on the old ones,
        and H takes one update on them (the projected fast gradient when ``sparsity_H`` is set, so the target
        holds after every block). ``H`` may give the starting components on the first call; after :meth:`fit`
        the updates go on from its ``components_`` (``n_components`` must then be theirs). Frobenius loss only.
        """
        from ._online import partial_fit

        return partial_fit(self, X, H, mask)

    def score(self, X, y=None, mask=None):
        """Minus the root-mean-square error (Frobenius) or minus the mean KL divergence per entry over the
        observed entries of X, with W from :meth:`transform` (higher is better). For choosing ``n_components``
        or a sparsity target on entries hidden from the fit, see :func:`groupsparse.nmf.heldout_error`."""
        from ._online import score

        return score(self, X, mask)

    def inverse_transform(self, X):
        """Map W (n_samples, n_components) back to data space: ``X @ components_``."""
        check_is_fitted(self)
        if not is_torch(X):
            X = check_array(X, dtype=_DTYPES)
        r = self.components_.shape[0]
        if X.ndim != 2 or X.shape[1] != r:
            raise ValueError(f"X: got shape {tuple(X.shape)}, expected (n_samples, {r}) (n_components columns)")
        H = self.components_  # (W of either kind maps back in its own kind, whatever the model was fitted on)
        if is_torch(X):
            import torch

            H = torch.as_tensor(H, dtype=X.dtype, device=X.device)
        else:
            H = to_numpy(H)
        return X @ H

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.input_tags.allow_nan = True
        tags.input_tags.sparse = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def sparse_nmf(X, n_components=None, *, W=None, H=None, sparsity_H=None, sparsity_W=None, projection="group",
               init=None, max_iter=200, tol=1e-4, random_state=None, verbose=0, solver="hals", max_inner=10,
               inner_ratio=0.1, hals_delta=0.1, l1_rate=0.01, balance=True, beta_loss="frobenius", mask=None,
               callback=None):
    params = dict(n_components=n_components, sparsity_H=sparsity_H, sparsity_W=sparsity_W, projection=projection,
                  init=init, max_iter=max_iter, tol=tol, random_state=random_state, verbose=verbose, solver=solver,
                  max_inner=max_inner, inner_ratio=inner_ratio, hals_delta=hals_delta, l1_rate=l1_rate,
                  balance=balance, beta_loss=beta_loss)
    if not is_torch(X) and not _plain(X):
        X = check_array(X, dtype=_DTYPES, accept_sparse=("csr", "csc"), ensure_all_finite=False, input_name="X")
    prep = prepare(X, mask, name="sparse_nmf")
    return _run(prep, params, W, H, estimator_name="sparse_nmf", callback=callback)


sparse_nmf.__doc__ = (
    r"""Sparse NMF as a function: the same computation as :class:`SparseNMF` (``fit_transform``).
"""
    + OBJECTIVE_DOC
    + r"""
    Parameters
    ----------
    X : array-like (NaN = missing), scipy.sparse CSR/CSC or torch tensor of shape (n_samples, n_features)
        Non-negative; observed entries finite.
    W, H : array-like, optional
        Starting factors of shapes (n_samples, n_components) and (n_components, n_features) (init="custom")."""
    + PARAMS_DOC
    + r"""    mask : bool array of X's shape or None
        True = observed; hidden entries (and NaN) are ignored.
    callback : callable(iteration, relative_error) or None
        Called after every iteration (progress bars).

    Returns
    -------
    W : ndarray of shape (n_samples, n_components), X's dtype
    H : ndarray of shape (n_components, n_features), X's dtype
    info : NMFInfo
        ``n_iter``, ``reconstruction_err`` (:math:`\|X - WH\|_F`), ``history`` (relative errors from the start),
        ``converged``, ``best_iter``, ``sparsity_W``, ``sparsity_H``, ``seconds``.

    Examples
    --------
    >>> import numpy as np
    >>> from groupsparse.nmf import sparse_nmf
    >>> X = np.random.default_rng(0).random((50, 30))
    >>> W, H, info = sparse_nmf(X, 4, sparsity_H=0.5, max_iter=50, tol=0, random_state=0)
    >>> info.n_iter, info.sparsity_H >= 0.5 - 1e-9
    (50, True)
    """
)

r"""Sparse NMF with grouped sparse projection: the :class:`SparseNMF` estimator and its twin :func:`sparse_nmf`."""

from __future__ import annotations

import numbers
import warnings

import numpy as np
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, TransformerMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.utils import check_array, check_random_state
from sklearn.utils.validation import check_is_fitted, check_non_negative, validate_data

from ._solvers import FREE_SOLVERS, PROJECTIONS, NMFInfo, Options, factorize

INITS = (None, "random", "custom")

_OBJECTIVE_DOC = r"""
    Solves, for a non-negative :math:`X \in \mathbb{R}^{n \times m}` (n samples, m features),

    .. math::

        \min_{W \ge 0,\ H \ge 0} \ \|X - WH\|_F
        \quad\text{s.t.}\quad
        \frac1r \sum_{k=1}^{r} \mathrm{sp}(H_{k,:}) \ge s_H, \qquad
        \frac1r \sum_{k=1}^{r} \mathrm{sp}(W_{:,k}) \ge s_W,

    with :math:`W \in \mathbb{R}^{n\times r}`, :math:`H \in \mathbb{R}^{r\times m}` and the Hoyer sparsity
    :math:`\mathrm{sp}(x) = (\sqrt{d} - \|x\|_1/\|x\|_2)/(\sqrt{d} - 1)` of a vector of length :math:`d`. Only the
    *average* sparsity of a factor is fixed; each vector finds its own (the grouped sparse
    projection, REFERENCE.md §1-§4). A constraint whose target is ``None`` is absent.

    **Mapping to the paper.** The paper factors a features x samples matrix :math:`X_p \approx W_p H_p` with sparse
    *columns* of :math:`W_p` (e.g. basis images). Passing :math:`X = X_p^\top` here gives
    :math:`W = H_p^\top` and :math:`H = W_p^\top`: the paper's sparse columns of :math:`W_p` are the rows of
    ``components_`` and its target :math:`s` is ``sparsity_H``.

    Algorithm (REFERENCE.md §4): each iteration balances every rank-one term (:math:`\|W_{:,k}\| = \|H_{k,:}\|`),
    updates W then H, and computes the error from products the updates already formed. A factor without a target
    is updated by accelerated HALS (``solver="hals"``) or Nesterov's fast gradient (``"fgm"``, NeNMF-like); a
    factor with a target by the projected fast gradient, the projection being GSP (``projection="group"``) or
    every vector exactly at the target (``"column"``), or by HALS with an adaptive l1 penalty (``"l1"``, which
    steers the average sparsity to the target only approximately). The best iterate is returned.
"""

_PARAMS_DOC = r"""
    n_components : int or None, default=None
        Rank r. None: ``n_features``.
    sparsity_H : float in [0, 1] or None, default=None
        Target average Hoyer sparsity of the rows of H (``components_``). Needs ``n_features >= 2``.
    sparsity_W : float in [0, 1] or None, default=None
        Target average Hoyer sparsity of the columns of W. Needs ``n_samples >= 2``.
    projection : {"group", "column", "l1"}, default="group"
        How a target is enforced: grouped sparse projection (average at the target, each vector free), the
        column-wise baseline (every vector exactly at the target, ``groupsparse.project_each``), or the adaptive
        l1-penalized HALS baseline.
    init : {None, "random", "custom"}, default=None
        ``"random"``: uniform [0, 1) entries from ``random_state``, W then scaled to the least-squares best
        multiple. ``"custom"``: the ``W`` and ``H`` given to ``fit`` (also chosen by None when they are given).
        The start is projected once onto the constraints.
    max_iter : int, default=200
        Outer iterations (each updates W once and H once).
    tol : float >= 0, default=1e-4
        Stop when the relative error changes by at most ``tol`` times its previous value in one iteration.
        ``tol=0`` runs exactly ``max_iter`` iterations. Stopping at ``max_iter`` with ``tol > 0`` raises a
        :class:`~sklearn.exceptions.ConvergenceWarning`.
    random_state : int, RandomState instance or None, default=None
        Seed of the random start (and of the start of ``transform``).
    verbose : int, default=0
        Print the relative error every ``max(1, 50 // verbose)`` iterations.
    solver : {"hals", "fgm"}, default="hals"
        Update of a factor without a target: accelerated HALS or the fast gradient (NeNMF-like).
    max_inner : int, default=10
        Inner HALS sweeps or fast-gradient steps per factor update.
    inner_ratio : float in [0, 1), default=0.1
        Fast gradient: stop the inner loop when a step is shorter than this fraction of the first.
    hals_delta : float in [0, 1), default=0.1
        HALS: stop the sweeps when one moves less than ``hals_delta**2`` times the first sweep's squared change.
    l1_rate : float in (0, 1), default=0.01
        ``projection="l1"``: the penalties are multiplied by ``1 + l1_rate`` (too dense) or ``1 - l1_rate``.
    balance : bool, default=True
        Balance the rank-one terms before each iteration (the grouped projection depends on the scales).
"""


def _check_real(name, value, lo, hi, *, lo_open=False, hi_open=False, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not np.isfinite(value):
        raise TypeError(f"{name}: got {value!r}, expected a real number{' or None' if allow_none else ''}")
    bad = value < lo or value > hi or (lo_open and value == lo) or (hi_open and value == hi)
    if bad:
        lb = "(" if lo_open else "["
        rb = ")" if hi_open else "]"
        raise ValueError(f"{name}: got {value!r}, expected a value in {lb}{lo}, {hi}{rb}")
    return float(value)


def _check_int(name, value, lo, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: got {value!r}, expected an int{' or None' if allow_none else ''}")
    if value < lo:
        raise ValueError(f"{name}: got {value!r}, expected an int >= {lo}")
    return int(value)


def _check_choice(name, value, choices):
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{name}: got {value!r}, expected one of {choices}")
    return value


def _options(p: dict) -> Options:
    """Validate the parameters shared by the estimator and the function."""
    return Options(
        sparsity_W=_check_real("sparsity_W", p["sparsity_W"], 0, 1, allow_none=True),
        sparsity_H=_check_real("sparsity_H", p["sparsity_H"], 0, 1, allow_none=True),
        projection=_check_choice("projection", p["projection"], PROJECTIONS),
        free_solver=_check_choice("solver", p["solver"], FREE_SOLVERS),
        max_iter=_check_int("max_iter", p["max_iter"], 1),
        tol=_check_real("tol", p["tol"], 0, np.inf),
        max_inner=_check_int("max_inner", p["max_inner"], 1),
        inner_ratio=_check_real("inner_ratio", p["inner_ratio"], 0, 1, hi_open=True),
        hals_delta=_check_real("hals_delta", p["hals_delta"], 0, 1, hi_open=True),
        l1_rate=_check_real("l1_rate", p["l1_rate"], 0, 1, lo_open=True, hi_open=True),
        balance=bool(_check_choice("balance", p["balance"], (True, False))),
    )


def _check_factor(name, A, shape):
    if A is None:
        raise ValueError(f"{name}: got None with init='custom', expected an array of shape {shape}")
    A = check_array(A, dtype=[np.float64, np.float32], input_name=name)
    if A.shape != shape:
        raise ValueError(f"{name}: got shape {A.shape}, expected {shape}")
    check_non_negative(A, f"{name} (initial factor)")
    return np.asarray(A, dtype=np.float64)


def _run(X: np.ndarray, p: dict, W=None, H=None, *, update_H=True, estimator_name="SparseNMF", callback=None):
    """The core shared by ``SparseNMF.fit``/``transform`` and ``sparse_nmf`` (X already validated, finite)."""
    check_non_negative(X, f"{estimator_name} (input X)")
    opts = _options(p)
    n, m = X.shape
    r = _check_int("n_components", p["n_components"], 1, allow_none=True)
    if r is None:
        r = m if update_H else H.shape[0]
    init = _check_choice("init", p["init"], INITS)
    verbose = _check_int("verbose", int(p["verbose"]) if isinstance(p["verbose"], bool) else p["verbose"], 0)
    if opts.sparsity_H is not None and m < 2 and update_H:
        raise ValueError(f"sparsity_H: got a target for rows of length n_features={m}, expected n_features >= 2")
    if opts.sparsity_W is not None and n < 2:
        raise ValueError(f"sparsity_W: got a target for columns of length n_samples={n}, expected n_samples >= 2")
    rng = check_random_state(p["random_state"])
    if not update_H:  # transform: H is the fitted components_, W starts random
        H0 = np.asarray(H, dtype=np.float64)
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
    opts.update_H = update_H
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

    Xd = np.asarray(X, dtype=np.float64)
    if not np.any(Xd):
        # Nothing to fit: the exact factorization is zero (and a relative error would divide by zero).
        W_out, H_out = np.zeros_like(W0), (np.zeros_like(H0) if update_H else H0.copy())
        info = NMFInfo(0, 0.0, np.zeros(1), True, 0, 1.0, 1.0, 0.0)
    else:
        W_out, H_out, info = factorize(Xd, W0, H0, opts, callback)
    if opts.tol > 0 and not info.converged:
        warnings.warn(
            f"{estimator_name}: maximum number of iterations {opts.max_iter} reached before the relative error "
            f"settled (tol={opts.tol}); increase max_iter or tol",
            ConvergenceWarning,
            stacklevel=3,
        )
    return W_out.astype(X.dtype, copy=False), H_out.astype(X.dtype, copy=False), info


class SparseNMF(ClassNamePrefixFeaturesOutMixin, TransformerMixin, BaseEstimator):
    __doc__ = (
        r"""Non-negative matrix factorization with an average-Hoyer-sparsity constraint (gspNMF).
"""
        + _OBJECTIVE_DOC
        + r"""
    Parameters
    ----------"""
        + _PARAMS_DOC
        + r"""
    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        H, the best iterate.
    reconstruction_err_ : float
        :math:`\|X - WH\|_F` at the returned factors.
    n_iter_ : int
        Outer iterations run.
    history_ : ndarray of shape (n_iter_ + 1,)
        Relative error :math:`\|X - WH\|_F / \|X\|_F` at the start and after every iteration.
    best_iter_ : int
        Iteration of the returned iterate.
    sparsity_W_, sparsity_H_ : float
        Achieved average Hoyer sparsity of the columns of W and of the rows of H.
    n_features_in_ : int
    feature_names_in_ : ndarray of str, only when X has string feature names.

    See Also
    --------
    sparse_nmf : the same computation as a function.
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
                 inner_ratio=0.1, hals_delta=0.1, l1_rate=0.01, balance=True):
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

    def fit_transform(self, X, y=None, W=None, H=None):
        """Fit to X and return W (n_samples, n_components). ``W``/``H``: starting factors (init="custom")."""
        X = validate_data(self, X, dtype=[np.float64, np.float32])
        W_out, H_out, info = _run(X, self.get_params(), W, H)
        self.components_ = H_out
        self.n_components_ = H_out.shape[0]
        self.reconstruction_err_ = float(info.reconstruction_err)
        self.n_iter_ = int(info.n_iter)
        self.history_ = info.history
        self.best_iter_ = int(info.best_iter)
        self.sparsity_W_ = float(info.sparsity_W)
        self.sparsity_H_ = float(info.sparsity_H)
        return W_out

    def fit(self, X, y=None, W=None, H=None):
        """Fit to X (n_samples, n_features); returns self."""
        self.fit_transform(X, y, W=W, H=H)
        return self

    def transform(self, X):
        """W for new data with ``components_`` fixed (same solver, targets on W applied to the new samples)."""
        check_is_fitted(self)
        X = validate_data(self, X, dtype=[np.float64, np.float32], reset=False)
        W_out, _, _ = _run(X, self.get_params(), H=self.components_, update_H=False)
        return W_out

    def inverse_transform(self, X):
        """Map W (n_samples, n_components) back to data space: ``X @ components_``."""
        check_is_fitted(self)
        X = check_array(X, dtype=[np.float64, np.float32])
        if X.shape[1] != self.components_.shape[0]:
            raise ValueError(f"X: got {X.shape[1]} columns, expected n_components={self.components_.shape[0]}")
        return X @ self.components_

    @property
    def _n_features_out(self):
        return self.components_.shape[0]

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


def sparse_nmf(X, n_components=None, *, W=None, H=None, sparsity_H=None, sparsity_W=None, projection="group",
               init=None, max_iter=200, tol=1e-4, random_state=None, verbose=0, solver="hals", max_inner=10,
               inner_ratio=0.1, hals_delta=0.1, l1_rate=0.01, balance=True, callback=None):
    params = dict(n_components=n_components, sparsity_H=sparsity_H, sparsity_W=sparsity_W, projection=projection,
                  init=init, max_iter=max_iter, tol=tol, random_state=random_state, verbose=verbose, solver=solver,
                  max_inner=max_inner, inner_ratio=inner_ratio, hals_delta=hals_delta, l1_rate=l1_rate,
                  balance=balance)
    X = check_array(X, dtype=[np.float64, np.float32], input_name="X")
    return _run(X, params, W, H, estimator_name="sparse_nmf", callback=callback)


sparse_nmf.__doc__ = (
    r"""Sparse NMF as a function: the same computation as :class:`SparseNMF` (``fit_transform``).
"""
    + _OBJECTIVE_DOC
    + r"""
    Parameters
    ----------
    X : array-like of shape (n_samples, n_features), non-negative and finite
    W, H : array-like, optional
        Starting factors of shapes (n_samples, n_components) and (n_components, n_features) (init="custom")."""
    + _PARAMS_DOC
    + r"""    callback : callable(iteration, relative_error) or None
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

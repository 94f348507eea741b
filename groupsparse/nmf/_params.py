r"""Parameters of :class:`SparseNMF` and :func:`sparse_nmf`: their documentation and their validation."""

from __future__ import annotations

import numbers

import numpy as np

from ._solvers import BETA_LOSSES, FREE_SOLVERS, PROJECTIONS, Options

INITS = (None, "random", "custom")

OBJECTIVE_DOC = r"""
    Solves, for a non-negative :math:`X \in \mathbb{R}^{n \times m}` (n samples, m features),

    .. math::

        \min_{W \ge 0,\ H \ge 0} \ \sum_{(i,j) \in \Omega} \ell\big(X_{ij}, (WH)_{ij}\big)
        \quad\text{s.t.}\quad
        \frac1r \sum_{k=1}^{r} \mathrm{sp}(H_{k,:}) \ge s_H, \qquad
        \frac1r \sum_{k=1}^{r} \mathrm{sp}(W_{:,k}) \ge s_W,

    with :math:`W \in \mathbb{R}^{n\times r}`, :math:`H \in \mathbb{R}^{r\times m}` and the Hoyer sparsity
    :math:`\mathrm{sp}(x) = (\sqrt{d} - \|x\|_1/\|x\|_2)/(\sqrt{d} - 1)` of a vector of length :math:`d`. Only the
    *average* sparsity of a factor is fixed; each vector finds its own (the grouped sparse
    projection, REFERENCE.md §1-§4). A constraint whose target is ``None`` is absent. The loss is
    :math:`\ell(x, v) = \tfrac12 (x - v)^2` (``beta_loss="frobenius"``) or :math:`x\log(x/v) - x + v`
    (``"kullback-leibler"``, with :math:`v = (WH)_{ij} + \varepsilon`, a tiny :math:`\varepsilon` keeping it
    finite). :math:`\Omega` is the set of observed entries: all of them, or those that are not NaN and that
    ``mask`` (a fit argument) marks True.

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

    Missing entries (Frobenius) are handled by majorization: before each factor update the hidden entries are
    filled with the current model, so every solver and projection runs unchanged and the masked error never
    increases where the unconstrained updates are exact. With ``beta_loss="kullback-leibler"`` a factor without
    a target takes multiplicative updates and a factor with a target a projected-gradient step with Armijo
    backtracking; both never increase the objective (docs/nmf.md derives the scheme).

    Data: a dense array (NaN = missing), a ``scipy.sparse`` CSR/CSC matrix (never densified; stored zeros and
    implicit zeros are observed zeros) or a PyTorch tensor on any device (float32 or float64; the computation
    stays in the tensor's dtype and device, the projection runs on the torch engine, results are tensors).
"""

PARAMS_DOC = r"""
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
    beta_loss : {"frobenius", "kullback-leibler"}, default="frobenius"
        The loss. KL updates a factor without a target by multiplicative updates and a factor with a target by
        projected gradient with Armijo backtracking (the objective never increases); ``solver`` then does not
        apply, ``projection="l1"`` is not available.
    forget_factor : float in (0, 1], default=0.7
        ``partial_fit``: weight of the statistics of earlier blocks when a new block arrives (1: plain running
        sums, smaller: adapts faster), as scikit-learn's ``MiniBatchNMF``.
"""


def check_real(name, value, lo, hi, *, lo_open=False, hi_open=False, allow_none=False):
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


def check_int(name, value, lo, *, allow_none=False):
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name}: got {value!r}, expected an int{' or None' if allow_none else ''}")
    if value < lo:
        raise ValueError(f"{name}: got {value!r}, expected an int >= {lo}")
    return int(value)


def check_choice(name, value, choices):
    if not any(value is c or (isinstance(value, str) and value == c) for c in choices):
        raise ValueError(f"{name}: got {value!r}, expected one of {choices}")
    return value


def check_beta_loss(value):
    aliases = {"frobenius": "frobenius", 2: "frobenius", "kullback-leibler": "kullback-leibler",
               1: "kullback-leibler"}
    if isinstance(value, bool) or not isinstance(value, (str, numbers.Real)) or value not in aliases:
        raise ValueError(f"beta_loss: got {value!r}, expected one of {BETA_LOSSES} (or 2, 1)")
    return aliases[value]


def options(p: dict) -> Options:
    """Validate the parameters shared by the estimator and the function."""
    return Options(
        sparsity_W=check_real("sparsity_W", p["sparsity_W"], 0, 1, allow_none=True),
        sparsity_H=check_real("sparsity_H", p["sparsity_H"], 0, 1, allow_none=True),
        projection=check_choice("projection", p["projection"], PROJECTIONS),
        free_solver=check_choice("solver", p["solver"], FREE_SOLVERS),
        max_iter=check_int("max_iter", p["max_iter"], 1),
        tol=check_real("tol", p["tol"], 0, np.inf),
        max_inner=check_int("max_inner", p["max_inner"], 1),
        inner_ratio=check_real("inner_ratio", p["inner_ratio"], 0, 1, hi_open=True),
        hals_delta=check_real("hals_delta", p["hals_delta"], 0, 1, hi_open=True),
        l1_rate=check_real("l1_rate", p["l1_rate"], 0, 1, lo_open=True, hi_open=True),
        balance=bool(check_choice("balance", p["balance"], (True, False))),
        beta_loss=check_beta_loss(p.get("beta_loss", "frobenius")),
    )



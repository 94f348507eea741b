"""Exact grouped sparse projection of a group whose vectors are spread over the ranks of a process group.

GSP shares one dual variable mu over the whole group, and every quantity the root finder needs is a sum (or a max)
over vectors. So each rank runs the ordinary engine on its own vectors and :class:`TorchDistComm` turns the two
per-evaluation partial sums (g, g') into group sums: one collective per Newton/bisection evaluation.

Why all_gather + a local sum in rank order rather than all_reduce(SUM): every rank must take the *same* branch in
the solver (lo/hi update, convergence test, tie selection), so the group sums must be bitwise identical on every
rank. The gathered rank-order sum is identical by construction and reproducible from run to run, whatever the
backend's reduction algorithm; the payload is 2 floats per rank, so the collective is latency-bound either way.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from ..projection._api import ENGINES, _convert_back, _engine_for, eager_under_compile
from ..projection._contract import _COARSER, _FIRST_HALF, _check_solver_options, _margin, _precision, finish_contract
from ..projection._group import _validate_axis, as_group, grouped_target, is_tensor, validate_sparsity
from ..projection._solver import Evaluation, solve_shared


def collective_device(group=None) -> torch.device:
    """Where the small buffers of the collectives must live for this group's backend (NCCL: the current GPU)."""
    backend = str(dist.get_backend(group)).lower()
    if "gloo" in backend or "mpi" in backend:  # also "cpu:gloo,cuda:nccl": CPU buffers take the gloo path
        return torch.device("cpu")
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    if "xccl" in backend:
        return torch.device("xpu", torch.xpu.current_device())
    return torch.device("cpu")


class TorchDistComm:
    """The solver's ``comm`` (sum, max, gather, rank) on torch.distributed; counts its collectives."""

    def __init__(self, group=None):
        self.group = group
        self.device = collective_device(group)
        self._rank = dist.get_rank(group)
        if self._rank < 0:
            raise ValueError("group: got a process group this rank is not a member of, expected one that contains it "
                             "(call the projection only on the group's ranks)")
        self.world = dist.get_world_size(group)
        self.calls = 0

    @property
    def rank(self) -> int:
        return self._rank

    def _gather_fixed(self, values: np.ndarray) -> np.ndarray:
        """(world, len(values)) float64, rows in group-rank order; identical on every rank."""
        t = torch.as_tensor(np.ascontiguousarray(values, dtype=np.float64)).to(self.device)
        parts = [torch.empty_like(t) for _ in range(self.world)]
        dist.all_gather(parts, t, group=self.group)
        self.calls += 1
        return torch.stack(parts).cpu().numpy()

    def sum(self, values: np.ndarray) -> np.ndarray:
        rows = self._gather_fixed(np.atleast_1d(values))
        total = rows[0].copy()
        for row in rows[1:]:  # fixed rank order: the same bits on every rank
            total += row
        return total

    def max(self, values: np.ndarray) -> np.ndarray:
        return self._gather_fixed(np.atleast_1d(values)).max(axis=0)

    def gather(self, values: np.ndarray) -> list[np.ndarray]:
        values = np.asarray(values, dtype=np.float64).reshape(-1)
        sizes = self._gather_fixed(np.array([float(len(values))]))[:, 0].astype(np.int64)
        width = int(sizes.max()) if len(sizes) else 0
        if width == 0:
            return [np.zeros(0) for _ in range(self.world)]
        padded = np.zeros(width)
        padded[: len(values)] = values
        rows = self._gather_fixed(padded)
        return [rows[i, : sizes[i]].copy() for i in range(self.world)]


class EmptyEngine:
    """Stand-in engine for a rank that holds no vectors: contributes nothing to any sum, writes nothing."""

    name = "empty"
    n_vectors = 0
    xp = np

    def __init__(self, weighted: bool):
        # The solver reads ``weighted`` to decide on extra (collective) evaluations: it must match the other ranks.
        self.weighted = weighted
        self.beta_host = self.wnorm_host = self.wmin_host = self.ratio_host = self.cnorm_host = np.zeros(0)
        self.e_host = np.zeros(0, dtype=np.int64)

    def to_host(self, a):
        return np.asarray(a)

    def from_host(self, a):
        return np.asarray(a)

    def copy_input(self):
        return None

    def confirm_lower(self, mu: float) -> None:
        pass

    def evaluate_shared(self, mu: float) -> Evaluation:
        state = (np.zeros(0), np.zeros((0, 3)), np.zeros(0, dtype=np.int64))
        return Evaluation(mu, np.zeros(0), np.zeros(0), state, S=0.0, dS=0.0, sp=np.zeros(0))

    def write_state(self, t, stats, onehot):
        return None


def _n_vectors(vectors: Any, axis: Any) -> int | None:
    """Vectors held here without building a group (None: let ``as_group`` report what is wrong)."""
    if isinstance(vectors, (list, tuple)):
        return len(vectors)
    if (is_tensor(vectors) or isinstance(vectors, np.ndarray)) and vectors.ndim >= 1:
        ax = _validate_axis(axis, vectors.ndim)
        return int(np.prod([d for i, d in enumerate(vectors.shape) if i != ax], dtype=np.int64))
    return None


def _empty_like(vectors: Any):
    if isinstance(vectors, (list, tuple)):
        return []
    return vectors.clone() if is_tensor(vectors) else vectors.copy()


def _promote(x: Any):
    """float64 copy of an array/tensor or list of them (the group's work dtype when any rank holds float64)."""
    if x is None:
        return None
    if isinstance(x, (list, tuple)):
        return [_promote(v) for v in x]
    return x.double() if is_tensor(x) else np.asarray(x, dtype=np.float64)


def _demote(out: Any, like: Any):
    if isinstance(like, (list, tuple)):
        return [_demote(o, v) for o, v in zip(out, like)]
    return out.to(like.dtype) if is_tensor(like) else np.asarray(out, dtype=like.dtype)


def _has_float64(vectors: Any) -> bool:
    items = vectors if isinstance(vectors, (list, tuple)) else [vectors]
    return any((v.dtype if is_tensor(v) else v.dtype.newbyteorder("=")) in (torch.float64, np.float64, np.longdouble)
               for v in items)


# Layout of the one all_gather that validates the call across ranks (before any solver collective).
_F_ERR, _F_F64, _F_W, _F_UW, _F_R, _F_S, _F_TOL, _F_IT, _F_ENG, _F_PREC = range(10)


def _raise_agreed(comm: TorchDistComm, local_err: BaseException | None, flags: np.ndarray):
    """Raise the same error on every rank (the lowest failing rank's), so no rank is left waiting in a collective."""
    msgs: list = [None] * comm.world
    payload = None if local_err is None else (type(local_err).__name__, str(local_err))
    dist.all_gather_object(msgs, payload, group=comm.group)
    comm.calls += 1
    bad = next(i for i, m in enumerate(msgs) if m is not None)
    if local_err is not None and bad == comm.rank:
        raise local_err
    kind, msg = msgs[bad]
    cls = {"ValueError": ValueError, "TypeError": TypeError}.get(kind, RuntimeError)
    raise cls(f"rank {bad}: {msg}")


@eager_under_compile
def project(vectors: Any, sparsity: float, *, weights: Any = None, group=None, axis: int = 0,
            tol: float | None = None, max_iter: int | None = None, engine: str = "auto", return_info: bool = False):
    """Grouped sparse projection of a group sharded over the ranks of ``group``; collective.

    Every rank of ``group`` (default: the default process group) calls this with its own vectors, in the forms
    :func:`groupsparse.project` takes (a list of 1-D tensors/arrays, or one N-D tensor/array with ``axis``), on
    any device; a rank may hold none (an empty list, or a tensor with no vectors). ``sparsity``, ``tol``,
    ``max_iter`` and ``engine`` must be the same on every rank; ``weights`` must be given on every rank that
    holds vectors, or on none.

    Returns this rank's projected vectors, equal (up to float64 rounding) to :func:`groupsparse.project` of all ranks'
    vectors concatenated in group-rank order (same early return when the whole group is already sparse enough,
    same tie resolution: the vectors sent to one-hot at a jump are picked across ranks). With ``return_info``,
    also the (rank-independent) :class:`~groupsparse.ProjectionInfo`, whose ``collectives`` attribute counts
    the collective calls this projection made.

    Collectives: 1 to validate the call, 2 for the group constants, 1 per evaluation of g(mu) (2 floats per
    rank), 2 more only when a discontinuity (tied entries) has to be resolved. Bad input on any rank raises the
    same ``ValueError``/``TypeError`` on every rank (prefixed with the failing rank) instead of hanging.
    """
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("groupsparse.distributed.project: got no initialized process group, expected "
                           "torch.distributed.init_process_group(...) to have been called")
    comm = TorchDistComm(group)
    err: BaseException | None = None
    flags = np.zeros(10)
    eng = back = grp = None
    r_loc = 0
    try:
        s = grouped_target(validate_sparsity(sparsity))
        if not isinstance(engine, str) or engine not in ENGINES:
            raise ValueError(f"engine: got {engine!r}, expected one of {ENGINES}")
        _check_solver_options(tol, max_iter, "float64")  # format only; the dtype-dependent default comes later
        r_loc = _n_vectors(vectors, axis)
        if r_loc == 0:
            if weights is not None and _n_vectors(weights, axis) != 0:
                raise ValueError(f"weights: got {_n_vectors(weights, axis)} weight vectors, expected none on a "
                                 "rank holding no vectors")
        else:
            grp = as_group(vectors, axis=axis, weights=weights)  # validates structure, dtypes, weights
            r_loc = grp.n_vectors
            eng, back = _engine_for(grp, engine)  # validates the engine for the device, and NaN/Inf
            flags[_F_F64] = float(_has_float64(vectors))
            flags[_F_W] = float(weights is not None)
            flags[_F_UW] = float(weights is None)
            flags[_F_R] = r_loc
            flags[_F_PREC] = _COARSER.index(_precision(grp.out_dtypes))  # the group's contract: coarsest dtype
        flags[_F_S] = s
        flags[_F_TOL] = -1.0 if tol is None else float(tol)
        flags[_F_IT] = -1.0 if max_iter is None else float(max_iter)
        flags[_F_ENG] = ENGINES.index(engine)
    except Exception as e:  # noqa: BLE001 - any local failure must be shared, or the other ranks hang
        err = e
        flags[_F_ERR] = 1.0
    rows = comm._gather_fixed(flags)
    if rows[:, _F_ERR].any():
        _raise_agreed(comm, err, rows)
    for col, name in ((_F_S, "sparsity"), (_F_TOL, "tol"), (_F_IT, "max_iter"), (_F_ENG, "engine")):
        if np.any(rows[:, col] != rows[0, col]):
            raise ValueError(f"{name}: got different values across ranks ({rows[:, col].tolist()}), expected the "
                             "same on every rank")
    r_tot = int(rows[:, _F_R].sum())
    if r_tot == 0:
        raise ValueError(f"vectors: got no vectors on any of the {comm.world} ranks, expected at least one")
    if rows[:, _F_W].any() and rows[:, _F_UW].any():
        raise ValueError("weights: got weights on some ranks and None on others, expected weights on every rank "
                         "that holds vectors, or on none")
    weighted = bool(rows[:, _F_W].any())
    group_f64 = bool(rows[:, _F_F64].any())

    promoted = False
    measured = grp
    if grp is not None and group_f64 and grp.data.dtype not in (np.float64, torch.float64):
        # Single-process project computes a mixed float32/float64 group in float64: do the same here.
        promoted = True
        measured = grp  # (the contract measures each vector rounded to its own dtype, as project does)
        grp = as_group(_promote(vectors), axis=axis, weights=_promote(weights))
        eng, back = _engine_for(grp, engine)
    if eng is None:
        eng = EmptyEngine(weighted)
    precision = _COARSER[int(rows[:, _F_PREC].max())]
    tol_, max_iter_ = _check_solver_options(tol, max_iter, precision)
    # the first aim of the single-process contract: half precision by its measured margin, float32 by the
    # provable one of every rank's vectors (float64: none), then measured where rounding can fall short
    first = _FIRST_HALF.get(precision)
    local = ((first or _margin(grp, precision)) * grp.n_vectors) if grp is not None else 0.0
    flat, info = solve_shared(eng, s, margin_sum=local, tol=tol_, max_iter=max_iter_, comm=comm)
    # then project's contract, across the ranks: measured (each vector rounded to its own dtype) and re-solved
    # further inside while short, the same margin on every rank; overflow raises on every rank
    flat, info = finish_contract(measured, s, tol_, precision, flat, info, lambda m: solve_shared(
        eng, s, margin_sum=m * r_loc, tol=tol_, max_iter=max_iter_, comm=comm), comm)
    info.target = s
    if grp is None:
        out = _empty_like(vectors)
    else:
        out = grp.rebuild(_convert_back(flat, back))
        if promoted:
            out = _demote(out, vectors)
    info.collectives = comm.calls
    info.notes.append(f"distributed: world={comm.world}, rank={comm.rank}, local_vectors={r_loc}, "
                      f"collectives={comm.calls}")
    return (out, info) if return_info else out

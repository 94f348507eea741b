r"""Validation of X and of the mask at the public boundary, and conversion into the solvers' :class:`Data`.

Rules: NaN marks a missing entry (dense X only); ``mask`` (same shape, bool, True = observed) hides more. Observed
entries must be finite and non-negative; hidden entries may hold anything (they are replaced by 0 and never read).
Every row (and, when fitting, every column) needs at least one observed entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp

from ._data import Data, NumpyOps, TorchOps, is_torch


@dataclass
class Prepared:
    D: Data
    out_dtype: object  # NumPy dtype of the results, or None for torch (kept in the tensor's dtype)
    torch_like: object = None  # a tensor whose dtype/device the results take


def _first_bad(bad: np.ndarray) -> tuple:
    idx = np.argwhere(bad)[0]
    return tuple(int(i) for i in idx)


def _check_values(Xn: np.ndarray, M: np.ndarray, name: str, need_cols: bool):
    """Observed entries finite and >= 0; every row (and column when fitting) observed somewhere."""
    obs = np.where(M, Xn, 0.0)
    if not np.all(np.isfinite(obs)):
        i, j = _first_bad(~np.isfinite(obs))
        raise ValueError(f"X: got infinity at observed entry [{i}, {j}], expected finite values (mark missing "
                         f"entries with NaN or mask=...)")
    if np.any(obs < 0):
        i, j = _first_bad(obs < 0)
        raise ValueError(f"Negative values in data passed to {name}: got X[{i}, {j}] = {float(Xn[i, j])!r}, expected "
                         f"non-negative observed entries")
    rows = ~M.any(axis=1)
    if rows.any():
        raise ValueError(f"X: got row {int(np.argmax(rows))} with no observed entry (all NaN or masked), expected "
                         f"at least one observed entry per row (drop the row)")
    if need_cols:
        cols = ~M.any(axis=0)
        if cols.any():
            raise ValueError(f"X: got column {int(np.argmax(cols))} with no observed entry (all NaN or masked), "
                             f"expected at least one observed entry per column when fitting (drop the feature)")
    return obs


def _mask_array(mask, shape):
    if is_torch(mask):
        mask = mask.detach().cpu().numpy()
    mask = np.asarray(mask)
    if mask.shape != tuple(shape):
        raise ValueError(f"mask: got shape {mask.shape}, expected X's shape {tuple(shape)}")
    if mask.dtype != np.bool_:
        raise TypeError(f"mask: got dtype {mask.dtype}, expected bool (True = observed)")
    return mask


def prepare(X, mask=None, *, name="SparseNMF", need_cols=True) -> Prepared:
    """X already passed through scikit-learn's checks (NumPy/scipy.sparse) or a raw torch tensor."""
    if is_torch(X):
        return _prepare_torch(X, mask, name, need_cols)
    if sp.issparse(X):
        if mask is not None:
            raise ValueError("mask: got a mask with a scipy.sparse X, expected a dense X for missing entries "
                             "(in a sparse X every unstored entry is an observed zero)")
        data = X.data
        if not np.all(np.isfinite(data)):
            raise ValueError("X: got NaN or infinity in a scipy.sparse X, expected finite values (missing entries "
                             "need a dense X with NaN)")
        if np.any(data < 0):
            raise ValueError(f"Negative values in data passed to {name}: got a negative stored value, expected "
                             f"non-negative entries")
        return Prepared(Data(X), X.dtype)
    Xn = np.asarray(X)
    M = ~np.isnan(Xn)
    if mask is not None:
        M &= _mask_array(mask, Xn.shape)
    obs = _check_values(Xn, M, name, need_cols)
    Xd = np.ascontiguousarray(obs, dtype=np.float64)
    return Prepared(Data(Xd, None if M.all() else M), Xn.dtype)


def _prepare_torch(X, mask, name, need_cols):
    import torch

    if X.ndim != 2:
        raise ValueError(f"X: got a tensor of shape {tuple(X.shape)}, expected a 2-D tensor")
    if X.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"X: got a tensor of dtype {X.dtype}, expected torch.float32 or torch.float64")
    if X.is_sparse:
        raise TypeError("X: got a sparse torch tensor, expected a dense tensor (or a scipy.sparse matrix)")
    Xn = X.detach().cpu().double().numpy()  # validation only; the solver keeps X on its device
    M = ~np.isnan(Xn)
    if mask is not None:
        M &= _mask_array(mask, Xn.shape)
    _check_values(Xn, M, name, need_cols)
    ops = TorchOps(X.dtype, X.device)
    Mt = None if M.all() else torch.as_tensor(M, device=X.device)
    Xz = X.detach() if Mt is None else torch.where(Mt, X.detach(), torch.zeros((), dtype=X.dtype, device=X.device))
    return Prepared(Data(Xz.contiguous(), Mt, ops), None, X)


def to_output(A, prep: Prepared):
    """A solver result (NumPy float64 or tensor) in the caller's type and dtype."""
    if prep.out_dtype is None:
        return A.to(prep.torch_like.dtype)
    return np.asarray(A).astype(prep.out_dtype, copy=False)


def start_factor(A, prep: Prepared):
    """A starting factor (NumPy) in the solver's backend."""
    ops = prep.D.ops
    if isinstance(ops, NumpyOps):
        return np.array(A, dtype=np.float64, order="C")
    return ops.asarray(np.ascontiguousarray(A))

r"""What the solvers see of X: dense, scipy.sparse or masked, on NumPy or PyTorch, behind one small interface.

The solvers only need products with the factors and the (observed) entries' norm, so every layout supplies
``WtX(Wt)`` (r x m), ``HXt(H)`` (r x n) and ``xnorm2``. Missing entries (``M`` False) are handled by the solvers
(imputation for the Frobenius loss, masked sums for KL); a sparse X is never densified.
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from ..projection import project, project_each


def is_torch(x) -> bool:
    mod = type(x).__module__
    return mod.startswith("torch")


def to_numpy(a) -> np.ndarray:
    """A tensor's values as a NumPy array (on the host), or ``a`` itself as an array."""
    return a.detach().cpu().numpy() if is_torch(a) else np.asarray(a)


class NumpyOps:
    """Array operations the generic (non-compiled) solver paths use, NumPy flavour."""

    name = "numpy"
    dtype = np.float64

    @staticmethod
    def clamp0(a):
        return np.maximum(a, 0.0)

    @staticmethod
    def copy(a):
        return a.copy()

    @staticmethod
    def vdot(a, b) -> float:
        return float(np.einsum("ij,ij->", a, b))

    @staticmethod
    def eigmax(A) -> float:
        return float(np.linalg.eigvalsh(A)[-1])

    @staticmethod
    def rownorm(a):
        return np.sqrt(np.einsum("ij,ij->i", a, a))

    @staticmethod
    def where(c, a, b):
        return np.where(c, a, b)

    @staticmethod
    def norm(a) -> float:
        return float(np.linalg.norm(a))

    @staticmethod
    def log(a):
        return np.log(a)

    @staticmethod
    def asarray(a):
        return np.asarray(a, dtype=np.float64)

    @staticmethod
    def project(F, s, kind, mu0=0.0):
        """(projection, root mu or None). GSP is warm-started from ``mu0`` (the core's ``mu0=``)."""
        if kind != "group":
            return project_each(F, s, axis=1), None
        out, info = project(F, s, axis=1, mu0=mu0, return_info=True)
        return out, info.mu

    @staticmethod
    def to_numpy(a):
        return a


class TorchOps:
    """The same operations on torch tensors (any device); the projection runs on the torch engine."""

    name = "torch"

    def __init__(self, dtype, device):
        import torch

        self.torch = torch
        self.dtype = dtype
        self.device = device

    def clamp0(self, a):
        return a.clamp(min=0)

    @staticmethod
    def copy(a):
        return a.clone()

    @staticmethod
    def vdot(a, b) -> float:
        return float((a * b).sum())

    def eigmax(self, A) -> float:
        return float(self.torch.linalg.eigvalsh(A.double())[-1])

    @staticmethod
    def rownorm(a):
        return (a * a).sum(dim=1).sqrt()

    def where(self, c, a, b):
        return self.torch.where(c, a, b)

    def norm(self, a) -> float:
        return float(self.torch.linalg.vector_norm(a))

    def log(self, a):
        return self.torch.log(a)

    def asarray(self, a):
        return self.torch.as_tensor(np.asarray(a) if not is_torch(a) else a, dtype=self.dtype, device=self.device)

    @staticmethod
    def project(F, s, kind, mu0=0.0):
        if kind != "group":
            return project_each(F, s, axis=1, engine="torch"), None
        out, info = project(F, s, axis=1, engine="torch", mu0=mu0, return_info=True)
        return out, info.mu

    @staticmethod
    def to_numpy(a):
        return a.detach().cpu().numpy()


class Data:
    """X with its layout. ``M``: boolean mask of observed entries or None (all observed). Hidden entries of a
    dense X are stored as 0 so that no NaN/inf can leak into a product."""

    def __init__(self, X, M=None, ops=None):
        self.ops = ops or NumpyOps()
        self.sparse = sp.issparse(X)
        self.M = M
        if self.sparse:
            self.X = sp.csr_matrix(X, dtype=np.float64)
            self.Xt = self.X.T.tocsr()  # CSR of X^T: both products stream rows
            self.xnorm2 = float(self.X.data @ self.X.data)
        else:
            self.X = X
            self.Xt = X.T if self.ops.name == "torch" else np.ascontiguousarray(X.T)
            self.xnorm2 = self.ops.vdot(X, X)
        self.n, self.m = X.shape

    def WtX(self, Wt):
        """Wt @ X, (r, m)."""
        if self.sparse:
            return np.ascontiguousarray((self.Xt @ Wt.T).T)
        return Wt @ self.X

    def HXt(self, H):
        """H @ X^T, (r, n)."""
        if self.sparse:
            return np.ascontiguousarray((self.X @ H.T).T)
        return H @ self.Xt

"""Sparse NMF with grouped sparse projection (gspNMF): estimator, function, solvers and experiments."""

from ._estimator import SparseNMF, sparse_nmf
from ._online import heldout_error
from ._solvers import NMFInfo

__all__ = ["NMFInfo", "SparseNMF", "heldout_error", "sparse_nmf"]

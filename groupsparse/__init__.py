"""groupsparse: exact, fast grouped Hoyer-sparsity projection (GSP) and its applications."""

from .projection import ProjectionInfo, ProjectionWarning, project, project_, project_each, project_groups
from .sparsity import hoyer_sparsity
from .nmf import SparseNMF, sparse_nmf

__version__ = "0.1.0"

__all__ = ["ProjectionInfo", "ProjectionWarning", "SparseNMF", "hoyer_sparsity", "project", "project_",
           "project_each", "project_groups", "sparse_nmf", "__version__"]

"""Grouped sparse projection (GSP) and the per-vector Hoyer projection."""

from ._api import ENGINES, project, project_, project_each
from ._api_groups import project_groups
from ._solver import LocalComm, ProjectionInfo, ProjectionWarning, solve_shared, split_ties

__all__ = ["ENGINES", "LocalComm", "ProjectionInfo", "ProjectionWarning", "project", "project_", "project_each",
           "project_groups", "solve_shared", "split_ties"]

"""Grouped sparse projection (GSP) and the per-vector Hoyer projection."""

from ._api import ENGINES, project, project_, project_each, project_groups
from ._solver import LocalComm, ProjectionInfo, ProjectionWarning, select_jumpers, solve_shared

__all__ = ["ENGINES", "LocalComm", "ProjectionInfo", "ProjectionWarning", "project", "project_", "project_each", "project_groups",
           "select_jumpers", "solve_shared"]

"""Exact grouped sparse projection across the ranks of a torch.distributed process group, and GSP pruning of
data-parallel (DDP) and fully sharded (FSDP2) models. See docs/distributed.md."""

from ._project import EmptyEngine, TorchDistComm, collective_device, project

__all__ = ["EmptyEngine", "TorchDistComm", "collective_device", "project", "DistributedGSPPruner", "STRATEGIES",
           "assign_owners", "project_model_", "project_params_", "replicas_identical"]


def __getattr__(name):
    # the pruning side pulls in groupsparse.prune (and its optional pieces); load it only when asked for
    if name in ("DistributedGSPPruner", "STRATEGIES", "assign_owners", "project_model_", "project_params_",
                "replicas_identical"):
        from . import _prune

        return getattr(_prune, name)
    raise AttributeError(f"module 'groupsparse.distributed' has no attribute {name!r}")

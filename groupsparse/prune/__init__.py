"""Pruning PyTorch models with the grouped sparse projection (GSP), plus baselines, reports and checkpoints.

Typical use (induced GSP in a plain loop)::

    from groupsparse.prune import GSPPruner, Schedule
    pruner = GSPPruner(model, Schedule(0.8, start=2000, every=150), vectors="fan_out").attach(optimizer)
    for x, y in loader:
        ...; optimizer.step(); pruner.step()
    pruner.finalize(zero_fraction=0.9)      # exact zeros, masks enforced from now on
    ...                                      # finetune
    pruner.remove()                          # plain parameters with real zeros
"""

from . import oneshot
from .baselines import GradualMagnitudePruner, HoyerSquareRegularizer, MagnitudePruner, RandomPruner, hoyer_square
from .checkpoint import load_state_dict, prune_state_dict, save_state_dict
from .masks import MASK_STYLES, Pruner, pruned_state_dict, smallest_k
from .oneshot import PruneResult, prune_model
from .pruner import GSPPruner
from .report import LayerStats, SparsityReport, sparsity_report
from .schedule import Schedule
from .selection import Target, looks_like_layer_weight, select_parameters, select_state_dict_keys
from .vectors import NORMALIZATIONS, SCOPES, VECTOR_MODES, as_vectors, from_vectors, project_tensors, vector_shape

__all__ = [
    "GSPPruner", "Pruner", "Schedule", "MagnitudePruner", "GradualMagnitudePruner", "RandomPruner", "HoyerSquareRegularizer", "hoyer_square",
    "select_parameters", "select_state_dict_keys", "looks_like_layer_weight", "Target",
    "as_vectors", "from_vectors", "vector_shape", "project_tensors", "VECTOR_MODES", "SCOPES", "NORMALIZATIONS",
    "MASK_STYLES", "smallest_k", "pruned_state_dict", "sparsity_report", "SparsityReport", "LayerStats",
    "load_state_dict", "save_state_dict", "prune_state_dict",
    "oneshot", "prune_model", "PruneResult",
]


def __getattr__(name):
    # Lightning is optional and heavy: import it only when the callback is asked for
    if name == "GSPCallback":
        from .lightning import GSPCallback

        return GSPCallback
    raise AttributeError(f"module 'groupsparse.prune' has no attribute {name!r}")

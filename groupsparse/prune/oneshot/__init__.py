"""One-shot pruning of transformer language models with calibration data (see docs/prune-lm.md).

    from groupsparse.prune.oneshot import prune_model, read_texts
    result = prune_model(model, calib_ids, method="gsp", sparsity=0.5, group="model")   # or pattern="2:4"
    model.save_pretrained(out)            # real zeros; result.to_dict() is the per-layer report
"""

from .calibration import chunk_windows, read_texts, sample_windows, token_stream
from .gsp import gsp_allocation, gsp_masks, gsp_masks_bisect
from .methods import layer_error, layer_mask, nm_mask, parse_pattern, row_mask, sparsegpt, wanda_scores
from .owl import outlier_ratio, owl_sparsities
from .pruner import GROUPS, METHODS, PruneResult, check_options, prune_model
from .walker import InputStats, collect_stats, find_blocks, linear_layers, walk, weight_matrix

__all__ = [
    "prune_model", "check_options", "PruneResult", "METHODS", "GROUPS", "read_texts", "token_stream", "sample_windows", "chunk_windows",
    "wanda_scores", "row_mask", "layer_mask", "nm_mask", "parse_pattern", "sparsegpt", "layer_error",
    "gsp_masks", "gsp_masks_bisect", "gsp_allocation", "outlier_ratio", "owl_sparsities",
    "walk", "collect_stats", "find_blocks", "linear_layers", "weight_matrix", "InputStats",
]

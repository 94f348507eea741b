"""Pruning experiments: datasets, models, training loops and the ``prune``/``report`` commands.

Nothing here downloads: ``digits`` ships with scikit-learn and ``cifar10`` is read from a path the user gives.
"""

from .datasets import Dataset, load_dataset
from .models import MODELS, build_model

__all__ = ["Dataset", "MODELS", "build_model", "load_dataset"]

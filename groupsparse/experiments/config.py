"""Settings of one pruning experiment: validation, per-dataset defaults, and the manifest of everything that
changes the result (what a run folder and the dense-model cache are keyed by)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import torch

from . import _pruning as P
from .datasets import DATASETS
from .models import MODELS
from .training import SCHEDULES

METHODS = ("gsp", "gsp-single-shot", "magnitude", "gmp", "deephoyer", "random")
# Methods that shape the weights over epochs before the masks are fixed (the others prune the dense model once).
GRADUAL = ("gsp", "gmp", "deephoyer")
PROTOCOLS = ("after", "during")
VALUES = ("projected", "dense", "rescaled")
VECTORS = ("filter", "fan_out", "kernel", "layer")

# Per-dataset defaults, sized so that digits finishes in seconds on 2 CPU cores.
DEFAULTS = {
    "digits": dict(epochs=30, finetune_epochs=20, batch_size=64, lr=0.05, finetune_lr=0.01),
    "cifar10": dict(epochs=30, finetune_epochs=15, batch_size=128, lr=0.1, finetune_lr=0.01),
}
# DeepHoyer's lambda is chosen on the validation split among these unless --hoyer-lambda is given.
HOYER_GRID = {"digits": (5e-5, 2e-4, 1e-3), "cifar10": (3e-6, 1e-5, 3e-5)}
# Options that only one kind of method reads: giving them to another method is a mistake, not a no-op.
_ONLY_FOR = {"gsp_sparsity": ("gsp", "gsp-single-shot"), "vectors": ("gsp", "gsp-single-shot"),
             "scope": ("gsp", "gsp-single-shot"), "normalize": ("gsp", "gsp-single-shot"),
             "values": ("gsp", "gsp-single-shot"), "gsp_every": ("gsp", "gmp"), "hoyer_lambda": ("deephoyer",),
             "induce_epochs": GRADUAL, "start_epoch": GRADUAL}
# Not part of the result: where files go, how progress is shown.
_NOT_SETTINGS = ("out", "cache_dir", "progress", "overwrite", "data", "extra")


@dataclass
class Config:
    dataset: str
    model: str
    method: str
    sparsity: float
    seed: int
    out: str
    data: str | None = None
    device: str = "auto"
    protocol: str = "after"
    epochs: int | None = None
    finetune_epochs: int | None = None
    induce_epochs: int | None = None
    start_epoch: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    finetune_lr: float | None = None
    schedule: str = "cosine"
    gsp_sparsity: float | None = None
    gsp_every: int | None = None
    vectors: str | None = None
    scope: str | None = None
    normalize: str | None = None
    values: str | None = None
    hoyer_lambda: float | None = None
    train_subset: int | None = None
    cache_dir: str | None = None
    progress: bool | None = None
    overwrite: bool = False
    extra: dict = field(default_factory=dict)

    def resolve(self) -> "Config":
        """Validate, reject combinations that make no sense, fill the defaults; returns a new Config."""
        for what, v, allowed in (("dataset", self.dataset, DATASETS), ("model", self.model, MODELS),
                                 ("method", self.method, METHODS), ("protocol", self.protocol, PROTOCOLS),
                                 ("schedule", self.schedule, SCHEDULES)):
            if v not in allowed:
                raise ValueError(f"{what}: got {v!r}, expected one of {allowed}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity: got {self.sparsity!r}, expected a zero fraction in (0, 1)")
        _int(self.seed, "seed", 0)
        if self.dataset == "digits" and self.data is not None:
            raise ValueError(f"--data: got {self.data!r} with --dataset digits, expected no --data (digits ships "
                             "with scikit-learn)")
        for k, methods in _ONLY_FOR.items():
            if getattr(self, k) is not None and self.method not in methods:
                raise ValueError(f"--{k.replace('_', '-')}: got {getattr(self, k)!r} with --method {self.method}, "
                                 f"expected it only with {' / '.join(methods)}")
        if self.protocol == "during" and self.method not in GRADUAL:
            raise ValueError(f"--protocol during: got --method {self.method}, expected one of {GRADUAL} (the others "
                             "prune a trained model once)")
        if self.protocol == "during" and self.induce_epochs is not None:
            raise ValueError("--induce-epochs: got a value with --protocol during, expected --start-epoch (the "
                             "shaping runs from it to the end of --epochs)")
        if self.protocol == "after" and self.start_epoch is not None:
            raise ValueError("--start-epoch: got a value with --protocol after, expected --protocol during")
        c = Config(**asdict(self))
        for k, v in DEFAULTS[self.dataset].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        _int(c.epochs, "epochs", 1)
        _int(c.finetune_epochs, "finetune_epochs", 1)
        _int(c.batch_size, "batch_size", 1)
        for k in ("lr", "finetune_lr"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                raise ValueError(f"{k}: got {v!r}, expected a positive float")
        if c.method in GRADUAL:
            if c.protocol == "after":
                c.induce_epochs = c.finetune_epochs // 2 if c.induce_epochs is None else c.induce_epochs
                _int(c.induce_epochs, "induce_epochs", 1)
                if c.induce_epochs >= c.finetune_epochs:
                    raise ValueError(f"induce_epochs: got {c.induce_epochs}, expected fewer than finetune_epochs "
                                     f"({c.finetune_epochs}): both are parts of the same budget")
            else:
                c.start_epoch = c.epochs // 2 if c.start_epoch is None else c.start_epoch
                _int(c.start_epoch, "start_epoch", 0)
                if c.start_epoch >= c.epochs:
                    raise ValueError(f"start_epoch: got {c.start_epoch}, expected fewer than epochs ({c.epochs})")
        if c.method.startswith("gsp"):
            c.vectors = c.vectors or "fan_out"
            c.scope = c.scope or "layer"
            c.values = c.values or "projected"
            if c.vectors not in VECTORS:
                raise ValueError(f"vectors: got {c.vectors!r}, expected one of {VECTORS}")
            if c.scope not in ("layer", "model"):
                raise ValueError(f"scope: got {c.scope!r}, expected 'layer' or 'model'")
            if c.normalize not in (None, "vector", "layer"):
                raise ValueError(f"normalize: got {c.normalize!r}, expected vector or layer")
            if c.normalize is not None and c.scope == "layer":
                raise ValueError(f"--normalize {c.normalize}: got it with --scope layer, expected --scope model "
                                 "(normalization balances layers inside one model-wide group)")
            if c.values not in VALUES:
                raise ValueError(f"values: got {c.values!r}, expected one of {VALUES}")
            if c.gsp_sparsity is None:
                c.gsp_sparsity = P.hoyer_target_for(float(c.sparsity))
            elif isinstance(c.gsp_sparsity, bool) or not 0 < c.gsp_sparsity <= 1:
                raise ValueError(f"gsp_sparsity: got {c.gsp_sparsity!r}, expected a Hoyer target in (0, 1]")
        if c.gsp_every is not None:
            _int(c.gsp_every, "gsp_every", 1)
        if c.hoyer_lambda is not None and (isinstance(c.hoyer_lambda, bool) or not c.hoyer_lambda > 0):
            raise ValueError(f"hoyer_lambda: got {c.hoyer_lambda!r}, expected a positive float")
        if c.train_subset is not None:
            _int(c.train_subset, "train_subset", 1)
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(c.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: got {c.device!r}, expected auto, cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: got {c.device!r}, but CUDA is not available here; expected cpu or auto")
        return c

    def settings(self, data_id: str) -> dict:
        """Everything that changes the result of this (resolved) run: the run folder's manifest."""
        from .. import __version__

        s = {k: v for k, v in asdict(self).items() if k not in _NOT_SETTINGS}
        s["device"] = torch.device(self.device).type
        s.update(data_id=data_id, groupsparse=__version__, torch=torch.__version__)
        return s

    def dense_settings(self, data_id: str) -> dict:
        keys = ("dataset", "model", "seed", "epochs", "batch_size", "lr", "schedule", "train_subset", "device",
                "data_id", "groupsparse", "torch")
        s = self.settings(data_id)
        return {k: s[k] for k in keys}


def settings_key(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


def _int(v, what: str, low: int) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"{what}: got {v!r}, expected an int >= {low}")
    return v

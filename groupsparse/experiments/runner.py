"""One pruning experiment: dense model (trained once per dataset/model/seed/schedule and cached), pruning by one
method to an exact final zero fraction, masked finetuning, and ``report.json`` + ``model.safetensors``.

Budgets. After the dense model every method gets the same ``finetune_epochs`` of training:

- ``gsp`` (induced): ``induce_epochs`` of training with a per-layer GSP projection every ``gsp_every`` iterations
  (and once more at the end), then masks by global magnitude to the target zero fraction (the authors'
  finalization), then ``finetune_epochs - induce_epochs`` of masked finetuning. The authors induce during the
  dense run itself (from epoch 40 of 200); branching from the trained dense model instead lets every method share
  one dense model, which keeps sweeps cheap.
- ``deephoyer``: the same split, with the Hoyer-Square regularizer in the loss during the first part, then the
  same global magnitude threshold and masked finetuning.
- ``gsp-single-shot``: one projection of the dense model, global magnitude masks, ``finetune_epochs`` of masked
  finetuning. ``magnitude``: global magnitude masks of the dense model, then the same. ``random``: per-layer
  random masks, then the same (a floor).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..io import atomic_path
from ..prune import GSPPruner, MagnitudePruner, Pruner, RandomPruner, hoyer_square
from . import _pruning as P
from .datasets import DATASETS, default_cache_dir, load_dataset
from .models import MODELS, build_model, prunable_parameters
from .training import SCHEDULES, evaluate, save_state_dict, train

METHODS = ("gsp", "gsp-single-shot", "magnitude", "deephoyer", "random")

# Per-dataset defaults, sized so that digits finishes in about a minute on 2 CPU cores.
DEFAULTS = {
    "digits": dict(epochs=30, finetune_epochs=20, batch_size=64, lr=0.05, finetune_lr=0.01, hoyer_lambda=2e-4),
    "cifar10": dict(epochs=30, finetune_epochs=15, batch_size=128, lr=0.1, finetune_lr=0.01, hoyer_lambda=1e-5),
}


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
    epochs: int | None = None
    finetune_epochs: int | None = None
    induce_epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    finetune_lr: float | None = None
    schedule: str = "cosine"
    gsp_sparsity: float | None = None
    gsp_every: int | None = None
    hoyer_lambda: float | None = None
    train_subset: int | None = None
    cache_dir: str | None = None
    progress: bool | None = None
    extra: dict = field(default_factory=dict)

    def resolve(self) -> "Config":
        """Validate and fill the per-dataset defaults; returns a new Config."""
        if self.dataset not in DATASETS:
            raise ValueError(f"dataset: got {self.dataset!r}, expected one of {DATASETS}")
        if self.model not in MODELS:
            raise ValueError(f"model: got {self.model!r}, expected one of {MODELS}")
        if self.method not in METHODS:
            raise ValueError(f"method: got {self.method!r}, expected one of {METHODS}")
        if isinstance(self.sparsity, bool) or not isinstance(self.sparsity, (int, float)) or not 0 < self.sparsity < 1:
            raise ValueError(f"sparsity: got {self.sparsity!r}, expected a zero fraction in (0, 1)")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"seed: got {self.seed!r}, expected a non-negative int")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule: got {self.schedule!r}, expected one of {SCHEDULES}")
        c = Config(**asdict(self))
        for k, v in DEFAULTS[self.dataset].items():
            if getattr(c, k) is None:
                setattr(c, k, v)
        if c.induce_epochs is None:
            c.induce_epochs = c.finetune_epochs // 2
        for k in ("epochs", "finetune_epochs", "induce_epochs", "batch_size"):
            v = getattr(c, k)
            if isinstance(v, bool) or not isinstance(v, int) or v < (1 if k == "batch_size" else 0):
                raise ValueError(f"{k}: got {v!r}, expected a {'positive' if k == 'batch_size' else 'non-negative'} int")
        if c.induce_epochs > c.finetune_epochs:
            raise ValueError(f"induce_epochs: got {c.induce_epochs}, expected at most finetune_epochs "
                             f"({c.finetune_epochs}): it is part of the same budget")
        if c.gsp_sparsity is None:
            c.gsp_sparsity = P.hoyer_target_for(float(c.sparsity))
        elif not 0 < c.gsp_sparsity <= 1:
            raise ValueError(f"gsp_sparsity: got {c.gsp_sparsity!r}, expected a Hoyer target in (0, 1]")
        if c.device == "auto":
            c.device = "cuda" if torch.cuda.is_available() else "cpu"
        try:
            dev = torch.device(c.device)
        except (RuntimeError, TypeError) as e:
            raise ValueError(f"device: got {c.device!r}, expected auto, cpu, cuda or cuda:N") from e
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device: got {c.device!r}, but CUDA is not available here; expected cpu or auto")
        return c


def _dense_key(c: Config) -> str:
    sub = f"-sub{c.train_subset}" if c.train_subset else ""
    return (f"{c.dataset}-{c.model}-seed{c.seed}-e{c.epochs}-b{c.batch_size}-lr{c.lr:g}-{c.schedule}{sub}")


def run(config: Config) -> dict:
    """Run one experiment (resuming whatever is already in ``config.out``); returns the report."""
    c = config.resolve()
    out = Path(c.out)
    report_file = out / "report.json"
    if report_file.exists():
        return json.loads(report_file.read_text())
    out.mkdir(parents=True, exist_ok=True)
    if c.dataset == "digits" and c.device == "cpu":
        torch.set_num_threads(1)  # a tiny MLP runs several times faster on one thread than on oversubscribed cores
    t_start = time.perf_counter()
    cache = Path(c.cache_dir) if c.cache_dir else default_cache_dir()
    data = load_dataset(c.dataset, c.data, cache_dir=cache, train_subset=c.train_subset).to(c.device)

    # Dense model: its checkpoint directory is the cache (a finished phase resumes as a no-op).
    torch.manual_seed(c.seed)
    model = build_model(c.model, data.input_shape, data.num_classes).to(c.device)
    dense_dir = cache / "dense" / _dense_key(c)
    dense_cached = (dense_dir / "state.json").exists() and \
        json.loads((dense_dir / "state.json").read_text())["epoch"] >= c.epochs
    # A CPU test pass over 10k CIFAR images costs as much as a training epoch on a subset: evaluate at the end only.
    ev = 0 if (c.device == "cpu" and c.dataset == "cifar10") else 1
    dstate = train(model, data, epochs=c.epochs, lr=c.lr, ckpt_dir=dense_dir, seed=c.seed, batch_size=c.batch_size,
                   schedule=c.schedule, desc="dense", progress=c.progress, eval_every=ev)
    last = dstate["history"][-1] if dstate["history"] else {}
    dense_acc = last["test_accuracy"] if "test_accuracy" in last else evaluate(model, data)
    params = prunable_parameters(model)
    # The authors' CIFAR vector mode (columns of W.reshape(out, -1)), each layer its own group.
    gsp = GSPPruner(model, c.gsp_sparsity, vectors="fan_out", scope="layer") if c.method.startswith("gsp") else None
    timings = {"dense_train_s": dstate["seconds"], "dense_cached": dense_cached, "projection_s": 0.0}
    spe = data.num_batches("train", c.batch_size)
    gsp_every = c.gsp_every or max(1, spe // 3)  # the authors' CIFAR rate: ~3 projections per epoch

    # Phase 1 (gsp, deephoyer): shape the weights for pruning.
    induce = c.method in ("gsp", "deephoyer") and c.induce_epochs > 0
    ft_epochs = c.finetune_epochs - (c.induce_epochs if c.method in ("gsp", "deephoyer") else 0)
    proj_time = [0.0]

    def project_now():
        gsp.project()
        proj_time[0] += gsp.last_time

    if induce:
        hook = extra = before = None
        if c.method == "gsp":
            def gsp_hook(step, opt):
                if step % gsp_every == 0:
                    project_now()
            hook = gsp_hook
            before = lambda opt: project_now()  # noqa: E731
        else:
            extra = lambda m: c.hoyer_lambda * hoyer_square(list(params.values()))  # noqa: E731
        istate = train(model, data, epochs=c.induce_epochs, lr=c.finetune_lr, ckpt_dir=out / "induce",
                       seed=c.seed + 1, batch_size=c.batch_size, schedule="cosine", after_step=hook,
                       extra_loss=extra, before_start=before, desc=f"{c.method} induce", progress=c.progress,
                       eval_every=ev)
        timings["induce_s"] = istate["seconds"]

    # Masks: fixed once and saved, so a resumed finetune uses the same ones.
    mask_file = out / "masks.safetensors"
    prune_info_file = out / "prune.json"
    t0 = time.perf_counter()
    if mask_file.exists():
        from safetensors.torch import load_file

        pruner = Pruner(model)
        pruner.set_masks({k: v.bool() for k, v in load_file(str(mask_file)).items()})
        prune_info = json.loads(prune_info_file.read_text())
    else:
        if gsp is not None:
            project_now()
        projection_zeros = P.zero_fraction(params)
        # Exact zero fractions for every method: keep_zeros=False lets surplus projection zeros regrow.
        if gsp is not None:
            pruner = gsp
            gsp.finalize(c.sparsity, scope="model", keep_zeros=False)
        elif c.method == "random":
            pruner = RandomPruner(model)
            pruner.prune(c.sparsity, scope="layer", seed=c.seed)
        else:
            pruner = MagnitudePruner(model)
            pruner.prune(c.sparsity, scope="model")
        masks = pruner.masks
        prune_info = {"zero_fraction_before_masks": projection_zeros,
                      "accuracy_before_finetune": evaluate(model, data), "prune_s": time.perf_counter() - t0,
                      "projection_s": proj_time[0]}
        from safetensors.torch import save_file

        with atomic_path(prune_info_file) as tmp:
            Path(tmp).write_text(json.dumps(prune_info, indent=1))
        with atomic_path(mask_file) as tmp:
            save_file({k: v.to(torch.uint8).contiguous().cpu() for k, v in masks.items()}, str(tmp))

    def enforce(step, opt):
        pruner.apply_masks(opt)  # zero pruned weights and their momentum after every step

    # Phase 2: masked finetuning (zeros and their momentum re-imposed after every step).
    fstate = train(model, data, epochs=ft_epochs, lr=c.finetune_lr, ckpt_dir=out / "finetune", seed=c.seed + 2,
                   batch_size=c.batch_size, schedule="cosine", after_step=enforce, desc=f"{c.method} finetune",
                   progress=c.progress, eval_every=ev)
    pruner.remove()  # plain parameters with real zeros, no mask buffers
    accuracy = evaluate(model, data)
    timings["finetune_s"] = fstate["seconds"]
    timings["projection_s"] = prune_info["projection_s"] + proj_time[0]
    timings["prune_s"] = prune_info["prune_s"]
    save_state_dict(out / "model.safetensors", model)
    layers = P.layer_report(params)
    report = {
        "method": c.method, "dataset": c.dataset, "model": c.model, "seed": c.seed,
        "target_sparsity": float(c.sparsity), "zero_fraction": P.zero_fraction(params),
        "accuracy": accuracy, "dense_accuracy": dense_acc,
        "accuracy_before_finetune": prune_info["accuracy_before_finetune"],
        "zero_fraction_before_masks": prune_info["zero_fraction_before_masks"],
        "gsp_sparsity": c.gsp_sparsity if c.method.startswith("gsp") else None,
        "gsp_every": gsp_every if c.method == "gsp" else None,
        "hoyer_lambda": c.hoyer_lambda if c.method == "deephoyer" else None,
        "epochs": c.epochs, "finetune_epochs": c.finetune_epochs,
        "induce_epochs": c.induce_epochs if c.method in ("gsp", "deephoyer") else 0,
        "masked_finetune_epochs": ft_epochs, "train_subset": c.train_subset,
        "layers": layers, "timings": {**timings, "total_s": time.perf_counter() - t_start},
        "config": {k: v for k, v in asdict(c).items() if k not in ("progress", "extra")},
        "device": c.device, "torch": torch.__version__,
        "history": {"finetune": fstate["history"]},
    }
    with atomic_path(report_file) as tmp:
        Path(tmp).write_text(json.dumps(report, indent=1))
    return report

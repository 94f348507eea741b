"""One pruning experiment: dense model (trained once per dense settings and cached), pruning by one method to an
exact final zero fraction, masked finetuning, and ``report.json`` + ``model.safetensors``.

Budgets: every method trains ``epochs`` dense epochs and then ``finetune_epochs`` more, so the total is the same.

``protocol="after"`` (prune a trained model; every method branches from the same cached dense model):

- ``gsp`` (induced): ``induce_epochs`` at the finetuning learning rate with a GSP projection every ``gsp_every``
  iterations (and once more at the end), masks by global magnitude to the target (the authors' finalization),
  then masked finetuning for the rest. ``gmp``: the same split with gradual magnitude masks on a cubic schedule
  (Zhu & Gupta) reaching the target at the end of the first part. ``deephoyer``: the same split with the
  Hoyer-Square regularizer in the loss, then global magnitude.
- ``gsp-single-shot``: one projection of the dense model, global magnitude masks, all epochs masked finetuning.
  ``magnitude``: global magnitude masks of the dense model, then the same. ``random``: per-layer random masks.

``protocol="during"`` (the authors'): the dense run itself shapes the weights from ``start_epoch`` to the end of
``epochs`` at the training learning rate (GSP projections, gradual magnitude or the regularizer), then masks by
global magnitude and ``finetune_epochs`` of masked finetuning.

A run folder holds ``manifest.json`` with every setting that changes the result; a folder holding other
settings is refused. Phases checkpoint each epoch atomically (see ``training``), so a killed run resumes
bit-identically.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from ..io import check_paths
from ..prune import GSPPruner, GradualMagnitudePruner, MagnitudePruner, Pruner, RandomPruner, Schedule, hoyer_square
from . import _files
from . import _pruning as P
from .config import DEFAULTS, GRADUAL, HOYER_GRID, METHODS, Config, settings_key  # noqa: F401 (re-exported)
from .datasets import default_cache_dir, load_dataset
from .models import build_model, prunable_parameters
from .training import branch, evaluate, save_state_dict, train


def run(config: Config) -> dict:
    """Run one experiment (resuming whatever is already in ``config.out``); returns the report."""
    c = config.resolve()
    out = Path(c.out)
    cache = Path(c.cache_dir) if c.cache_dir else default_cache_dir()
    # --overwrite empties the run folder: it must not be, or hold, the data or the dense-model cache
    check_paths({"--data": c.data, "--cache": cache}, {"--out": out})
    real_out, real_cache = Path(os.path.realpath(out)), Path(os.path.realpath(cache))
    if real_cache in real_out.parents:  # (the cache's own folders: a run there could empty a dense model's)
        raise ValueError(f"--out: got {str(out)!r}, inside the cache {str(cache)!r}; expected a folder outside it")
    data = load_dataset(c.dataset, c.data, cache_dir=cache, train_subset=c.train_subset)
    data_id = data.fingerprint()
    if c.gsp_every is None and c.method in ("gsp", "gmp"):  # resolved before the manifest: --gsp-every N given
        c.gsp_every = max(1, data.num_batches("train", c.batch_size) // 3)  # as the default resumes the same run
    settings = c.settings(data_id)
    if _files.claim_folder(out, settings, overwrite=c.overwrite) and (out / "report.json").exists():
        return _files.read_json(out / "report.json")
    if c.method == "deephoyer" and c.hoyer_lambda is None:
        return _select_lambda(c, out, settings)
    if c.device == "cpu" and c.dataset == "digits":
        torch.set_num_threads(1)  # a tiny MLP runs several times faster on one thread than on shared cores
    data = data.to(c.device)
    t_start = time.perf_counter()
    torch.manual_seed(c.seed)
    model = build_model(c.model, data.input_shape, data.num_classes).to(c.device)
    # A CPU test pass over 10k CIFAR images costs as much as a training epoch on a subset: evaluate at the end only.
    ev = 0 if (c.device == "cpu" and c.dataset == "cifar10") else 1
    common = dict(batch_size=c.batch_size, progress=c.progress, eval_every=ev)

    # Dense model, cached by its own settings; it keeps the epoch the during-protocol branches from.
    dense_settings = c.dense_settings(data_id)
    dense_dir = cache / "dense" / f"{c.dataset}-{c.model}-seed{c.seed}-e{c.epochs}-{settings_key(dense_settings)}"
    _files.claim_folder(dense_dir, dense_settings, what="dense cache")
    dense_cached = (dense_dir / "state.json").exists() and \
        _files.read_json(dense_dir / "state.json")["epoch"] >= c.epochs
    # Snapshots from the middle on stay (a few MB each), so a later --protocol during run can branch from them.
    keep = set(range(c.epochs // 2, c.epochs)) | ({c.start_epoch} if c.start_epoch is not None else set())
    dstate = train(model, data, epochs=c.epochs, lr=c.lr, ckpt_dir=dense_dir, seed=c.seed, schedule=c.schedule,
                   desc="dense", keep_epochs=keep, **common)
    last = dstate["history"][-1] if dstate["history"] else {}
    dense_acc = last["test_accuracy"] if "test_accuracy" in last else evaluate(model, data)
    params = prunable_parameters(model)
    spe = data.num_batches("train", c.batch_size)
    every = c.gsp_every or max(1, spe // 3)  # the authors' CIFAR rate: ~3 projections per epoch (set above)
    timings = {"dense_train_s": dstate["seconds"], "dense_cached": dense_cached}
    gsp = None
    if c.method.startswith("gsp"):
        gsp = GSPPruner(model, c.gsp_sparsity, vectors=c.vectors, scope=c.scope, normalize=c.normalize,
                        keep_pre_projection=c.values != "projected")
    proj_time = [0.0]

    def project_now():
        gsp.project()
        proj_time[0] += gsp.last_time

    # Shaping phase of the gradual methods: GSP projections, gradual magnitude masks or the regularizer.
    gmp = None
    # The pruned model (weights + mask buffers, the pruning figures in its metadata) is one atomic file, so a
    # resumed run never pairs masks with other weights.
    pruned_file = out / "pruned.safetensors"
    shaping = c.method in GRADUAL and not pruned_file.exists()
    if shaping:
        if c.protocol == "after":
            phase, epochs, lr, sched, seed, first = out / "induce", c.induce_epochs, c.finetune_lr, "cosine", c.seed + 1, 0
        else:
            phase, epochs, lr, sched, seed, first = out / "train", c.epochs, c.lr, c.schedule, c.seed, c.start_epoch
            if not branch(dense_dir, first, phase, c.epochs):  # no snapshot: retrain to it (same numbers)
                torch.manual_seed(c.seed)
                model.load_state_dict(build_model(c.model, data.input_shape, data.num_classes).state_dict())
                train(model, data, epochs=c.epochs, lr=c.lr, ckpt_dir=phase, seed=c.seed, schedule=c.schedule,
                      desc="dense to start", stop_at=first, **common)
        steps = (epochs - first) * spe
        hook = extra = before = None
        if c.method == "gsp":
            def hook(step, opt):
                if (step - first * spe) % every == 0:
                    project_now()
            if c.protocol == "after":
                before = lambda opt: project_now()  # noqa: E731
        elif c.method == "gmp":
            # Cubic ramp of the zero fraction over the phase; masks only grow and are enforced after each step.
            gmp = GradualMagnitudePruner(model, Schedule(c.sparsity, start=first * spe, every=every, ramp="cubic",
                                                        ramp_steps=max(steps - every, 1)))
            gmp.set_masks({t.name: torch.ones(t.shape, dtype=torch.bool) for t in gmp.targets})

            def hook(step, opt):
                gmp.step(step)
                gmp.apply_masks(opt)
        else:
            extra = lambda m: c.hoyer_lambda * hoyer_square(list(params.values()))  # noqa: E731
        st = train(model, data, epochs=epochs, lr=lr, ckpt_dir=phase, seed=seed, schedule=sched, after_step=hook,
                   extra_loss=extra, before_start=before, desc=f"{c.method} {c.protocol}", **common)
        timings["shaping_s"] = sum(h["seconds"] for h in st["history"][first:])

    # Masks: fixed once and saved, so a resumed finetune uses the same ones.
    t0 = time.perf_counter()
    if pruned_file.exists():
        from safetensors import safe_open
        from safetensors.torch import load_file

        sd = load_file(str(pruned_file))
        pruner = Pruner(model)
        pruner.load_masks(sd)
        model.load_state_dict(sd)
        with safe_open(str(pruned_file), "pt") as f:
            prune_info = json.loads(f.metadata()["prune_info"])
    else:
        if gsp is not None:
            project_now()
        projection_zeros = P.zero_fraction(params)
        # Exact zero fractions for every method: keep_zeros=False lets surplus projection zeros regrow.
        if gsp is not None:
            pruner = gsp
            gsp.finalize(c.sparsity, scope="model", keep_zeros=False, values=c.values)
        elif c.method == "random":
            pruner = RandomPruner(model)
            pruner.prune(c.sparsity, scope="layer", seed=c.seed)
        else:
            pruner = gmp or MagnitudePruner(model)
            pruner.prune(c.sparsity, scope="model")
        prune_info = {"zero_fraction_before_masks": projection_zeros,
                      "accuracy_before_finetune": evaluate(model, data),
                      "prune_s": time.perf_counter() - t0, "projection_s": proj_time[0]}
        from safetensors.torch import save_file

        sd = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
        _files.atomic_write(pruned_file, lambda tmp: save_file(sd, str(tmp), {"prune_info": json.dumps(prune_info)}))

    ft_epochs = c.finetune_epochs - (c.induce_epochs if c.method in GRADUAL and c.protocol == "after" else 0)
    fstate = train(model, data, epochs=ft_epochs, lr=c.finetune_lr, ckpt_dir=out / "finetune", seed=c.seed + 2,
                   schedule="cosine", after_step=lambda step, opt: pruner.apply_masks(opt),
                   desc=f"{c.method} finetune", **common)
    pruner.remove()  # plain parameters with real zeros, no mask buffers
    accuracy, val_accuracy = evaluate(model, data), evaluate(model, data, split="val")
    timings.update(finetune_s=fstate["seconds"], projection_s=prune_info["projection_s"] + proj_time[0],
                   prune_s=prune_info["prune_s"], total_s=time.perf_counter() - t_start)
    save_state_dict(out / "model.safetensors", model)
    shaping_epochs = 0 if c.method not in GRADUAL else (
        c.induce_epochs if c.protocol == "after" else c.epochs - c.start_epoch)
    report = {
        "method": c.method, "protocol": c.protocol, "dataset": c.dataset, "model": c.model, "seed": c.seed,
        "target_sparsity": float(c.sparsity), "zero_fraction": P.zero_fraction(params),
        "accuracy": accuracy, "val_accuracy": val_accuracy, "dense_accuracy": dense_acc,
        "accuracy_before_finetune": prune_info["accuracy_before_finetune"],
        "zero_fraction_before_masks": prune_info["zero_fraction_before_masks"],
        "gsp_sparsity": c.gsp_sparsity, "gsp_every": every if c.method in ("gsp", "gmp") else None,
        "vectors": c.vectors, "scope": c.scope, "normalize": c.normalize, "values": c.values,
        "hoyer_lambda": c.hoyer_lambda,
        "epochs": c.epochs, "finetune_epochs": c.finetune_epochs, "induce_epochs": c.induce_epochs,
        "start_epoch": c.start_epoch,
        "budget": {"dense_epochs": c.epochs, "epochs_after_dense": c.finetune_epochs,
                   "total_epochs": c.epochs + c.finetune_epochs, "shaping_epochs": shaping_epochs,
                   "masked_finetune_epochs": ft_epochs},
        "train_subset": c.train_subset, "layers": P.layer_report(params), "timings": timings,
        "settings": settings, "config": {k: v for k, v in c.__dict__.items() if k not in ("progress", "extra")},
        "device": c.device, "torch": torch.__version__, "history": {"finetune": fstate["history"]},
    }
    _files.write_json(out / "report.json", report)
    return report


def _select_lambda(c: Config, out: Path, settings: dict) -> dict:
    """DeepHoyer with lambda chosen on the validation split: one full run per grid value (in ``out/lambda-*``),
    the best validation accuracy wins (ties: the smaller lambda); the test set is only read for the report."""
    runs = {}
    for lam in HOYER_GRID[c.dataset]:
        runs[lam] = run(replace(c, hoyer_lambda=lam, out=str(out / f"lambda-{lam:g}"), overwrite=False))
    best = max(runs, key=lambda lam: (runs[lam]["val_accuracy"], -lam))
    report = dict(runs[best])
    report["hoyer_lambda_selection"] = {f"{lam:g}": r["val_accuracy"] for lam, r in runs.items()}
    report["settings"] = settings  # what claim_folder wrote to out's manifest
    report["timings"] = {**report["timings"], "selection_total_s": sum(r["timings"]["total_s"] for r in runs.values())}
    _files.atomic_write(out / "model.safetensors",
                        lambda tmp: shutil.copyfile(out / f"lambda-{best:g}" / "model.safetensors", tmp))
    _files.write_json(out / "report.json", report)
    return report


def summary(report: dict) -> str:
    """The one-line JSON the CLI prints for a run."""
    keys = ("method", "protocol", "target_sparsity", "zero_fraction", "accuracy", "val_accuracy", "dense_accuracy",
            "accuracy_before_finetune")
    return json.dumps({k: report.get(k) for k in keys})

"""Training and finetuning loops: SGD (momentum 0.9, weight decay 1e-4), per-iteration LR schedules, hooks after
every optimizer step (projection, mask enforcement), and an end-of-epoch checkpoint so a killed run resumes.

A checkpoint directory holds ``model.safetensors`` (weights and buffers), ``optim.pt`` (optimizer state) and
``state.json`` (epochs done, steps, history); ``state.json`` is written last, so it only ever points at a
complete checkpoint.
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..io import atomic_path
from ..prune.checkpoint import save_state_dict as write_state_dict
from .datasets import Dataset

SCHEDULES = ("cosine", "step", "constant")
STEP_MILESTONES = (0.4, 0.6, 0.8)  # the CIFAR recipe's drops at 80/120/160 of 200 epochs, as fractions


def lr_at(schedule: str, base_lr: float, step: int, total_steps: int) -> float:
    """Learning rate at iteration ``step`` (0-based) of ``total_steps``."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: got {schedule!r}, expected one of {SCHEDULES}")
    t = step / max(total_steps, 1)
    if schedule == "cosine":
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "step":
        return base_lr * 0.1 ** sum(t >= m for m in STEP_MILESTONES)
    return base_lr


def has_conv(model: nn.Module) -> bool:
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1000, device=None) -> float:
    """Top-1 test accuracy in [0, 1]."""
    was = model.training
    model.eval()
    correct = 0
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    for x, y in data.batches("test", batch_size):
        with _autocast(dev):
            correct += (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return correct / len(data.y_test)


def _autocast(dev: torch.device):
    # bf16 autocast on GPUs only: on the CPU it is slower for these small convs and changes the numbers.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def save_state_dict(path: Path, model: nn.Module) -> None:
    """The model's weights as safetensors on the CPU (atomic; the pruning library's writer)."""
    write_state_dict({k: v.detach().cpu() for k, v in model.state_dict().items()}, path)


def load_state_dict(path: Path, model: nn.Module) -> None:
    from safetensors.torch import load_file

    sd = load_file(str(path))
    model.load_state_dict(sd)


class _Progress:
    """A rich progress bar on a terminal; one log line per epoch otherwise (nohup logs stay readable)."""

    def __init__(self, enabled: bool | None, desc: str, total: int):
        self.enabled = sys.stderr.isatty() if enabled is None else enabled
        self.desc, self.total = desc, total
        self._p = None

    def __enter__(self):
        if self.enabled:
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._p = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                               TimeRemainingColumn(), TextColumn("{task.fields[info]}"), transient=False)
            self._p.__enter__()
            self._task = self._p.add_task(self.desc, total=self.total, info="")
        return self

    def advance(self, n: int, info: str = ""):
        if self._p is not None:
            self._p.update(self._task, advance=n, info=info)

    def epoch_done(self, line: str):
        if self._p is None:
            print(f"{self.desc}: {line}", file=sys.stderr, flush=True)

    def __exit__(self, *exc):
        if self._p is not None:
            self._p.__exit__(*exc)


def train(model: nn.Module, data: Dataset, *, epochs: int, lr: float, ckpt_dir: str | Path, seed: int,
          batch_size: int = 128, schedule: str = "cosine", momentum: float = 0.9, weight_decay: float = 1e-4,
          augment: bool = True, after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          before_start: Callable[[torch.optim.Optimizer], None] | None = None,
          desc: str = "train", progress: bool | None = None, eval_every: int = 1,
          stop_after: int | None = None) -> dict:
    """Train ``model`` (already on the data's device) for ``epochs``, resuming from ``ckpt_dir`` if it holds a
    checkpoint of this phase. Returns the state dict written to ``state.json`` (epochs done, history, time).

    ``after_step(step, optimizer)`` runs after every optimizer step (``step`` counts from 1 over the whole phase,
    so hooks keyed on it behave the same after a resume). ``stop_after`` stops after that many epochs of this
    call (for tests that simulate an interruption).
    """
    for name, v in (("epochs", epochs), ("batch_size", batch_size), ("seed", seed)):
        if isinstance(v, bool) or not isinstance(v, int) or v < (0 if name != "batch_size" else 1):
            raise ValueError(f"{name}: got {v!r}, expected a non-negative int")
    if not (isinstance(lr, (int, float)) and lr > 0):
        raise ValueError(f"lr: got {lr!r}, expected a positive float")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: got {schedule!r}, expected one of {SCHEDULES}")
    ckpt = Path(ckpt_dir)
    ckpt.mkdir(parents=True, exist_ok=True)
    dev = next(model.parameters()).device
    if has_conv(model):
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    state = {"epoch": 0, "step": 0, "epochs": epochs, "history": [], "seconds": 0.0}
    state_file = ckpt / "state.json"
    if state_file.exists():
        state = json.loads(state_file.read_text())
        if state.get("epochs") != epochs:
            raise ValueError(f"{ckpt}: got a checkpoint of a {state.get('epochs')}-epoch phase, expected {epochs} "
                             "epochs; use another --out or delete it")
        load_state_dict(ckpt / "model.safetensors", model)
        if (ckpt / "optim.pt").exists():
            opt.load_state_dict(torch.load(ckpt / "optim.pt", map_location=dev, weights_only=True))
    elif before_start is not None:
        before_start(opt)
    steps_per_epoch = data.num_batches("train", batch_size)
    total = epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    done_now = 0
    with _Progress(progress, desc, total) as bar:
        bar.advance(state["step"])
        while state["epoch"] < epochs:
            if stop_after is not None and done_now >= stop_after:
                break
            t0 = time.perf_counter()
            # One generator per (seed, epoch): a resumed run draws the same batches and crops.
            gen = torch.Generator().manual_seed(seed * 100003 + state["epoch"])
            loss_sum = torch.zeros((), device=dev)
            nb = 0
            for x, y in data.batches("train", batch_size, shuffle=True, augment=augment and data.is_image,
                                     generator=gen):
                for g in opt.param_groups:
                    g["lr"] = lr_at(schedule, lr, state["step"], total)
                with _autocast(dev):
                    loss = loss_fn(model(x), y)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                state["step"] += 1
                if after_step is not None:
                    after_step(state["step"], opt)
                loss_sum += loss.detach()
                nb += 1
                if nb % 20 == 0:
                    bar.advance(20, f"loss {loss.item():.3f}")
            bar.advance(nb % 20)
            state["epoch"] += 1
            entry = {"epoch": state["epoch"], "loss": loss_sum.item() / max(nb, 1),
                     "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            if eval_every and (state["epoch"] % eval_every == 0 or state["epoch"] == epochs):
                entry["test_accuracy"] = evaluate(model, data)
            state["history"].append(entry)
            state["seconds"] += entry["seconds"]
            done_now += 1
            save_state_dict(ckpt / "model.safetensors", model)
            with atomic_path(ckpt / "optim.pt") as tmp:
                torch.save(opt.state_dict(), tmp)
            with atomic_path(state_file) as tmp:
                Path(tmp).write_text(json.dumps(state, indent=1))
            acc = f" acc {entry['test_accuracy']:.4f}" if "test_accuracy" in entry else ""
            bar.epoch_done(f"epoch {state['epoch']}/{epochs} loss {entry['loss']:.4f}{acc} "
                           f"({entry['seconds']:.1f}s)")
    return state

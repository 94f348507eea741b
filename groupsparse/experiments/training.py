"""Training and finetuning loops: SGD (momentum 0.9, weight decay 1e-4), per-iteration LR schedules, hooks after
every optimizer step (projection, mask enforcement), and an end-of-epoch checkpoint so a killed run resumes.

A phase's checkpoint directory holds one folder per saved epoch, ``epoch-NNNN/`` with ``model.safetensors``
(weights and buffers, masks included), ``optim.pt`` (optimizer state) and ``rng.pt`` (torch, NumPy and Python
RNG states), each written into a temporary folder renamed into place; then ``state.json`` (epochs done, steps,
history, and the name of that folder) is written atomically. A kill at any point leaves ``state.json`` pointing
at a complete epoch, so a resumed run continues bit-identical to an uninterrupted one.
"""

from __future__ import annotations

import math
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Callable

import torch
from torch import nn

import numpy as np

from . import _files
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
def evaluate(model: nn.Module, data: Dataset, *, batch_size: int = 1000, device=None, split: str = "test") -> float:
    """Top-1 accuracy in [0, 1] on ``split`` ("test" or "val")."""
    was = model.training
    model.eval()
    correct = 0
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    for x, y in data.batches(split, batch_size):
        with _autocast(dev):
            correct += (model(x).argmax(1) == y).sum().item()
    model.train(was)
    return correct / len(data.split(split)[1])


def _autocast(dev: torch.device):
    # bf16 autocast on GPUs only: on the CPU it is slower for these small convs and changes the numbers.
    if dev.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _cpu_state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


def save_state_dict(path: Path, model: nn.Module) -> None:
    """The model's weights as safetensors on the CPU, written atomically."""
    from safetensors.torch import save_file

    sd = _cpu_state(model)
    _files.atomic_write(path, lambda tmp: save_file(sd, str(tmp)))


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


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def _set_rng_state(st: dict) -> None:
    torch.set_rng_state(st["torch"])
    np.random.set_state(st["numpy"])
    random.setstate(st["python"])
    if st.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _epoch_dir(epoch: int) -> str:
    return f"epoch-{epoch:04d}"


def _write_checkpoint(ckpt: Path, epoch: int, model: nn.Module, opt: torch.optim.Optimizer) -> None:
    from safetensors.torch import save_file

    sd, osd, rng = _cpu_state(model), opt.state_dict(), _rng_state()

    def write(tmp: Path) -> None:
        tmp.mkdir()
        save_file(sd, str(tmp / "model.safetensors"))
        torch.save(osd, tmp / "optim.pt")
        torch.save(rng, tmp / "rng.pt")

    _files.atomic_write(ckpt / _epoch_dir(epoch), write, folder=True)


def load_checkpoint(folder: Path, model: nn.Module, opt: torch.optim.Optimizer | None = None) -> None:
    """Restore weights (and optimizer and RNG states when ``opt`` is given) from an ``epoch-NNNN`` folder."""
    from safetensors.torch import load_file

    try:
        # A branch point saved before masks existed (gradual magnitude starts with all-True masks) has no
        # *_mask entries: those, and only those, may be missing.
        missing, unexpected = model.load_state_dict(load_file(str(folder / "model.safetensors")), strict=False)
        if unexpected or any(not k.endswith("_mask") for k in missing):
            raise RuntimeError(f"missing keys {missing[:4]}, unexpected keys {unexpected[:4]}")
        if opt is not None:
            dev = next(model.parameters()).device
            opt.load_state_dict(torch.load(folder / "optim.pt", map_location=dev, weights_only=True))
            _set_rng_state(torch.load(folder / "rng.pt", weights_only=False))
    except (OSError, RuntimeError, ValueError) as e:
        raise ValueError(f"{folder}: got an unreadable checkpoint ({type(e).__name__}: {str(e)[:200]}), expected "
                         "the files this program wrote; delete the run folder to start over") from None


def branch(src: Path, epoch: int, dst: Path, epochs: int) -> bool:
    """Start phase folder ``dst`` from epoch ``epoch`` of the phase in ``src`` (same schedule of ``epochs``);
    returns False when ``src`` kept no snapshot of that epoch. Used by the during-training protocol."""
    snap = Path(src) / _epoch_dir(epoch)
    if (Path(dst) / "state.json").exists():
        return True
    if not (snap / "model.safetensors").exists() or not (Path(src) / "state.json").exists():
        return False
    st = _files.read_json(Path(src) / "state.json")
    if st.get("epochs") != epochs or st.get("epoch", 0) < epoch:
        return False
    _files.atomic_write(Path(dst) / _epoch_dir(epoch), lambda tmp: shutil.copytree(snap, tmp), folder=True)
    state = {"epoch": epoch, "step": st["steps_per_epoch"] * epoch, "epochs": epochs,
             "steps_per_epoch": st["steps_per_epoch"], "history": st["history"][:epoch],
             "seconds": sum(h["seconds"] for h in st["history"][:epoch]), "checkpoint": _epoch_dir(epoch)}
    _files.write_json(Path(dst) / "state.json", state)
    return True


def train(model: nn.Module, data: Dataset, *, epochs: int, lr: float, ckpt_dir: str | Path, seed: int,
          batch_size: int = 128, schedule: str = "cosine", momentum: float = 0.9, weight_decay: float = 1e-4,
          augment: bool = True, after_step: Callable[[int, torch.optim.Optimizer], None] | None = None,
          extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
          before_start: Callable[[torch.optim.Optimizer], None] | None = None,
          desc: str = "train", progress: bool | None = None, eval_every: int = 1,
          stop_after: int | None = None, stop_at: int | None = None, keep_epochs=()) -> dict:
    """Train ``model`` (already on the data's device) for ``epochs``, resuming from ``ckpt_dir`` if it holds a
    checkpoint of this phase. Returns the state dict written to ``state.json`` (epochs done, history, time).

    ``after_step(step, optimizer)`` runs after every optimizer step (``step`` counts from 1 over the whole phase,
    so hooks keyed on it behave the same after a resume). ``stop_after`` stops after that many epochs of this
    call (tests simulate an interruption), ``stop_at`` once that epoch is done (the learning-rate schedule still
    spans ``epochs``). Epoch folders in ``keep_epochs`` are kept (branch points); older ones are removed.
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
    _files.clean_temporaries(ckpt)
    if has_conv(model):
        model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    steps_per_epoch = data.num_batches("train", batch_size)
    state = {"epoch": 0, "step": 0, "epochs": epochs, "steps_per_epoch": steps_per_epoch, "history": [],
             "seconds": 0.0, "checkpoint": None}
    state_file = ckpt / "state.json"
    if state_file.exists():
        state = _files.read_json(state_file)
        if state.get("epochs") != epochs or state.get("steps_per_epoch") != steps_per_epoch:
            raise ValueError(f"{ckpt}: got a checkpoint of a {state.get('epochs')}-epoch phase, expected {epochs} "
                             "epochs; use another --out or delete it")
        if state["checkpoint"]:
            load_checkpoint(ckpt / state["checkpoint"], model, opt)
        end = min(epochs, stop_at) if stop_at is not None else epochs
        if state["epoch"] < end:
            print(f"{desc}: resuming from epoch {state['epoch']}", file=sys.stderr, flush=True)
    elif before_start is not None:
        before_start(opt)
    total = epochs * steps_per_epoch
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    dev = next(model.parameters()).device
    done_now = 0
    with _Progress(progress, desc, total) as bar:
        bar.advance(state["step"])
        while state["epoch"] < epochs and (stop_at is None or state["epoch"] < stop_at):
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
                entry["val_accuracy"] = evaluate(model, data, split="val")
                entry["test_accuracy"] = evaluate(model, data)
            state["history"].append(entry)
            state["seconds"] += entry["seconds"]
            done_now += 1
            old = state["checkpoint"]
            _write_checkpoint(ckpt, state["epoch"], model, opt)
            state["checkpoint"] = _epoch_dir(state["epoch"])
            _files.write_json(state_file, state)  # last: only now does the run move on to this epoch
            if old and int(old.split("-")[1]) not in keep_epochs:
                shutil.rmtree(ckpt / old, ignore_errors=True)
            acc = f" acc {entry['test_accuracy']:.4f}" if "test_accuracy" in entry else ""
            bar.epoch_done(f"epoch {state['epoch']}/{epochs} loss {entry['loss']:.4f}{acc} "
                           f"({entry['seconds']:.1f}s)")
    return state

"""``groupsparse prune-checkpoint``: single-shot GSP of a checkpoint file, without the model's code."""

from __future__ import annotations

import time

import click

TENSOR_RULE_HELP = ("Without --any-tensor, a tensor is pruned when it is floating, 2-D (linear) or 3-5-D (conv), "
                    "its name ends in 'weight' and does not look like a norm or embedding (norm, bn, ln, embed, wte, wpe).")
# below this many floating entries a checkpoint takes about a second: no progress bar
_PROGRESS_MIN = 20_000_000


@click.command("prune-checkpoint")
@click.argument("inp", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--sparsity", "-s", type=float, required=True, help="Target average Hoyer sparsity in [0, 1].")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Output .safetensors/.pt (never the input; written atomically).")
@click.option("--vectors", type=click.Choice(["filter", "fan_out", "kernel_position", "kernel", "layer"]),
              default="filter", show_default=True, help="How a tensor is cut into vectors.")
@click.option("--scope", type=click.Choice(["layer", "model"]), default="layer", show_default=True,
              help="layer: each tensor its own group at the target; model: one group over all tensors.")
@click.option("--normalize", type=click.Choice(["none", "vector", "layer"]), default="none", show_default=True,
              help="Rescale vectors before the projection: vector (any scope: vectors compete on shape only) or "
              "layer (--scope model: tensors compete on shape only).")
@click.option("--include", multiple=True, help="Glob (or re:REGEX) on tensor names; only matches are pruned. Repeatable.")
@click.option("--exclude", multiple=True, help="Glob (or re:REGEX) on tensor names never pruned. Repeatable.")
@click.option("--any-tensor", is_flag=True, help="Drop the name/shape rule (" + TENSOR_RULE_HELP + "): every floating "
              "tensor matching --include (or every floating tensor) is pruned.")
@click.option("--key", default=None, help="Key of the state_dict inside a .pt checkpoint (default: auto).")
@click.option("--engine", type=click.Choice(["auto", "numba", "torch"]), default="auto", show_default=True)
@click.option("--json", "json_path", type=click.Path(dir_okay=False), default=None,
              help="Also write the report as JSON (a path other than IN and OUT).")
@click.option("--progress/--no-progress", default=None, help="Progress bar [on a terminal, for large checkpoints].")
def prune_checkpoint(inp, sparsity, out, vectors, scope, normalize, include, exclude, any_tensor, key, engine,
                     json_path, progress):
    """Project the layer weights of checkpoint IN to an average Hoyer sparsity and write all tensors to OUT.

    \b
    Which tensors: see --any-tensor. Tensors whose vectors would have one entry (e.g. 1x1 convs with
    --vectors kernel) are left as they are. Tied weights (shared storage; lm_head tied to the embedding, by
    name and config.json's tie_word_embeddings) stay tied: pruned together, or left dense when one of them is
    not selected. Everything else in IN (optimizer state, epoch, EMA weights of a .pt) is copied unchanged.
    """
    import re
    import warnings
    from pathlib import Path

    import torch

    from ..io import check_paths, check_suffix
    from .checkpoint import SUFFIXES, find_ties, load_checkpoint, prune_state_dict, save_state_dict

    if not 0 <= sparsity <= 1:  # checked before reading a possibly large file
        raise ValueError(f"sparsity: got {sparsity}, expected a number in [0, 1]")
    if normalize == "layer" and scope == "layer":  # ("vector" there: one tensor's vectors compete on shape only)
        raise ValueError("--normalize: got 'layer' with --scope layer, expected --scope model (it balances the "
                         "tensors that share one group; one tensor alone has one scale)")
    check_suffix(out, SUFFIXES)
    cfg = Path(inp).parent / "config.json"
    check_paths({"IN": inp, "config.json beside IN": cfg if cfg.exists() else None},
                {"--out": out, "--json": json_path})
    for p in include + exclude:
        if p.startswith("re:"):
            try:
                re.compile(p[3:])
            except re.error as e:
                raise ValueError(f"--include/--exclude: got {p!r}, expected a valid regular expression ({e})") from e
    t = {}
    t0 = time.perf_counter()
    ckpt = load_checkpoint(inp, key=key)
    t["load"] = time.perf_counter() - t0
    sd = ckpt.state_dict
    # printed after every file is written: a reader that leaves early (`| head`) must not cost an output
    notes, dropped = [], []
    to_safetensors = Path(out).suffix.lower() == ".safetensors"
    if to_safetensors:
        # checked before the projection: a .safetensors file holds dense tensors only
        from ..io import check_safetensors_names
        from .checkpoint import _dense

        check_safetensors_names(sd, out, f"IN {inp!r}")

        dropped = ckpt.extras + [k for k, v in sd.items() if not isinstance(v, torch.Tensor)]
        unwritable = [k for k, v in sd.items() if isinstance(v, torch.Tensor) and not _dense(v)]
        if unwritable:
            raise ValueError(f"--out: got {out!r}, but {unwritable[0]!r} of {inp!r} is a sparse or meta tensor, "
                             "which .safetensors cannot hold; expected a .pt output")
        if dropped:
            notes.append(f"{', '.join(map(repr, dropped))} of IN are not written: .safetensors holds the tensors "
                         "only (use a .pt OUT to keep them)")
            sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    size = sum(v.numel() for v in sd.values() if hasattr(v, "is_floating_point") and v.is_floating_point())
    t0 = time.perf_counter()
    with _progress_bar(progress, size) as advance, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            new, names, infos = prune_state_dict(sd, sparsity, vectors=vectors, scope=scope,
                                                 normalize=None if normalize == "none" else normalize,
                                                 include=list(include) or None, exclude=list(exclude) or None,
                                                 rule=(lambda n, t: True) if any_tensor else None, engine=engine,
                                                 ties=find_ties(sd, config=ckpt.config), progress=advance)
        except ValueError as e:  # no tensor selected, NaN entries...: say which file
            raise ValueError(f"IN {inp!r}: {e}") from e
    t["project"] = time.perf_counter() - t0
    notes += [str(w.message) for w in caught]
    t0 = time.perf_counter()
    report = _report(new, names, vectors)
    t["report"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_state_dict(new, out, input_path=inp, container=ckpt)
    t["save"] = time.perf_counter() - t0
    t["total"] = sum(t.values())
    if json_path:
        import json

        from ..io import atomic_path

        doc = report.to_dict()
        doc.update(target=sparsity, scope=scope, seconds=t, input=str(inp), output=str(out),
                   state_dict_key=ckpt.key, copied_unchanged=[] if to_safetensors else ckpt.extras,
                   not_written=dropped)
        with atomic_path(json_path) as tmp:
            tmp.write_text(json.dumps(doc, indent=2) + "\n")
    for n in notes:
        click.echo(f"note: {n}")
    report.print(title=f"{inp} -> {out}")
    where = ""
    if ckpt.key:
        what = "not written" if to_safetensors else "copied unchanged"
        where = f" (state_dict under {ckpt.key!r}; {', '.join(map(repr, ckpt.extras))} {what})"
    click.echo(f"{len(names)} tensors projected to average Hoyer sparsity {sparsity} ({vectors}, scope {scope}){where}"
               f" -> {out}")
    # a .safetensors file is memory-mapped: its pages are read when the projection and the writer first touch them
    lazy = " (mapped, read on use)" if Path(inp).suffix.lower() == ".safetensors" else ""
    click.echo("seconds: " + ", ".join(f"{k}{lazy if k == 'load' else ''} {v:.2f}" for k, v in t.items()))


class _progress_bar:
    """A rich progress bar on stderr for checkpoints of at least _PROGRESS_MIN entries on a terminal (or when
    asked); yields the ``progress`` callback of prune_state_dict, or None."""

    def __init__(self, wanted: bool | None, size: int):
        self.wanted, self.size, self.bar = wanted, size, None

    def __enter__(self):
        from rich.console import Console

        console = Console(stderr=True)
        if not (self.wanted if self.wanted is not None else console.is_terminal and self.size >= _PROGRESS_MIN):
            return None
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        self.bar = Progress(TextColumn("projecting {task.fields[name]}"), BarColumn(), TimeElapsedColumn(),
                            console=console, transient=True)
        self.bar.start()
        task = self.bar.add_task("project", total=None, name="")

        def advance(name: str, done: int, total: int) -> None:
            self.bar.update(task, completed=done, total=total, name=name)

        return advance

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()
        return False


def _report(state_dict, names, vectors):
    """The sparsity report of the pruned tensors in about one pass over them (float32 sums; the general
    :func:`~groupsparse.prune.sparsity_report` works in float64 copies, several times slower)."""
    import torch

    from .report import LayerStats, SparsityReport
    from .vectors import as_vectors, check_mode

    mode = check_mode(vectors)
    rep = SparsityReport(mode)
    for n in names:
        w = state_dict[n].detach()
        zeros = w.numel() - int(torch.count_nonzero(w))
        hoyer = None
        m = as_vectors(w if w.dtype in (torch.float32, torch.float64) else w.float(), mode)
        if m.shape[0] and m.shape[1] >= 2:
            l1, l2 = m.abs().sum(1).double(), torch.linalg.vector_norm(m, dim=1).double()  # sums in the weights' dtype
            sq = m.shape[1] ** 0.5
            sp = torch.where(l2 > 0, (sq - l1 / l2.clamp_min(torch.finfo(torch.float64).tiny)) / (sq - 1), 1.0)
            hoyer = float(sp.clamp(0, 1).mean())
        rep.layers.append(LayerStats(n, list(w.shape), w.numel(), zeros, zeros / max(w.numel(), 1), hoyer))
    return rep


commands = [prune_checkpoint]

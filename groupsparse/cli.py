"""The ``groupsparse`` command line (click).

Subcommands live beside the code they drive and are registered in ``_SUBCOMMANDS``: ``nmf``
(groupsparse.nmf.cli), ``prune-checkpoint`` (groupsparse.prune.cli), ``prune``/``report``
(groupsparse.experiments.cli), ``demo`` (groupsparse.demo); ``project`` is defined here.

Start-up imports only click: a subcommand's module (and torch, numba, scikit-learn behind it) is imported when
that subcommand runs. Every failure ends in one line ``groupsparse: error: ...`` on stderr and a non-zero
exit status; ``GROUPSPARSE_DEBUG=1`` shows the traceback instead.
"""

from __future__ import annotations

import errno
import importlib
import os
import sys
import time

import click

# (module, attribute holding a list of click commands). A module is imported only when one of its commands runs.
_SUBCOMMANDS = [
    ("groupsparse.nmf.cli", "commands"),
    ("groupsparse.prune.cli", "commands"),
    ("groupsparse.experiments.cli", "commands"),
    ("groupsparse.demo", "commands"),
    ("groupsparse.prune.lm_cli", "commands"),
]
# Names and one-line help of the registered commands, so that `groupsparse --help` and running one command need
# no import of the others. A module of _SUBCOMMANDS whose commands are not listed here still works: it is imported
# when --help lists the commands or when a name is not found. tests/test_cli_errors.py checks this table.
_LISTING = {
    "demo": ("groupsparse.demo", "Show a projection, a small sparse NMF and a digits pruning run on embedded data "
                                 "(about a minute)."),
    "nmf": ("groupsparse.nmf.cli", "Sparse NMF with grouped sparse projection: the paper's experiments."),
    "prune": ("groupsparse.experiments.cli", "Train (or reuse) a dense model, prune it to --sparsity zeros by "
                                             "--method, finetune, report."),
    "prune-checkpoint": ("groupsparse.prune.cli", "Project the layer weights of checkpoint IN to an average Hoyer "
                                                  "sparsity and write all tensors to OUT."),
    "prune-lm": ("groupsparse.prune.lm_cli", "Prune the decoder Linear layers of MODEL_DIR in one shot and "
                                             "save_pretrained the result to OUT."),
    "report": ("groupsparse.experiments.cli", "Aggregate run folders (searched for report.json) into an "
                                              "accuracy-vs-zero-fraction table."),
}


def _describe(e: BaseException) -> str:
    """One line saying what failed (and which file, when the exception knows it)."""
    if isinstance(e, click.UsageError):
        where = e.ctx.command_path if e.ctx is not None else "groupsparse"
        hint = f" (see '{where} --help')" if e.ctx is not None else ""
        msg = f"{where.split(' ', 1)[1]}: {e.format_message()}{hint}" if " " in where else e.format_message() + hint
    elif isinstance(e, click.ClickException):
        msg = e.format_message()
    elif isinstance(e, (KeyboardInterrupt, click.Abort, EOFError)):
        msg = "interrupted"
    elif isinstance(e, MemoryError):
        msg = f"out of memory{': ' + str(e) if str(e) else ''} (try a smaller input or more RAM)"
    elif isinstance(e, OSError) and (e.strerror or e.filename):
        msg = e.strerror or str(e)
        if e.filename is not None:
            msg += f": {str(e.filename)!r}"
        if getattr(e, "filename2", None) is not None:
            msg += f" -> {str(e.filename2)!r}"
    elif isinstance(e, (ValueError, TypeError, KeyError)) and str(e):
        msg = str(e.args[0]) if isinstance(e, KeyError) and e.args else str(e)
    else:
        msg = f"{type(e).__name__}: {e} (GROUPSPARSE_DEBUG=1 shows the traceback)"
    return " ".join(msg.split())  # one line, whatever the message holds


def _warning_line(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as one line on stderr (Python's format adds the source line, torch's add paragraphs)."""
    text = " ".join(str(message).split())
    text = text if len(text) <= 300 else text[:297] + "..."
    try:
        click.echo(f"groupsparse: warning: {text} ({category.__name__})", err=True)
    except (OSError, ValueError):
        pass  # stderr closed: a warning is not worth failing for


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is needed, and one error boundary."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._loaded: set[str] = set()

    def _load(self, module: str) -> None:
        if module in self._loaded:
            return
        self._loaded.add(module)
        attr = dict(_SUBCOMMANDS).get(module, "commands")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("groupsparse"):
                return  # that part is not built yet
            raise
        for cmd in getattr(mod, attr, []):
            self.add_command(cmd)

    def _load_unlisted(self) -> None:
        listed = {m for m, _ in _LISTING.values()}
        for module, _ in _SUBCOMMANDS:
            if module not in listed:
                self._load(module)

    def list_commands(self, ctx):
        self._load_unlisted()
        return sorted(set(self.commands) | {n for n, (m, _) in _LISTING.items() if m in dict(_SUBCOMMANDS)})

    def get_command(self, ctx, name):
        if name not in self.commands and name in _LISTING:
            self._load(_LISTING[name][0])
        if name not in self.commands:
            self._load_unlisted()
        return self.commands.get(name)

    def format_commands(self, ctx, formatter):
        # the listing needs no import: commands not loaded yet are described from _LISTING
        rows = []
        for name in self.list_commands(ctx):
            cmd = self.commands.get(name) or click.Command(name, help=_LISTING[name][1])
            if not cmd.hidden:
                rows.append((name, cmd))
        if rows:
            limit = formatter.width - 6 - max(len(n) for n, _ in rows)
            with formatter.section("Commands"):
                formatter.write_dl([(n, c.get_short_help_str(limit)) for n, c in rows])

    def invoke(self, ctx):
        super().invoke(ctx)  # a command's return value is not an exit status (click's standalone mode agrees)

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        import warnings

        shown = warnings.showwarning
        if os.environ.get("GROUPSPARSE_DEBUG", "") in ("", "0"):
            warnings.showwarning = _warning_line  # a library's multi-line warning would bury the result
        try:
            rv = super().main(args, prog_name or "groupsparse", complete_var, standalone_mode=False, **extra)
            sys.exit(rv if isinstance(rv, int) else 0)
        except SystemExit:
            raise
        except click.exceptions.NoArgsIsHelpError as e:
            e.show()
            sys.exit(e.exit_code)
        except BaseException as e:  # noqa: BLE001 - the one place every failure is turned into one line
            if os.environ.get("GROUPSPARSE_DEBUG", "") not in ("", "0"):
                raise
            if isinstance(e, OSError) and e.errno == errno.EPIPE:
                sys.exit(1)  # `groupsparse ... | head`: the reader left, nothing to say
            code = 130 if isinstance(e, (KeyboardInterrupt, click.Abort)) else getattr(e, "exit_code", 1) or 1
            try:
                click.echo(f"groupsparse: error: {_describe(e)}", err=True)
            finally:
                sys.exit(code)
        finally:
            warnings.showwarning = shown


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="groupsparse")
def main() -> None:
    """Grouped Hoyer-sparsity projection (GSP): projection, sparse NMF and pruning."""


@main.command("project")
@click.argument("inp", metavar="IN", type=click.Path(dir_okay=False))
@click.option("--sparsity", "-s", type=float, required=True, help="Target average Hoyer sparsity in [0, 1].")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True,
              help="Output file (.npy/.npz/.safetensors); never an input; written atomically.")
@click.option("--axis", type=int, default=0, show_default=True, help="Axis along which the vectors lie.")
@click.option("--key", "keys", multiple=True, help="Arrays to project (default: every floating array with at least "
              "2 entries along --axis; the others are copied and listed as skipped). Repeatable.")
@click.option("--weights", type=click.Path(dir_okay=False), default=None,
              help="File with positive weights: same keys and shapes as the projected arrays.")
@click.option("--group", type=click.Choice(["each-array", "all"]), default="each-array", show_default=True,
              help="each-array: every array is its own group; all: one ragged group over all selected arrays.")
@click.option("--engine", type=click.Choice(["auto", "numba", "torch"]), default="auto", show_default=True)
def project_cmd(inp, sparsity, out, axis, keys, weights, group, engine):
    """Project arrays of IN to an average Hoyer sparsity and write them (with the untouched rest) to OUT."""
    from . import project
    from .io import ARRAY_SUFFIXES, check_arrays_fit, check_paths, check_suffix, load_arrays, save_arrays

    if not 0 <= sparsity <= 1:  # checked before reading a possibly large file (the projection checks it again)
        raise ValueError(f"sparsity: got {sparsity}, expected a number in [0, 1]")
    if check_suffix(out, ARRAY_SUFFIXES) == ".npy" and len(keys) > 1:
        raise ValueError(f"--out: got a .npy path for {len(keys)} arrays, expected .npz or .safetensors")
    check_paths({"IN": inp, "--weights": weights}, {"--out": out})
    t0 = time.perf_counter()
    arrays = load_arrays(inp, "IN")
    wts = load_arrays(weights, "--weights") if weights else {}
    t_load = time.perf_counter() - t0
    check_arrays_fit(out, arrays, f"IN {inp!r}")  # before the projection: save_arrays checks the same
    chosen, skipped = _choose(arrays, keys, axis, inp)
    if not chosen:
        raise ValueError(f"IN: got no array to project in {inp!r} ({'; '.join(f'{k}: {r}' for k, r in skipped)}), "
                         f"expected a floating array with at least 2 entries along --axis {axis}")
    for k in chosen:
        if weights:
            _check_weights(wts.get(k), arrays[k], k, weights)
    t0 = time.perf_counter()
    infos = {}
    if group == "all":
        if not all(_is_numpy(arrays[k]) for k in chosen):
            # one group must be one kind of array: a bfloat16 array stays a torch tensor, so make all of them
            # tensors (sharing memory); only .safetensors holds bfloat16, and that writer takes tensors
            import torch

            for k in chosen:
                arrays[k] = torch.from_numpy(arrays[k]) if _is_numpy(arrays[k]) else arrays[k]
        try:
            res, info = project([arrays[k] for k in chosen], sparsity, axis=axis,
                                weights=[_like(wts[k], arrays[k]) for k in chosen] if weights else None,
                                engine=engine, return_info=True)
        except ValueError as e:
            bad = [k for k in chosen if not _finite(arrays[k])]  # the usual cause; say which array holds it
            raise ValueError(f"IN {inp!r}{f' array {bad[0]!r}' if bad else ''}: {e}") from e
        for k, r in zip(chosen, res):
            arrays[k], infos[k] = r, info
    else:
        for k in chosen:
            w = _like(wts[k], arrays[k]) if weights else None
            # the result replaces the input at once: memory stays near input + output + one array
            try:
                arrays[k], infos[k] = project(arrays[k], sparsity, axis=axis, weights=w, engine=engine,
                                              return_info=True)
            except ValueError as e:  # NaN entries, float16 overflow...: say which array of which file
                raise ValueError(f"IN {inp!r} array {k!r}: {e}") from e
    t_project = time.perf_counter() - t0
    t0 = time.perf_counter()
    save_arrays(out, arrays)
    t_save = time.perf_counter() - t0
    if skipped:
        click.echo("skipped (copied unchanged): " + ", ".join(f"{k} ({r})" for k, r in skipped))
    click.echo(f"{'array':<32} {'shape':<18} {'avg sparsity':>12} {'zeros':>8} {'mu':>12}")
    for k in chosen:
        sp, zeros = _summary(arrays[k], axis, _like(wts[k], arrays[k]) if weights else None)
        click.echo(f"{k:<32} {str(tuple(arrays[k].shape)):<18} {sp:>12.6f} {zeros:>8.2%} {infos[k].mu:>12.6g}")
    click.echo(f"target {sparsity}  engine {infos[chosen[0]].engine}  load {t_load:.3f} s  project {t_project:.3f} s"
               f"  save {t_save:.3f} s  -> {out}")


def _is_numpy(v) -> bool:
    return type(v).__module__ == "numpy"


def _like(w, a):
    """The weights as the same kind of array as ``a`` (a bfloat16 file gives torch tensors)."""
    if _is_numpy(a) or not _is_numpy(w):
        return w
    import torch

    return torch.from_numpy(w)


def _finite(a) -> bool:
    import numpy as np

    return bool(np.isfinite(a).all()) if _is_numpy(a) else bool(a.isfinite().all())


def _check_weights(w, a, key: str, path) -> None:
    """--weights for array ``key``: present, same shape, floating, finite and positive; checked before any
    projection so that the error names the file and the array."""
    import numpy as np

    where = f"array {key!r} of {str(path)!r}"
    if w is None:
        raise ValueError(f"--weights: got no {where}, expected one with shape {tuple(a.shape)} (same keys as IN)")
    if tuple(w.shape) != tuple(a.shape):
        raise ValueError(f"--weights: got shape {tuple(w.shape)} for {where}, expected shape {tuple(a.shape)}")
    floating = w.dtype.kind == "f" if _is_numpy(w) else w.dtype.is_floating_point
    if not floating:
        raise ValueError(f"--weights: got dtype {str(w.dtype).replace('torch.', '')} for {where}, expected a "
                         "floating dtype")
    ok = bool(((w > 0) & np.isfinite(w)).all()) if _is_numpy(w) else bool(((w > 0) & w.isfinite()).all())
    if not ok:
        raise ValueError(f"--weights: got a zero, negative or non-finite entry in {where}, expected strictly "
                         "positive finite weights")


def _choose(arrays: dict, keys, axis: int, path=None) -> tuple[list[str], list[tuple[str, str]]]:
    """(arrays to project, [(array, why it is skipped)]). Named arrays (--key) must be projectable."""
    def why_not(v) -> str | None:
        floating = v.dtype.is_floating_point if not _is_numpy(v) else v.dtype.kind == "f"
        if not floating:
            return f"{str(v.dtype).replace('torch.', '')}, not floating"
        if v.ndim == 0:
            return "0-d"
        if not -v.ndim <= axis < v.ndim:
            return f"{v.ndim}-D, no axis {axis}"
        if v.shape[axis] < 2:
            return f"{v.shape[axis]} entr{'y' if v.shape[axis] == 1 else 'ies'} along axis {axis}"
        return None

    for k in keys:
        if k not in arrays:
            raise ValueError(f"--key: got {k!r}, expected one of {sorted(arrays)} (the arrays of {str(path)!r})")
        reason = why_not(arrays[k])
        if reason:
            raise ValueError(f"--key: got {k!r} ({reason}), expected a floating array with at least 2 entries along "
                             f"--axis {axis}")
    if keys:
        return list(dict.fromkeys(keys)), []
    chosen, skipped = [], []
    for k, v in arrays.items():
        reason = why_not(v)
        (skipped.append((k, reason)) if reason else chosen.append(k))
    return chosen, skipped


_CHUNK = 1 << 22  # entries per summary chunk: temporaries stay ~100 MB whatever the array size


def _summary(a, axis: int, w) -> tuple[float, float]:
    """(average Hoyer sparsity, zero fraction) of ``a``, a block of vectors at a time: hoyer_sparsity(a) on the
    whole array would allocate several float64 copies of it."""
    import numpy as np

    from . import hoyer_sparsity

    numpy = _is_numpy(a)
    move = (lambda x: np.moveaxis(x, axis, -1)) if numpy else (lambda x: x.movedim(axis, -1))
    m = move(a)
    wm = move(w) if w is not None else None
    if m.ndim == 1:
        m, wm = m[None], (wm[None] if wm is not None else None)
    per_row = max(1, int(np.prod(m.shape[1:])))
    step = max(1, _CHUNK // per_row)
    total, count, nonzero = 0.0, 0, 0
    for i in range(0, m.shape[0], step):
        c = m[i:i + step]
        sp = hoyer_sparsity(c, axis=-1, weights=wm[i:i + step] if wm is not None else None)
        total += float(sp.sum())
        count += int(np.prod(sp.shape))
        nonzero += int(np.count_nonzero(c)) if numpy else int(c.count_nonzero())
    size = int(np.prod(a.shape))
    return total / max(count, 1), 1 - nonzero / size if size else 0.0


if __name__ == "__main__":  # pragma: no cover
    main()

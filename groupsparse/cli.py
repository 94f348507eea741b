"""The ``groupsparse`` command line (click).

Subcommands live beside the code they drive and are registered here: ``project`` (this file), ``nmf``
(groupsparse.nmf.cli), ``prune-checkpoint`` (groupsparse.prune.cli), ``prune``/``report``
(groupsparse.experiments.cli), ``demo`` (groupsparse.demo).
"""

from __future__ import annotations

import importlib
import time

import click
import numpy as np

from .io import check_distinct, load_arrays, save_arrays


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="groupsparse")
def main() -> None:
    """Grouped Hoyer-sparsity projection (GSP): projection, sparse NMF and pruning."""


@main.command("project")
@click.argument("inp", metavar="IN", type=click.Path(exists=True, dir_okay=False))
@click.option("--sparsity", "-s", type=float, required=True, help="Target average Hoyer sparsity in [0, 1].")
@click.option("--out", "-o", type=click.Path(dir_okay=False), required=True, help="Output file (.npy/.npz/.safetensors); never the input.")
@click.option("--axis", type=int, default=0, show_default=True, help="Axis along which the vectors lie.")
@click.option("--key", "keys", multiple=True, help="Arrays to project (default: every floating array with ndim >= 1). Repeatable.")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False), default=None,
              help="File with positive weights: same keys and shapes as the projected arrays.")
@click.option("--group", type=click.Choice(["each-array", "all"]), default="each-array", show_default=True,
              help="each-array: every array is its own group; all: one ragged group over all selected arrays.")
@click.option("--engine", type=click.Choice(["auto", "numba", "torch"]), default="auto", show_default=True)
def project_cmd(inp, sparsity, out, axis, keys, weights, group, engine):
    """Project arrays of IN to an average Hoyer sparsity and write them (with the untouched rest) to OUT."""
    from . import hoyer_sparsity, project

    try:
        check_distinct(inp, out)
    except ValueError as e:
        raise click.ClickException(str(e)) from e
    arrays = load_arrays(inp)
    wts = load_arrays(weights) if weights else {}
    chosen = list(keys) or [k for k, v in arrays.items() if np.issubdtype(v.dtype, np.floating) and v.ndim >= 1]
    missing = [k for k in chosen if k not in arrays]
    if missing:
        raise click.BadParameter(f"got {missing}, expected keys among {sorted(arrays)}", param_hint="--key")
    if weights and any(k not in wts for k in chosen):
        raise click.BadParameter(f"weights file lacks {[k for k in chosen if k not in wts]}", param_hint="--weights")
    result = dict(arrays)
    rows = []
    t0 = time.perf_counter()
    try:
        if group == "all":
            vecs, shapes = [], []
            for k in chosen:
                m = np.moveaxis(arrays[k], axis, -1)
                shapes.append(m.shape)
                vecs += list(m.reshape(-1, m.shape[-1]))
            wv = None
            if weights:
                wv = [row for k in chosen for row in np.moveaxis(wts[k], axis, -1).reshape(-1, arrays[k].shape[axis])]
            res, info = project(vecs, sparsity, weights=wv, engine=engine, return_info=True)
            i = 0
            for k, shp in zip(chosen, shapes):
                cnt = int(np.prod(shp[:-1]))
                result[k] = np.moveaxis(np.stack(res[i : i + cnt]).reshape(shp), -1, axis)
                i += cnt
                rows.append((k, info))
        else:
            for k in chosen:
                res, info = project(arrays[k], sparsity, axis=axis, weights=wts.get(k), engine=engine, return_info=True)
                result[k] = res
                rows.append((k, info))
    except (ValueError, TypeError) as e:
        raise click.ClickException(str(e)) from e
    elapsed = time.perf_counter() - t0
    save_arrays(out, result)
    click.echo(f"{'array':<32} {'shape':<18} {'avg sparsity':>12} {'zeros':>8} {'mu':>12}")
    for k, info in rows:
        a = result[k]
        sp = float(np.mean(hoyer_sparsity(a, axis=axis, weights=wts.get(k)))) if a.ndim > 1 else hoyer_sparsity(a, weights=wts.get(k))
        click.echo(f"{k:<32} {str(a.shape):<18} {sp:>12.6f} {np.mean(a == 0):>8.2%} {info.mu:>12.6g}")
    click.echo(f"target {sparsity}  engine {rows[0][1].engine if rows else engine}  time {elapsed:.3f} s  -> {out}")


_SUBCOMMANDS = [
    ("groupsparse.nmf.cli", "commands"),
    ("groupsparse.prune.cli", "commands"),
    ("groupsparse.experiments.cli", "commands"),
    ("groupsparse.demo", "commands"),
]


def _register() -> None:
    for mod_name, attr in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(mod_name)
        except ModuleNotFoundError as e:
            if e.name and e.name.startswith("groupsparse"):
                continue  # that part is not built yet
            raise
        for cmd in getattr(mod, attr, []):
            main.add_command(cmd)


_register()

if __name__ == "__main__":  # pragma: no cover
    main()

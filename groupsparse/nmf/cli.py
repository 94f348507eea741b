"""``groupsparse nmf``: the sparse-NMF experiments (registered by groupsparse.cli through ``commands``)."""

from __future__ import annotations

from pathlib import Path

import click

# Defaults live in the user's home, never under the current directory: run from a checkout, a default of
# "results/nmf/..." overwrote the committed results. Pass --out to write elsewhere.
RUNS = Path.home() / "groupsparse-runs" / "nmf"


@click.group("nmf", context_settings={"help_option_names": ["-h", "--help"]})
def nmf() -> None:
    """Sparse NMF with grouped sparse projection: the paper's experiments."""


@nmf.command("synthetic")
@click.option("--trials", type=click.IntRange(min=1), default=5, show_default=True, help="Random problems (the paper used 50).")
@click.option("--iters", type=click.IntRange(min=1), default=500, show_default=True, help="Outer iterations per run.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of trial 0 (trial t uses seed + t).")
@click.option("--out", type=click.Path(file_okay=False), default=str(RUNS / "synthetic"), show_default=True)
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def synthetic_cmd(trials, iters, seed, out, no_progress):
    """m = n = 100, r = 10, X = WH with W = max(0, randn), H = rand; all methods at W's true average sparsity."""
    from .experiments import synthetic

    summary = synthetic(trials=trials, iters=iters, out=out, seed=seed, progress=not no_progress)
    cps = [k for k in summary["table"][0] if k.startswith("rel_err_") and k[8:].isdigit()]
    click.echo(f"{'method':<12} " + " ".join(f"{'err@' + k[8:]:>11}" for k in cps)
               + f" {'sparsity':>9} {'target':>9} {'min cos':>9} {'s/run':>7}")
    for row in summary["table"]:
        click.echo(f"{row['method']:<12} " + " ".join(f"{row[k]:>11.3e}" for k in cps)
                   + f" {row['sparsity']:>9.4f} {row['target_sparsity']:>9.4f} {row['min_cosine_mean']:>9.5f}"
                   f" {row['seconds_per_run']:>7.3f}")
    click.echo(f"relative errors ||X - WH||/||X|| (mean of {trials} trials) -> {out}")


def _shape(ctx, param, value):
    if value is None:
        return None
    try:
        h, w = (int(v) for v in value.lower().split("x"))
    except ValueError as e:
        raise click.BadParameter(f"got {value!r}, expected HxW such as 19x19") from e
    if h < 1 or w < 1:
        raise click.BadParameter(f"got {value!r}, expected positive H and W such as 19x19")
    return h, w


_DATA_SUFFIXES = (".mat", ".npy", ".npz", ".safetensors", ".csv", ".txt", ".tsv")


def _check_data(path: Path, key: str | None) -> None:
    """Read the matrix once before the runs, so that any failure of the readers (numpy's text parser, scipy,
    an empty file) is one line naming the file and not an error of a later step. The matrix is small next to
    the cost of the runs; cbcl() reads it again."""
    import warnings

    from .experiments import load_matrix

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # "loadtxt: input contained no data" is a failure here
            X = load_matrix(path, key)
    except (ValueError, OSError, Warning) as e:
        msg = str(e)
        if key is not None and msg.startswith("data: got variables"):
            # the loader's text speaks of the default choice; the user named a key
            held = msg[len("data: "):].split(", expected")[0]  # "got variables [...] in 'file'"
            raise ValueError(f"--key: got {key!r}, expected a variable of {str(path)!r} ({held})") from e
        if str(path) in msg and (isinstance(e, ValueError) or (isinstance(e, OSError) and e.errno is not None)):
            raise  # already names the file
        raise ValueError(f"--data: cannot read {str(path)!r} ({type(e).__name__}: {msg})") from e
    except Exception as e:  # noqa: BLE001 - scipy's MatReadError and friends name no file
        raise ValueError(f"--data: cannot read {str(path)!r} (truncated or not a {path.suffix} file? "
                         f"{type(e).__name__}: {e})") from e
    if min(X.shape) < 1:
        raise ValueError(f"--data: got an empty matrix of shape {X.shape} in {str(path)!r}, expected a non-empty "
                         "non-negative matrix")


@nmf.command("cbcl")
@click.option("--data", type=click.Path(dir_okay=False), default=None,
              help="CBCL.mat (variable X, 361 x 2429) or any non-negative matrix (.mat/.npy/.npz/.safetensors/.csv/.txt). "
                   "Default: ../shared/data/CBCL.mat beside the repository.")
@click.option("--out", type=click.Path(file_okay=False), default=str(RUNS / "cbcl"), show_default=True)
@click.option("--rank", "-r", type=click.IntRange(min=1), default=49, show_default=True)
@click.option("--iters", type=click.IntRange(min=1), default=500, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--sparsity", type=click.FloatRange(0, 1), default=0.85, show_default=True, help="Target of the sparse GSP run.")
@click.option("--layout", type=click.Choice(["columns", "rows"]), default="columns", show_default=True,
              help="columns: each column is a sample (CBCL: pixels x images); rows: each row is a sample.")
@click.option("--image-shape", callback=_shape, default=None, help="HxW of a feature vector for the basis grids (default: square if possible).")
@click.option("--key", default=None, help="Variable/array name inside the file (default: X or the only matrix).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def cbcl_cmd(data, out, rank, iters, seed, sparsity, layout, image_shape, key, no_progress):
    """CBCL faces: A-HALS, GSP at A-HALS's average sparsity, GSP at --sparsity; tables and basis grids."""
    from .experiments import DEFAULT_CBCL, cbcl

    path = Path(data) if data else DEFAULT_CBCL
    if not path.exists():
        raise click.ClickException(
            f"--data: got {str(path)!r}, which does not exist; expected CBCL.mat (variable X, 361 x 2429, pixels x "
            f"images). Put it at {DEFAULT_CBCL} or pass --data PATH."
        )
    from ..io import check_paths, check_suffix

    check_suffix(path, _DATA_SUFFIXES, "--data")
    if not path.is_file():  # a pipe or device: reading it could block or never end
        raise ValueError(f"--data: got {str(path)!r}, which is not a regular file; expected a data file")
    check_paths({"--data": path}, {"--out": out})
    _check_data(path, key)
    summary = cbcl(path, out=out, r=rank, iters=iters, seed=seed, sparse_target=sparsity, layout=layout,
                   image_shape=image_shape, key=key, progress=not no_progress)
    click.echo(f"{'method':<16} {'error %':>8} {'sparsity':>9} {'zeros':>7} {'coef 0':>7} {'time s':>7}")
    for r in summary["results"]:
        click.echo(f"{r['method']:<16} {r['rel_err_percent']:>8.3f} {r['sparsity']:>9.4f} "
                   f"{100 * r['zero_fraction']:>6.1f}% {100 * r['coef_zero_fraction']:>6.1f}% {r['seconds']:>7.2f}")
    click.echo(f"-> {out}")


commands = [nmf]

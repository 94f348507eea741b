"""``groupsparse demo``: the three faces of the library on embedded data, in about a minute."""

from __future__ import annotations

import tempfile
import time

import click
import numpy as np


def _header(text: str) -> None:
    click.secho(f"\n== {text}", bold=True)


def demo_projection(seed: int = 0) -> dict:
    import groupsparse as gs

    _header("1. Grouped sparse projection (GSP)")
    rng = np.random.default_rng(seed)
    # 256 vectors whose scales differ: GSP sparsifies the weak ones more and keeps the strong ones dense
    M = rng.normal(size=(64, 256)) * rng.lognormal(0, 1, size=256)
    t0 = time.perf_counter()
    P, info = gs.project(M, 0.8, axis=0, return_info=True)
    dt = time.perf_counter() - t0
    sp = gs.hoyer_sparsity(P, axis=0)
    E = gs.project_each(M, 0.8, axis=0)
    E = E * np.sum(E * M, axis=0) / np.maximum(np.sum(E * E, axis=0), 1e-300)  # same least-squares rescale as GSP
    err_g = np.linalg.norm(P - M) / np.linalg.norm(M)
    err_e = np.linalg.norm(E - M) / np.linalg.norm(M)
    click.echo(f"64x256 matrix, columns as vectors, target average Hoyer sparsity 0.8 ({1e3 * dt:.1f} ms, "
               f"{info.evaluations} evaluations, engine {info.engine}, mu = {info.mu:.4g})")
    click.echo(f"  achieved average {sp.mean():.9f}; per-column range [{sp.min():.2f}, {sp.max():.2f}]; "
               f"zeros {np.mean(P == 0):.1%}")
    click.echo(f"  relative error: GSP {err_g:.3f} vs every column at exactly 0.8 (project_each, rescaled) {err_e:.3f}")
    T = 0.1 * np.sign(rng.normal(size=(64, 32)))
    _, tinfo = gs.project(T, 0.6, return_info=True)
    click.echo(f"  64x32 of +-0.1 at s = 0.6 (the authors' code returns sparsity 0.0 here): {tinfo.sparsity:.3f}, "
               f"discontinuity={tinfo.discontinuity}, only {tinfo.n_jumped} of 32 columns sent to one-hot")
    return {"sparsity": float(sp.mean()), "gsp_error": float(err_g), "each_error": float(err_e)}


def demo_nmf(seed: int = 0) -> dict:
    from groupsparse.nmf import SparseNMF

    _header("2. Sparse NMF (scikit-learn estimator)")
    rng = np.random.default_rng(seed)
    W = np.maximum(rng.normal(size=(100, 10)), 0)
    H = rng.random((10, 100))
    X = W @ H
    s_true = float(np.mean([_sp(c) for c in W.T]))
    t0 = time.perf_counter()
    # The paper's W columns are sparse; in scikit-learn's orientation pass X.T and constrain components_ rows.
    model = SparseNMF(10, sparsity_H=s_true, max_iter=300, tol=0, random_state=seed)
    model.fit(X.T)
    dt = time.perf_counter() - t0
    rel = model.reconstruction_err_ / np.linalg.norm(X)
    click.echo(f"X = W H (100x100, rank 10, W = max(0, randn)); SparseNMF(sparsity_H={s_true:.3f}), 300 iterations "
               f"in {dt:.2f} s (the first fit in a process includes compiling its inner loop)")
    click.echo(f"  relative error {rel:.2e}; average sparsity of the components {model.sparsity_H_:.4f}")
    return {"relative_error": float(rel), "seconds": dt}


def _sp(c):
    import groupsparse as gs

    return gs.hoyer_sparsity(c)


def demo_prune(seed: int = 0, out: str | None = None) -> dict:
    from groupsparse.experiments.runner import Config, run

    _header("3. Pruning: GSP on an MLP for scikit-learn's digits (CPU)")
    out = out or tempfile.mkdtemp(prefix="groupsparse-demo-")
    t0 = time.perf_counter()
    rep = run(Config(dataset="digits", model="mlp", method="gsp", sparsity=0.95, seed=seed, out=out, progress=False))
    dt = time.perf_counter() - t0
    click.echo(f"dense accuracy {rep['dense_accuracy']:.3f} -> GSP pruned to {rep['zero_fraction']:.1%} zeros: "
               f"accuracy {rep['accuracy']:.3f} ({dt:.0f} s); report and weights in {out}")
    return {"accuracy": rep["accuracy"], "dense_accuracy": rep["dense_accuracy"], "zero_fraction": rep["zero_fraction"]}


@click.command("demo")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--skip", type=click.Choice(["projection", "nmf", "prune"]), multiple=True, help="Parts to skip.")
@click.option("--out", type=click.Path(file_okay=False), default=None, help="Where the pruning run writes (default: a temp dir).")
def demo(seed, skip, out):
    """Show a projection, a small sparse NMF and a digits pruning run on embedded data (about a minute)."""
    if "projection" not in skip:
        demo_projection(seed)
    if "nmf" not in skip:
        demo_nmf(seed)
    if "prune" not in skip:
        demo_prune(seed, out)
    _header("Next")
    click.echo("  groupsparse project W.safetensors -s 0.8 --axis 1 -o W_sparse.safetensors   # your arrays")
    click.echo("  groupsparse nmf synthetic | groupsparse nmf cbcl --data ../shared/data/CBCL.mat")
    click.echo("  groupsparse prune --dataset digits --method gsp -s 0.95 -o runs/gsp   |  groupsparse report runs/*")
    click.echo("  groupsparse prune-checkpoint model.safetensors -s 0.8 -o pruned.safetensors")
    click.echo("  README.md: the Python API (groupsparse.project, SparseNMF, groupsparse.prune.GSPPruner, distributed)")


commands = [demo]

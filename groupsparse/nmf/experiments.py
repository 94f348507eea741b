"""The paper's sparse-NMF experiments (REFERENCE.md §4): synthetic recovery and CBCL faces.

Both run in the paper's orientation, X_p (features x samples) ~ W_p H_p with sparse columns of W_p, by passing
X_p.T to :func:`sparse_nmf` (so W_p is our H.T and its target is ``sparsity_H``). Outputs (CSV/JSON/PNG) are
written atomically.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from ..io import atomic_path
from ._estimator import sparse_nmf
from ._solvers import row_sparsity

CHECKPOINTS = (100, 200, 500)
METHODS = ("A-HALS", "NeNMF", "l1-HALS", "GSP", "column-wise", "sklearn-l1")
DEFAULT_CBCL = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "CBCL.mat"


# ----------------------------------------------------------------------------------------------- output helpers
def _readable(tmp: Path) -> None:
    # mkstemp creates 0600 files; results are meant to be shared, so apply the usual umask-based mode.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)


def _write_text(path: Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
        _readable(tmp)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    _write_text(path, buf.getvalue())


def _save_fig(fig, path: Path) -> None:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=110, bbox_inches="tight")
        _readable(tmp)


@contextmanager
def _progress(enabled: bool):
    """A rich progress bar, or a stand-in with the same two methods when disabled (tests, pipes)."""
    if not enabled:
        class _Null:
            def add_task(self, *a, **k):
                return 0

            def update(self, *a, **k):
                pass

        yield _Null()
        return
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as p:
        yield p


# ------------------------------------------------------------------------------------------------------ helpers
def min_matched_cosine(true: np.ndarray, found: np.ndarray) -> float:
    """Smallest cosine between the columns of ``true`` and their best one-to-one match among ``found``'s."""
    from scipy.optimize import linear_sum_assignment

    def unit(A):
        n = np.linalg.norm(A, axis=0)
        return A / np.where(n > 0, n, 1.0)

    C = unit(true).T @ unit(found)
    ri, ci = linear_sum_assignment(-C)
    return float(C[ri, ci].min())


def _avg_sp_cols(W: np.ndarray) -> float:
    return float(np.mean(row_sparsity(np.ascontiguousarray(W.T))))


def _rel_err(X, W, H) -> float:
    return float(np.linalg.norm(X - W @ H) / np.linalg.norm(X))


def _ls_scale(X, W, H) -> float:
    """The least-squares multiple a of W fitting X ~ a WH (the reference's start scaling)."""
    WtW, HHt = W.T @ W, H @ H.T
    return float(np.sum((W.T @ X) * H) / np.sum(WtW * HHt))


def _sklearn_run(X, W0, H0, alpha: float, iters: int):
    """scikit-learn's coordinate-descent NMF with an l1 penalty on the rows of H only (paper's W columns)."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    model = NMF(n_components=W0.shape[1], init="custom", solver="cd", alpha_W=0.0, alpha_H=alpha, l1_ratio=1.0,
                max_iter=iters, tol=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        W = model.fit_transform(X, W=W0.copy(), H=H0.copy())
    return W, model.components_


def _calibrate_sklearn(X, W0, H0, target: float, iters: int, steps: int = 10) -> float:
    """Bisection on log(alpha_H) so scikit-learn's l1 NMF reaches the target average sparsity after ``iters``."""
    lo, hi = -8.0, 2.0  # log10 alpha; the penalty is relative to the data's scale, X here is O(1)..O(10)
    best = (math.inf, 10.0**lo)
    for _ in range(steps):
        mid = 0.5 * (lo + hi)
        _, H = _sklearn_run(X, W0, H0, 10.0**mid, iters)
        sp = float(np.mean(row_sparsity(H)))
        if abs(sp - target) < best[0]:
            best = (abs(sp - target), 10.0**mid)
        if sp < target:
            lo = mid
        else:
            hi = mid
    return best[1]


# ---------------------------------------------------------------------------------------------------- synthetic
def synthetic(trials: int = 5, iters: int = 500, out: str | Path = "results/nmf/synthetic", seed: int = 0,
              m: int = 100, n: int = 100, r: int = 10, progress: bool = True, sklearn_curve: bool = True) -> dict:
    """The paper's synthetic experiment; writes ``table.csv``, ``history.csv``, ``trials.csv``,
    ``summary.json`` and ``error.png`` under ``out``; returns the summary."""
    out = Path(out)
    hist = {k: [] for k in METHODS}
    per_trial = []
    sk_points = sorted({1, 2, 5, 10, 20, 50, *CHECKPOINTS, iters} & set(range(1, iters + 1)))
    with _progress(progress) as bar:
        task = bar.add_task("synthetic NMF trials", total=trials * len(METHODS))
        for t in range(trials):
            rng = np.random.default_rng(seed + t)
            Wp = np.maximum(0.0, rng.standard_normal((m, r)))
            Hp = rng.random((r, n))
            Xp = Wp @ Hp
            s = _avg_sp_cols(Wp)
            W0 = rng.random((m, r))
            H0 = rng.random((r, n))
            X = Xp.T  # our orientation: samples x features; our H = W_p.T carries the target
            runs = {
                "A-HALS": dict(),
                "NeNMF": dict(solver="fgm"),
                "l1-HALS": dict(sparsity_H=s, projection="l1"),
                "GSP": dict(sparsity_H=s, projection="group"),
                "column-wise": dict(sparsity_H=s, projection="column"),
            }
            for name, kw in runs.items():
                bar.update(task, description=f"trial {t + 1}/{trials} {name}")
                t0 = time.perf_counter()
                W, H, info = sparse_nmf(X, r, W=H0.T, H=W0.T, max_iter=iters, tol=0, **kw)
                dt = time.perf_counter() - t0
                hist[name].append(info.history)
                per_trial.append(dict(trial=t, method=name, target=s, rel_err=info.history[-1],
                                      best_rel_err=_rel_err(X, W, H), sparsity=_avg_sp_cols(H.T),
                                      min_cosine=min_matched_cosine(Wp, H.T), seconds=dt,
                                      **{f"err_{c}": info.history[c] for c in CHECKPOINTS if c <= iters}))
                bar.update(task, advance=1)
            # scikit-learn: same start (scaled as ours), l1 strength calibrated to the same average sparsity.
            bar.update(task, description=f"trial {t + 1}/{trials} sklearn-l1 (calibrating)")
            a = _ls_scale(X, H0.T, W0.T)
            Ws, Hs = H0.T * a, W0.T.copy()
            t0 = time.perf_counter()
            alpha = _calibrate_sklearn(X, Ws, Hs, s, iters)
            t_cal = time.perf_counter() - t0
            curve = np.full(iters + 1, np.nan)
            curve[0] = _rel_err(X, Ws, Hs)
            points = sk_points if sklearn_curve else [p for p in sk_points if p in CHECKPOINTS or p == iters]
            for k in points:
                t0 = time.perf_counter()
                W, H = _sklearn_run(X, Ws, Hs, alpha, k)
                dt = time.perf_counter() - t0
                curve[k] = _rel_err(X, W, H)
            hist["sklearn-l1"].append(curve)
            per_trial.append(dict(trial=t, method="sklearn-l1", target=s, rel_err=curve[iters],
                                  best_rel_err=curve[iters], sparsity=_avg_sp_cols(H.T),
                                  min_cosine=min_matched_cosine(Wp, H.T), seconds=dt, alpha_H=alpha,
                                  calibration_seconds=t_cal,
                                  **{f"err_{c}": curve[c] for c in CHECKPOINTS if c <= iters}))
            bar.update(task, advance=1)

    cps = [c for c in CHECKPOINTS if c <= iters]
    table = []
    for name in METHODS:
        rows = [p for p in per_trial if p["method"] == name]
        row = dict(method=name)
        for c in cps:
            row[f"rel_err_{c}"] = float(np.mean([p[f"err_{c}"] for p in rows]))
        row["rel_err_best"] = float(np.mean([p["best_rel_err"] for p in rows]))
        row["target_sparsity"] = float(np.mean([p["target"] for p in rows]))
        row["sparsity"] = float(np.mean([p["sparsity"] for p in rows]))
        row["sparsity_shortfall_max"] = float(max(p["target"] - p["sparsity"] for p in rows))
        row["min_cosine_mean"] = float(np.mean([p["min_cosine"] for p in rows]))
        row["min_cosine_worst"] = float(np.min([p["min_cosine"] for p in rows]))
        row["seconds_per_run"] = float(np.mean([p["seconds"] for p in rows]))
        table.append(row)
    header = list(table[0])
    _write_csv(out / "table.csv", header, [[_fmt(r[h]) for h in header] for r in table])
    _write_csv(out / "trials.csv", list(per_trial[0]) + ["alpha_H", "calibration_seconds"],
               [[_fmt(p.get(h, "")) for h in list(per_trial[0]) + ["alpha_H", "calibration_seconds"]]
                for p in per_trial])
    mean_hist = {k: np.mean(np.vstack(v), axis=0) for k, v in hist.items()}
    _write_csv(out / "history.csv", ["iteration", *METHODS],
               [[i, *(_fmt(mean_hist[k][i]) for k in METHODS)] for i in range(iters + 1)])
    summary = dict(trials=trials, iters=iters, m=m, n=n, r=r, seed=seed, table=table,
                   note="rel_err = ||X - WH||_F / ||X||_F (not percent), mean over trials; sklearn-l1 is "
                        "scikit-learn NMF(solver='cd', l1_ratio=1, alpha_H calibrated to the target sparsity); "
                        "seconds_per_run for sklearn-l1 is one 500-iteration run (calibration excluded)")
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plot_history(mean_hist, out / "error.png", trials)
    return summary


def _fmt(v):
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def _plot_history(mean_hist: dict, path: Path, trials: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {"A-HALS": "-", "NeNMF": "--", "l1-HALS": ":", "GSP": "-", "column-wise": "-.", "sklearn-l1": "o-"}
    for name, h in mean_hist.items():
        it = np.arange(len(h))
        ok = np.isfinite(h)
        ax.semilogy(it[ok], 100 * np.maximum(h[ok], 1e-16), styles.get(name, "-"), label=name,
                    lw=2.2 if name == "GSP" else 1.3, ms=3)
    ax.set_xlabel("iteration")
    ax.set_ylabel(r"$100\,\|X - WH\|_F / \|X\|_F$ (%)")
    ax.set_title(f"Synthetic sparse NMF (m = n = 100, r = 10), mean of {trials} trials")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    _save_fig(fig, path)
    plt.close(fig)


# --------------------------------------------------------------------------------------------------------- CBCL
def load_matrix(path: str | Path, key: str | None = None) -> np.ndarray:
    """A non-negative 2-D float matrix from .mat (variable ``X`` or the only matrix), .npy, .npz, .safetensors,
    .csv/.txt/.tsv. Raises FileNotFoundError/ValueError with what was expected."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(
            f"data: got {str(path)!r}, which does not exist; expected the CBCL faces file CBCL.mat (variable X, "
            f"361 x 2429, pixels x images) at {DEFAULT_CBCL} or a path given with --data"
        )
    suffix = path.suffix.lower()
    if suffix == ".mat":
        from scipy.io import loadmat

        try:
            d = {k: v for k, v in loadmat(path).items() if not k.startswith("__")}
        except NotImplementedError as e:  # MATLAB v7.3 files are HDF5
            raise ValueError(f"data: got a MATLAB v7.3 (HDF5) file {str(path)!r}, expected a v7 or older .mat "
                             f"(save with -v7) or a .npy file") from e
        arrays = {k: v for k, v in d.items() if isinstance(v, np.ndarray) and v.ndim == 2 and v.size > 1}
    elif suffix in (".csv", ".txt", ".tsv"):
        delim = "," if suffix == ".csv" else None
        arrays = {"X": np.loadtxt(path, delimiter=delim, ndmin=2)}
    else:
        from ..io import load_arrays

        arrays = load_arrays(path)
    if key is None:
        key = "X" if "X" in arrays else (next(iter(arrays)) if len(arrays) == 1 else None)
    if key is None or key not in arrays:
        raise ValueError(f"data: got variables {sorted(arrays)} in {str(path)!r}, expected 'X' or a single matrix "
                         f"(choose one with --key)")
    X = np.asarray(arrays[key], dtype=np.float64)
    if X.ndim != 2:
        raise ValueError(f"data: got an array of shape {X.shape}, expected a 2-D matrix")
    if not np.all(np.isfinite(X)) or np.any(X < 0):
        raise ValueError(f"data: got negative or non-finite entries in {str(path)!r}, expected a non-negative matrix")
    return X


def _grid(H: np.ndarray, shape: tuple[int, int], path: Path, title: str) -> None:
    """Basis images (rows of H, column-major like MATLAB) in a near-square grid, each scaled to its maximum and
    drawn dark on white (the paper's look); a zero row stays white."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r = H.shape[0]
    cols = int(math.ceil(math.sqrt(r)))
    rows = int(math.ceil(r / cols))
    h, w = shape
    # Mid-gray separators: the inverted images are white where the basis is zero, so white borders would vanish.
    canvas = np.full((rows * (h + 1) + 1, cols * (w + 1) + 1), 0.55)
    for k in range(r):
        img = H[k].reshape(shape, order="F")
        top = img.max()
        img = img / top if top > 0 else img
        i, j = divmod(k, cols)
        canvas[1 + i * (h + 1): 1 + i * (h + 1) + h, 1 + j * (w + 1): 1 + j * (w + 1) + w] = 1.0 - img
    fig, ax = plt.subplots(figsize=(5.2, 5.6))
    ax.imshow(canvas, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
    ax.set_axis_off()
    ax.set_title(title, fontsize=10)
    _save_fig(fig, path)
    plt.close(fig)


def cbcl(data: str | Path = DEFAULT_CBCL, out: str | Path = "results/nmf/cbcl", r: int = 49, iters: int = 500,
         seed: int = 0, sparse_target: float = 0.85, layout: str = "columns", image_shape: tuple | None = None,
         key: str | None = None, progress: bool = True) -> dict:
    """CBCL (or any non-negative matrix): A-HALS, GSP at A-HALS's average sparsity, GSP at ``sparse_target``.

    ``layout="columns"``: each column is a sample (CBCL: pixels x images), the paper's layout. Writes
    ``table.csv``, ``summary.json`` and one basis grid PNG per run (when the features form an image).
    """
    out = Path(out)
    if layout not in ("columns", "rows"):
        raise ValueError(f"layout: got {layout!r}, expected 'columns' or 'rows'")
    Xp = load_matrix(data, key)
    X = Xp.T if layout == "columns" else Xp  # ours: samples x features
    n_feat = X.shape[1]
    if image_shape is None:
        side = int(round(math.sqrt(n_feat)))
        image_shape = (side, side) if side * side == n_feat else None
    elif image_shape[0] * image_shape[1] != n_feat:
        raise ValueError(f"image_shape: got {image_shape}, expected a shape with {n_feat} pixels")
    rng = np.random.default_rng(seed)
    W0 = rng.random((X.shape[0], r))
    H0 = rng.random((r, n_feat))
    results = []
    with _progress(progress) as bar:
        def run(label, **kw):
            task = bar.add_task(label, total=iters)
            t0 = time.perf_counter()
            W, H, info = sparse_nmf(X, r, W=W0, H=H0, max_iter=iters, tol=0,
                                    callback=lambda it, err: bar.update(task, completed=it), **kw)
            dt = time.perf_counter() - t0
            res = dict(method=label, target=kw.get("sparsity_H"), rel_err_percent=100 * info.history[info.best_iter],
                       sparsity=_avg_sp_cols(H.T), zero_fraction=float(np.mean(H == 0)),
                       coef_zero_fraction=float(np.mean(W == 0)), seconds=dt,
                       iterations=info.n_iter)
            results.append(res)
            return H, res

        H_a, res_a = run("A-HALS")
        s_a = res_a["sparsity"]
        H_g, res_g = run(f"GSP s={s_a:.3f}", sparsity_H=s_a)
        H_85, res_85 = run(f"GSP s={sparse_target:g}", sparsity_H=sparse_target)
    for (H, res, fname) in ((H_a, res_a, "basis_ahals.png"), (H_g, res_g, "basis_gsp_matched.png"),
                            (H_85, res_85, f"basis_gsp_{sparse_target:g}.png")):
        if image_shape is not None:
            _grid(H, image_shape, out / fname,
                  f"{res['method']}: error {res['rel_err_percent']:.2f} %, sparsity {res['sparsity']:.3f}, "
                  f"zeros {100 * res['zero_fraction']:.0f} %")
            res["image"] = fname
    header = ["method", "target", "rel_err_percent", "sparsity", "zero_fraction", "coef_zero_fraction", "seconds",
              "iterations"]
    _write_csv(out / "table.csv", header, [[_fmt(r_.get(h)) if r_.get(h) is not None else "" for h in header]
                                           for r_ in results])
    summary = dict(data=str(data), shape=list(Xp.shape), layout=layout, r=r, iters=iters, seed=seed,
                   results=results,
                   note="rel_err_percent = 100 ||X - WH||_F/||X||_F at the returned (best) iterate; sparsity = "
                        "average Hoyer sparsity of the basis vectors (paper's W columns = our components_ rows); "
                        "zero_fraction = exact zeros in the basis; coef_zero_fraction = exact zeros in the coefficients (our W, the "
                        "paper's H)")
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    return summary


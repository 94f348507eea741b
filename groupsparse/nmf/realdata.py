"""Sparse NMF on real data (issue 12): CBCL faces with hidden pixels, and topics of the Python documentation.

    python -m groupsparse.nmf.realdata cbcl-masked --out results/nmf/cbcl_masked
    python -m groupsparse.nmf.realdata topics --out results/nmf/topics

``--out`` is required: nothing is written into the source tree unless that path is passed explicitly. Outputs are
JSON + CSV + PNG, written atomically.
"""

from __future__ import annotations

import argparse
import json
import lzma
import math
import re
import sys
import time
import warnings
from pathlib import Path

import numpy as np

from .experiments import DEFAULT_CBCL, _fmt, _save_fig, _write_csv, _write_text, load_matrix
from ._estimator import sparse_nmf
from ._solvers import row_sparsity

DEFAULT_DOCS = DEFAULT_CBCL.parent / "python-docs-3.11.jsonl.xz"


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------- CBCL, masked
def cbcl_masked(out, data=DEFAULT_CBCL, fractions=(0.1, 0.3, 0.5), targets=(0.6, 0.7, 0.8, 0.9), r=49,
                iters=200, seed=0, l1_target=0.7) -> dict:
    """Hide a random fraction of the pixels, fit on the rest, measure the error on the hidden pixels.

    Runs per fraction: A-HALS, GSP on the basis images at each target, the adaptive l1-HALS baseline at
    ``l1_target``, and scikit-learn's ``NMF(solver="cd")`` on the data with hidden pixels set to 0 (scikit-learn
    cannot mask missing entries: zero-filling is what a user of it has to do)."""
    from sklearn.decomposition import NMF
    from sklearn.exceptions import ConvergenceWarning

    out = Path(out)
    X = load_matrix(data).T  # images x pixels: our H rows are the paper's basis images
    rng = np.random.default_rng(seed)
    W0 = rng.random((X.shape[0], r))
    H0 = rng.random((r, X.shape[1]))
    rows = []
    for frac in fractions:
        hide = np.random.default_rng(seed + 1000 + int(100 * frac)).random(X.shape) < frac
        M = ~hide
        xh = np.linalg.norm(X[hide])

        def record(method, target, W, H, seconds, n_iter):
            R = X - W @ H
            rows.append(dict(hidden_fraction=frac, method=method, target=target,
                             hidden_err_percent=100 * float(np.linalg.norm(R[hide]) / xh),
                             observed_err_percent=100 * float(np.linalg.norm(R[M]) / np.linalg.norm(X[M])),
                             sparsity=float(np.mean(row_sparsity(H))), seconds=seconds, iterations=n_iter))
            _log(f"  {frac:.0%} {method:<14} target={target} hidden err {rows[-1]['hidden_err_percent']:.3f} % "
                 f"sparsity {rows[-1]['sparsity']:.3f} ({seconds:.1f} s)")

        runs = [("A-HALS", None, {})] + [("GSP", s, dict(sparsity_H=s)) for s in targets]
        runs.append(("l1-HALS", l1_target, dict(sparsity_H=l1_target, projection="l1")))
        for method, target, kw in runs:
            t0 = time.perf_counter()
            W, H, info = sparse_nmf(X, r, W=W0, H=H0, mask=M, max_iter=iters, tol=0, **kw)
            record(method, target, W, H, time.perf_counter() - t0, info.n_iter)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            sk = NMF(r, init="custom", solver="cd", max_iter=iters, tol=0)
            W = sk.fit_transform(np.where(M, X, 0.0), W=W0.copy(), H=H0.copy())
        record("sklearn-zero-fill", None, W, sk.components_, time.perf_counter() - t0, sk.n_iter_)
    header = list(rows[0])
    _write_csv(out / "table.csv", header, [[_fmt(r_[h]) if r_[h] is not None else "" for h in header] for r_ in rows])
    summary = dict(data=str(data), shape=list(X.shape), r=r, iters=iters, seed=seed, fractions=list(fractions),
                   targets=list(targets), results=rows,
                   note="hidden_err_percent = 100 ||(X - WH) on hidden pixels|| / ||X on hidden pixels||; "
                        "X is images x pixels (CBCL transposed), sparsity = average Hoyer sparsity of the 49 basis "
                        "images; scikit-learn cannot mask, so it is fitted with hidden pixels set to 0")
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    _plot_masked(rows, out / "hidden_error.png")
    return summary


def _plot_masked(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fracs = sorted({r["hidden_fraction"] for r in rows})
    fig, axes = plt.subplots(1, len(fracs), figsize=(4.2 * len(fracs), 3.8))
    colors = {"A-HALS": "k", "l1-HALS": "tab:orange", "sklearn-zero-fill": "tab:red"}
    for ax, f in zip(np.atleast_1d(axes), fracs):
        sub = [r for r in rows if r["hidden_fraction"] == f]
        g = [r for r in sub if r["method"] == "GSP"]
        ax.plot([r["target"] for r in g], [r["hidden_err_percent"] for r in g], "o-", color="tab:blue",
                label="GSP at the target")
        low = min(r["hidden_err_percent"] for r in sub)
        top = 2.0 * low  # zero-filling is far off the scale: its value goes into the legend instead
        for r in sub:
            if r["method"] == "GSP":
                continue
            v = r["hidden_err_percent"]
            ax.axhline(min(v, top), ls="--" if v <= top else ":", color=colors.get(r["method"]),
                       label=f"{r['method']}: {v:.1f} % (sp {r['sparsity']:.2f})" + (" off scale" if v > top else ""))
        ax.set_ylim(0.95 * low, top)
        ax.set_title(f"{100 * f:.0f} % of pixels hidden")
        ax.set_xlabel("GSP target average sparsity of the basis")
        ax.set_ylabel("error on hidden pixels (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------- topics
def bag_of_words(path=DEFAULT_DOCS, chunk_chars=2000, min_df=5, max_df=0.3, max_features=8000):
    """Documents x vocabulary counts (scipy CSR) of the Python docs; each page is cut into chunks of about
    ``chunk_chars`` characters at paragraph boundaries so the matrix has thousands of rows."""
    from sklearn.feature_extraction.text import CountVectorizer

    docs = []
    with lzma.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            text = json.loads(line)["text"]
            buf = ""
            for para in re.split(r"\n\s*\n", text):
                buf += para + "\n"
                if len(buf) >= chunk_chars:
                    docs.append(buf)
                    buf = ""
            if len(buf) > chunk_chars // 4:
                docs.append(buf)
    vec = CountVectorizer(min_df=min_df, max_df=max_df, max_features=max_features, stop_words="english",
                          token_pattern=r"(?u)\b[a-zA-Z][a-zA-Z_]{2,}\b", dtype=np.float64)
    X = vec.fit_transform(docs).tocsr()
    keep = np.asarray(X.sum(axis=1)).ravel() > 0
    return X[keep], np.asarray(vec.get_feature_names_out())


def _kl(X, W, H) -> float:
    """Generalized KL divergence D(X || WH) of a sparse X (the same formula for every method)."""
    rows = np.repeat(np.arange(X.shape[0]), np.diff(X.indptr))
    v = np.einsum("ik,ki->i", W[rows], H[:, X.indices])
    v = np.maximum(v, 1e-300)
    return float(np.sum(X.data * np.log(X.data / v)) - X.data.sum() + W.sum(0) @ H.sum(1))


def topics(out, data=DEFAULT_DOCS, r=20, iters=200, targets=(0.9, 0.95), seed=0, n_top=10, batch_size=512) -> dict:
    """KL vs Frobenius topics with GSP on the topic-word factor, and time per iteration against scikit-learn's
    ``NMF(beta_loss="kullback-leibler", solver="mu")`` and ``MiniBatchNMF`` in the same run."""
    from sklearn.decomposition import NMF, MiniBatchNMF
    from sklearn.exceptions import ConvergenceWarning

    out = Path(out)
    t0 = time.perf_counter()
    X, vocab = bag_of_words(data)
    build_s = time.perf_counter() - t0
    _log(f"bag of words: {X.shape[0]} docs x {X.shape[1]} words, {X.nnz} nonzeros ({build_s:.1f} s)")
    rng = np.random.default_rng(seed)
    scale = math.sqrt(X.sum() / (X.shape[0] * X.shape[1]) / r)
    W0 = rng.random((X.shape[0], r)) * scale
    H0 = rng.random((r, X.shape[1])) * scale
    results, tops = [], {}

    def record(name, W, H, seconds, n_iter, **extra):
        res = dict(method=name, seconds=seconds, iterations=n_iter, ms_per_iter=1e3 * seconds / max(n_iter, 1),
                   kl=_kl(X, W, H), frob_rel=float(np.sqrt(max(_frob2(X, W, H), 0.0)) / np.sqrt(X.data @ X.data)),
                   topic_sparsity=float(np.mean(row_sparsity(H))), topic_zero_fraction=float(np.mean(H == 0)),
                   **extra)
        results.append(res)
        tops[name] = [[str(vocab[j]) for j in np.argsort(-H[k])[:n_top]] for k in range(r)]
        _log(f"  {name:<24} KL {res['kl']:.4g}  frob {res['frob_rel']:.4f}  sparsity {res['topic_sparsity']:.3f}  "
             f"{res['ms_per_iter']:.1f} ms/iter")

    runs = [(f"ours KL + GSP {s:g}", dict(beta_loss="kullback-leibler", sparsity_H=s)) for s in targets]
    runs += [("ours KL", dict(beta_loss="kullback-leibler"))]
    runs += [(f"ours Frobenius + GSP {s:g}", dict(sparsity_H=s)) for s in targets]
    runs += [("ours Frobenius", dict())]
    for name, kw in runs:
        t = time.perf_counter()
        W, H, info = sparse_nmf(X, r, W=W0, H=H0, max_iter=iters, tol=0, **kw)
        halv = info.notes[0]["halvings"] if info.notes else []
        record(name, W, H, time.perf_counter() - t, info.n_iter,
               **(dict(backtracked_steps=int(np.sum(np.asarray(halv) > 0)), pg_steps=len(halv)) if halv else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        t = time.perf_counter()
        sk = NMF(r, init="custom", beta_loss="kullback-leibler", solver="mu", max_iter=iters, tol=0)
        W = sk.fit_transform(X, W=W0.copy(), H=H0.copy())
        record("sklearn NMF KL mu", W, sk.components_, time.perf_counter() - t, sk.n_iter_)
        n_epochs = max(1, iters // 10)
        t = time.perf_counter()
        mb = MiniBatchNMF(r, init="custom", beta_loss="kullback-leibler", batch_size=batch_size, max_iter=n_epochs,
                          tol=0, max_no_improvement=None, random_state=seed)
        W = mb.fit_transform(X, W=W0.copy(), H=H0.copy())
        record("sklearn MiniBatchNMF KL", W, mb.components_, time.perf_counter() - t, mb.n_iter_,
               note="iterations are epochs; per-iteration time is per epoch over all minibatches")
    header = list(dict.fromkeys(k for r_ in results for k in r_ if k != "note"))
    _write_csv(out / "table.csv", header, [[_fmt(r_.get(h)) for h in header] for r_ in results])
    summary = dict(data=str(data), shape=list(X.shape), nnz=int(X.nnz), r=r, iters=iters, targets=list(targets),
                   seed=seed, build_seconds=build_s, results=results, top_words=tops,
                   note="kl = generalized KL divergence D(X || WH) on the count matrix, the same formula for "
                        "every method; frob_rel = ||X - WH||_F / ||X||_F; topic_sparsity = average Hoyer "
                        "sparsity of the topic-word rows; same random start for all full-batch methods")
    _write_text(out / "summary.json", json.dumps(summary, indent=2) + "\n")
    lines = []
    for name in tops:
        lines.append(f"## {name}\n")
        lines += [f"{k:2d}. " + ", ".join(words) for k, words in enumerate(tops[name])]
        lines.append("")
    _write_text(out / "top_words.md", "\n".join(lines) + "\n")
    _plot_topics(results, out / "topics.png")
    return summary


def _plot_topics(results, path):
    """KL divergence, topic sparsity and time per iteration of every run, side by side."""
    import matplotlib
    import matplotlib.ticker

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["method"] for r in results]
    colors = ["tab:blue" if n.startswith("ours KL") else "tab:green" if n.startswith("ours") else "tab:red"
              for n in names]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2), sharey=True)
    for ax, key, label in zip(axes, ("kl", "topic_sparsity", "ms_per_iter"),
                              ("KL divergence D(X || WH) (log)", "average Hoyer sparsity of the topics",
                               "ms per iteration (MiniBatchNMF: per epoch)")):
        ax.barh(range(len(names)), [r[key] for r in results], color=colors)
        ax.set_xlabel(label)
        if key == "kl":
            ax.set_xscale("log")
            ax.set_xlim(1e6, None)
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())  # overlapping minor labels
        if key == "topic_sparsity":
            ax.set_xlim(0.8, 1.0)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(range(len(names)), names)
    axes[0].invert_yaxis()
    fig.suptitle("Python docs bag of words (5086 x 7633, r = 20, 200 iterations); blue: our KL, green: our "
                 "Frobenius, red: scikit-learn KL", fontsize=10)
    fig.tight_layout()
    _save_fig(fig, path)
    plt.close(fig)


def _frob2(X, W, H) -> float:
    """||X - WH||_F^2 of a sparse X without densifying WH: ||X||^2 - 2<X, WH> + <W^T W, H H^T>."""
    cross = float(np.sum((X @ H.T) * W))
    return float(X.data @ X.data) - 2 * cross + float(np.sum((W.T @ W) * (H @ H.T)))


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m groupsparse.nmf.realdata", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("cbcl-masked", help="CBCL faces with 10/30/50 %% of pixels hidden")
    a.add_argument("--out", required=True)
    a.add_argument("--data", default=str(DEFAULT_CBCL))
    a.add_argument("--iters", type=int, default=200)
    a.add_argument("--rank", type=int, default=49)
    a.add_argument("--seed", type=int, default=0)
    a.add_argument("--fractions", type=float, nargs="+", default=[0.1, 0.3, 0.5])
    a.add_argument("--targets", type=float, nargs="+", default=[0.6, 0.7, 0.8, 0.9])
    b = sub.add_parser("topics", help="KL vs Frobenius topics of the Python docs")
    b.add_argument("--out", required=True)
    b.add_argument("--data", default=str(DEFAULT_DOCS))
    b.add_argument("--iters", type=int, default=200)
    b.add_argument("--rank", type=int, default=20)
    b.add_argument("--targets", type=float, nargs="+", default=[0.9, 0.95],
                   help="GSP targets of the topic-word rows (unconstrained fits land near 0.87-0.91 here)")
    b.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    for name in ("iters", "rank"):
        if getattr(args, name) < 1:
            ap.error(f"--{name}: got {getattr(args, name)}, expected an int >= 1")
    if not Path(args.data).exists():
        ap.error(f"--data: got {args.data!r}, which does not exist; expected the file from ../shared/data/")
    if args.cmd == "cbcl-masked":
        for v in args.fractions + args.targets:
            if not 0 < v < 1:
                ap.error(f"--fractions/--targets: got {v}, expected values in (0, 1)")
        s = cbcl_masked(args.out, args.data, fractions=tuple(args.fractions), targets=tuple(args.targets),
                        r=args.rank, iters=args.iters, seed=args.seed)
    else:
        for v in args.targets:
            if not 0 <= v <= 1:
                ap.error(f"--targets: got {v}, expected values in [0, 1]")
        s = topics(args.out, args.data, r=args.rank, iters=args.iters, targets=tuple(args.targets), seed=args.seed)
    print(json.dumps(s["results"], indent=1))


if __name__ == "__main__":
    main()

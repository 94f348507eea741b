"""Aggregate run directories (each with a ``report.json``) into an accuracy-vs-zero-fraction table and plot."""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

COLUMNS = ("dataset", "model", "method", "target_sparsity", "zero_fraction", "accuracy_mean", "accuracy_std",
           "accuracy_min", "dense_accuracy_mean", "delta_vs_dense", "accuracy_before_finetune_mean", "n_seeds",
           "epochs", "finetune_epochs")


def find_reports(paths) -> list[dict]:
    """Every ``report.json`` in the given directories (searched recursively) or given directly."""
    found = []
    for p in map(Path, paths):
        if p.is_file() and p.name == "report.json":
            files = [p]
        elif p.is_dir():
            files = sorted(p.rglob("report.json"))
        else:
            raise FileNotFoundError(f"report: got {str(p)!r}, expected a run directory or a report.json")
        for f in files:
            r = json.loads(f.read_text())
            missing = [k for k in ("method", "target_sparsity", "zero_fraction", "accuracy", "dense_accuracy")
                       if k not in r]
            if missing:
                raise ValueError(f"{f}: got a report without {missing}, expected a groupsparse prune report")
            r["_path"] = str(f.parent)
            found.append(r)
    return found


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def aggregate(reports: list[dict]) -> list[dict]:
    """One row per (dataset, model, method, target) over seeds, plus a ``dense`` row per (dataset, model)."""
    groups = defaultdict(list)
    dense = defaultdict(dict)
    for r in reports:
        key = (r.get("dataset", "?"), r.get("model", "?"), r["method"], round(r["target_sparsity"], 6))
        groups[key].append(r)
        dense[key[:2]][(r.get("seed"), r.get("epochs"))] = r["dense_accuracy"]
    rows = []
    for (ds, model), accs in sorted(dense.items()):
        a = list(accs.values())
        rows.append({"dataset": ds, "model": model, "method": "dense", "target_sparsity": 0.0, "zero_fraction": 0.0,
                     "accuracy_mean": _mean(a), "accuracy_std": _std(a), "accuracy_min": min(a),
                     "dense_accuracy_mean": _mean(a), "delta_vs_dense": 0.0, "accuracy_before_finetune_mean": "",
                     "n_seeds": len(a), "epochs": "", "finetune_epochs": ""})
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[3], k[2])):
        rs = groups[key]
        acc = [r["accuracy"] for r in rs]
        dacc = [r["dense_accuracy"] for r in rs]
        before = [r["accuracy_before_finetune"] for r in rs if "accuracy_before_finetune" in r]
        rows.append({"dataset": key[0], "model": key[1], "method": key[2], "target_sparsity": key[3],
                     "zero_fraction": _mean([r["zero_fraction"] for r in rs]), "accuracy_mean": _mean(acc),
                     "accuracy_std": _std(acc), "accuracy_min": min(acc), "dense_accuracy_mean": _mean(dacc),
                     "delta_vs_dense": _mean(acc) - _mean(dacc),
                     "accuracy_before_finetune_mean": _mean(before) if before else "", "n_seeds": len(rs),
                     "epochs": rs[0].get("epochs", ""), "finetune_epochs": rs[0].get("finetune_epochs", "")})
    return rows


def write_csv(rows: list[dict], path: str | Path) -> None:
    from ..io import atomic_path

    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS)
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items()})


def print_table(rows: list[dict]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title="accuracy vs zero fraction (mean ± std over seeds)")
    for col in ("dataset", "model", "method", "zeros", "accuracy", "Δ dense", "before finetune", "seeds"):
        t.add_column(col, justify="right" if col not in ("dataset", "model", "method") else "left")
    for r in rows:
        before = r["accuracy_before_finetune_mean"]
        t.add_row(r["dataset"], r["model"], r["method"], f"{100 * r['zero_fraction']:.1f}%",
                  f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}",
                  f"{100 * r['delta_vs_dense']:+.2f}", f"{100 * before:.2f}" if before != "" else "",
                  str(r["n_seeds"]))
    Console().print(t)


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io import atomic_path

    panels = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.2), squeeze=False)
    for ax, (ds, model) in zip(axes[0], panels):
        sub = [r for r in rows if (r["dataset"], r["model"]) == (ds, model)]
        for r in sub:
            if r["method"] == "dense":
                ax.axhline(100 * r["accuracy_mean"], color="k", ls="--", lw=1, label="dense")
        for m in sorted({r["method"] for r in sub} - {"dense"}):
            pts = sorted((r["zero_fraction"], r["accuracy_mean"], r["accuracy_std"]) for r in sub if r["method"] == m)
            # x = -log10(1 - zeros): 90, 99 % zeros spread evenly, where the methods differ.
            xs = [-math.log10(max(1 - z, 1e-6)) for z, _, _ in pts]
            ax.errorbar(xs, [100 * a for _, a, _ in pts], yerr=[100 * s for _, _, s in pts], marker="o",
                        capsize=3, label=m)
        # Random pruning (a floor) can sit tens of points lower: keep the axis on the methods that compete.
        main = [100 * r["accuracy_mean"] for r in sub if r["method"] != "random"]
        if main and any(100 * r["accuracy_mean"] < min(main) - 10 for r in sub if r["method"] == "random"):
            ax.set_ylim(min(main) - 4, max(main) + 1.5)
            ax.text(0.02, 0.02, "random: below the axis, see the table", transform=ax.transAxes, fontsize=8)
        ticks = sorted({r["target_sparsity"] for r in sub if r["method"] != "dense"})
        ax.set_xticks([-math.log10(1 - t) for t in ticks], [f"{100 * t:g}" for t in ticks])
        ax.set_xlabel("zeros among pruned weights (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds} / {model}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)

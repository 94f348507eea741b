"""Aggregate run folders (each with a ``report.json``) into an accuracy-vs-zero-fraction table and plot.

Runs are grouped by their full settings (everything in the run's manifest but the seed), so runs with other
budgets or options are never averaged together; a folder given twice (or reached through two paths) counts once.
With a baseline method, every row also gets paired statistics over the seeds both have: the mean paired
difference of test accuracy, its standard error, and wins/losses/ties.
"""

from __future__ import annotations

import csv
import json
import math
import sys
from collections import defaultdict
from pathlib import Path

from . import _files

COLUMNS = ("dataset", "model", "method", "protocol", "variant", "target_sparsity", "zero_fraction", "epochs",
           "finetune_epochs", "total_epochs", "accuracy_mean", "accuracy_std", "accuracy_min", "val_accuracy_mean",
           "dense_accuracy_mean", "delta_vs_dense", "accuracy_before_finetune_mean", "n_seeds", "seeds",
           "baseline", "paired_diff_mean", "paired_diff_se", "wins", "losses", "ties")
_REQUIRED = ("method", "target_sparsity", "zero_fraction", "accuracy", "dense_accuracy")
# Settings shown in their own columns (or implied by them); the others make up the "variant".
_SHOWN = ("dataset", "model", "method", "protocol", "sparsity", "seed", "epochs", "finetune_epochs", "gsp_sparsity",
          "induce_epochs", "start_epoch", "vectors", "scope", "values", "data_id", "groupsparse", "torch", "device")


def find_reports(paths) -> list[dict]:
    """Every ``report.json`` in the given folders (searched recursively) or given directly, each once.

    A report inside the folder of another report (DeepHoyer's lambda candidates) belongs to that run and is
    skipped.
    """
    files: dict[Path, None] = {}
    for p in map(Path, paths):
        if p.is_file() and p.name == "report.json":
            files[p.resolve()] = None
        elif p.is_dir():
            root = p.resolve()
            for f in sorted(p.rglob("report.json")):
                f = f.resolve()
                # a run folder inside another run folder (below the searched folder) is a part of that run
                inner = f.parent.parents[:len(f.parent.relative_to(root).parts)] if f.is_relative_to(root) else ()
                if not any((a / _files.MANIFEST).is_file() or (a / "report.json").is_file() for a in inner):
                    files[f] = None
        else:
            raise FileNotFoundError(f"report: got {str(p)!r}, expected a run folder or a report.json")
    found = []
    for f in files:
        r = _files.read_json(f)
        missing = [k for k in _REQUIRED if k not in r]
        if missing:
            raise ValueError(f"{f}: got a report without {missing}, expected a groupsparse prune report")
        r["_path"] = str(f.parent)
        found.append(r)
    return found


def _settings(r: dict) -> dict:
    s = r.get("settings")
    if isinstance(s, dict):
        return dict(s)
    # Reports written before run manifests: the resolved config is the best description there is.
    c = {k: v for k, v in (r.get("config") or {}).items() if k not in ("out", "cache_dir", "data", "device")}
    c.setdefault("method", r["method"])
    c.setdefault("sparsity", r["target_sparsity"])
    return c


def _mean(xs):
    return sum(xs) / len(xs)


def _std(xs):
    if len(xs) < 2:
        return 0.0
    m = _mean(xs)
    return math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def _variant(s: dict, others: list[dict]) -> str:
    """The settings of ``s`` that differ among ``others`` (groups that look alike in the shown columns)."""
    keys = sorted({k for o in others for k in o} - set(_SHOWN))
    parts = [f"{k}={s.get(k)}" for k in keys if any(o.get(k) != s.get(k) for o in others)]
    if s.get("values") not in (None, "projected"):
        parts.insert(0, f"values={s['values']}")
    if s.get("vectors") not in (None, "fan_out") or s.get("scope") not in (None, "layer"):
        parts.insert(0, f"{s.get('vectors')}/{s.get('scope')}")
    return " ".join(parts)


def aggregate(reports: list[dict], baseline: str | None = None) -> list[dict]:
    """One row per settings group over seeds, a ``dense`` row per (dataset, model, dense epochs), and paired
    statistics against ``baseline`` ("method" or "method:protocol") when given."""
    groups: dict[str, list[dict]] = defaultdict(list)
    settings: dict[str, dict] = {}
    for r in reports:
        s = _settings(r)
        s.pop("seed", None)
        key = json.dumps(s, sort_keys=True, default=str)
        groups[key].append(r)
        settings[key] = s
    shown = lambda s: (s.get("dataset"), s.get("model"), s.get("method"), s.get("protocol", "after"),  # noqa: E731
                       s.get("sparsity"), s.get("epochs"), s.get("finetune_epochs"))
    alike = defaultdict(list)
    for key, s in settings.items():
        alike[shown(s)].append(s)
    rows, dense = [], defaultdict(dict)
    for key, rs in groups.items():
        s = settings[key]
        by_seed = {}
        for r in rs:  # one run per seed: a duplicate folder of the same run is the same number
            by_seed.setdefault(r.get("seed"), r)
        rs = [by_seed[k] for k in sorted(by_seed, key=str)]
        acc = [r["accuracy"] for r in rs]
        val = [r["val_accuracy"] for r in rs if "val_accuracy" in r]
        before = [r["accuracy_before_finetune"] for r in rs if "accuracy_before_finetune" in r]
        dacc = [r["dense_accuracy"] for r in rs]
        e, f = rs[0].get("epochs"), rs[0].get("finetune_epochs")
        for r in rs:
            dense[(r.get("dataset", "?"), r.get("model", "?"), e)][r.get("seed")] = r["dense_accuracy"]
        rows.append({"dataset": rs[0].get("dataset", "?"), "model": rs[0].get("model", "?"), "method": rs[0]["method"],
                     "protocol": rs[0].get("protocol", "after"), "variant": _variant(s, alike[shown(s)]),
                     "target_sparsity": round(float(rs[0]["target_sparsity"]), 6),
                     "zero_fraction": _mean([r["zero_fraction"] for r in rs]), "epochs": e, "finetune_epochs": f,
                     "total_epochs": (e or 0) + (f or 0), "accuracy_mean": _mean(acc), "accuracy_std": _std(acc),
                     "accuracy_min": min(acc), "val_accuracy_mean": _mean(val) if val else "",
                     "dense_accuracy_mean": _mean(dacc), "delta_vs_dense": _mean(acc) - _mean(dacc),
                     "accuracy_before_finetune_mean": _mean(before) if before else "", "n_seeds": len(rs),
                     "seeds": " ".join(str(r.get("seed")) for r in rs), "_by_seed": by_seed, "_settings": s})
    if baseline:
        _pair(rows, baseline)
    out = []
    for (ds, model, e), accs in sorted(dense.items(), key=lambda kv: tuple(map(str, kv[0]))):
        a = list(accs.values())
        out.append({"dataset": ds, "model": model, "method": "dense", "protocol": "", "variant": "",
                    "target_sparsity": 0.0, "zero_fraction": 0.0, "epochs": e, "finetune_epochs": 0, "total_epochs": e,
                    "accuracy_mean": _mean(a), "accuracy_std": _std(a), "accuracy_min": min(a), "val_accuracy_mean": "",
                    "dense_accuracy_mean": _mean(a), "delta_vs_dense": 0.0, "accuracy_before_finetune_mean": "",
                    "n_seeds": len(a), "seeds": " ".join(map(str, sorted(accs, key=str)))})
    rows.sort(key=lambda r: (r["dataset"], r["model"], r["total_epochs"], r["target_sparsity"], r["method"],
                             r["protocol"], r["variant"]))
    return out + rows


def _pair(rows: list[dict], baseline: str) -> None:
    method, _, protocol = baseline.partition(":")
    protocol = protocol or "after"
    for r in rows:
        cands = [b for b in rows if b["method"] == method and b["protocol"] == protocol and not b["variant"]
                 and (b["dataset"], b["model"], b["target_sparsity"], b["epochs"], b["finetune_epochs"])
                 == (r["dataset"], r["model"], r["target_sparsity"], r["epochs"], r["finetune_epochs"])
                 and b["_settings"].get("data_id") == r["_settings"].get("data_id")]
        if len(cands) != 1 or cands[0] is r:
            continue
        b = cands[0]
        seeds = [s for s in r["_by_seed"] if s in b["_by_seed"]]
        if not seeds:
            continue
        d = [r["_by_seed"][s]["accuracy"] - b["_by_seed"][s]["accuracy"] for s in seeds]
        r.update(baseline=baseline, paired_diff_mean=_mean(d), paired_diff_se=_std(d) / math.sqrt(len(d)),
                 wins=sum(x > 0 for x in d), losses=sum(x < 0 for x in d), ties=sum(x == 0 for x in d))


def write_csv(rows: list[dict], path: str | Path) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            w.writeheader()
            for r in rows:
                w.writerow({k: (f"{v:.4f}" if isinstance(v, float) else v) for k, v in r.items() if k in COLUMNS})

    _files.atomic_write(path, write)


def _cells(r: dict) -> list[str]:
    before = r["accuracy_before_finetune_mean"]
    paired = ""
    if "paired_diff_mean" in r:
        paired = (f"{100 * r['paired_diff_mean']:+.2f} ± {100 * r['paired_diff_se']:.2f} "
                  f"({r['wins']}/{r['losses']}/{r['ties']})")
    budget = f"{r['epochs']}+{r['finetune_epochs']}" if r["method"] != "dense" else f"{r['epochs']}"
    return [r["dataset"], r["model"], r["method"], r["protocol"], r["variant"], f"{100 * r['zero_fraction']:.1f}%",
            budget, f"{100 * r['accuracy_mean']:.2f} ± {100 * r['accuracy_std']:.2f}", f"{100 * r['delta_vs_dense']:+.2f}",
            f"{100 * before:.2f}" if before != "" else "", paired, str(r["n_seeds"])]


_HEADERS = ("dataset", "model", "method", "protocol", "variant", "zeros", "epochs", "test acc (mean ± std)", "Δ dense",
            "before finetune", "paired Δ ± se (w/l/t)", "seeds")


def print_table(rows: list[dict], baseline: str | None = None, file=None) -> None:
    """A rich table on a terminal; plain aligned text otherwise (logs and pipes get whole lines)."""
    file = file or sys.stdout
    title = "test accuracy vs zero fraction (mean ± std over seeds; epochs = dense + after)"
    if baseline:
        title += f"; paired vs {baseline}: mean difference ± standard error (wins/losses/ties)"
    cells = [_cells(r) for r in rows]
    if file.isatty():
        from rich.console import Console
        from rich.table import Table

        t = Table(title=title)
        for h in _HEADERS:
            t.add_column(h, justify="left" if h in ("dataset", "model", "method", "protocol", "variant") else "right")
        for c in cells:
            t.add_row(*c)
        Console(file=file).print(t)
        return
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(_HEADERS)]
    print(title, file=file)
    for line in [list(_HEADERS)] + cells:
        print("  ".join(x.ljust(w) if i < 5 else x.rjust(w) for i, (x, w) in enumerate(zip(line, widths))).rstrip(),
              file=file)


def plot(rows: list[dict], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["dataset"], r["model"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(11 * len(panels), 5.5), squeeze=False)
    for ax, (ds, model) in zip(axes[0], panels):
        sub = [r for r in rows if (r["dataset"], r["model"]) == (ds, model)]
        for r in sub:
            if r["method"] == "dense":
                ax.axhline(100 * r["accuracy_mean"], color="k", ls="--", lw=1, label=f"dense ({r['epochs']} ep)")
        lines = sorted({(r["method"], r["protocol"], r["variant"], r["epochs"], r["finetune_epochs"])
                        for r in sub if r["method"] != "dense"}, key=str)
        colors = plt.get_cmap("tab20").colors
        for i, (m, p, v, e, f) in enumerate(lines):
            pts = sorted((r["zero_fraction"], r["accuracy_mean"], r["accuracy_std"]) for r in sub
                         if (r["method"], r["protocol"], r["variant"], r["epochs"], r["finetune_epochs"]) == (m, p, v, e, f))
            # x = -log10(1 - zeros): 90, 99 % zeros spread evenly, where the methods differ.
            xs = [-math.log10(max(1 - z, 1e-6)) + 0.004 * (i - len(lines) / 2) for z, _, _ in pts]
            ax.errorbar(xs, [100 * a for _, a, _ in pts], yerr=[100 * s for _, _, s in pts], marker="o", ms=4,
                        capsize=2, color=colors[i % len(colors)], ls="-" if p != "during" else "--", label=f"{m} {p} {v} ({e}+{f} ep)".replace("  ", " "))
        # Random pruning (a floor) can sit tens of points lower: keep the axis on the methods that compete.
        main = [100 * r["accuracy_mean"] for r in sub if r["method"] != "random"]
        if main and any(100 * r["accuracy_mean"] < min(main) - 10 for r in sub if r["method"] == "random"):
            ax.set_ylim(min(main) - 4, max(main) + 1.5)
            ax.text(0.02, 0.02, "random: below the axis, see the table", transform=ax.transAxes, fontsize=8)
        ticks = sorted({r["target_sparsity"] for r in sub if r["method"] != "dense"})
        ax.set_xticks([-math.log10(1 - t) for t in ticks], [f"{100 * t:g}" for t in ticks])
        if len(ticks) == 1:  # one zero fraction: keep the small side-by-side offsets small on the axis too
            ax.set_xlim(-math.log10(1 - ticks[0]) - 0.08, -math.log10(1 - ticks[0]) + 0.08)
        ax.set_xlabel("zeros among pruned weights (%)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{ds} / {model} (mean ± std over seeds; epochs = dense + after)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    _files.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)

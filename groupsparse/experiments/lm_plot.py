"""The figure of the LM pruning evaluation: perplexity against sparsity, and GSP's layer allocation against OWL's."""

from __future__ import annotations

from pathlib import Path

STYLE = {"magnitude": ("tab:gray", "o"), "wanda": ("tab:blue", "s"), "sparsegpt": ("tab:red", "^"),
         "owl": ("tab:purple", "D"), "gsp-layer": ("tab:green", "v"), "gsp-model": ("tab:olive", "P"),
         "gsp-model-refit": ("tab:orange", "X"), "wanda-refit": ("tab:cyan", "*"), "gsp-refit": ("tab:orange", "X")}


def plot(rows: list[dict], alloc: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, ax2, ax3, ax4) = plt.subplots(1, 4, figsize=(21, 4.8), gridspec_kw={"width_ratios": [1.3, 1, 1, 1]})
    dense = next((r["test_ppl"] for r in rows if r["row"] == "dense"), None)
    for method, (color, marker) in STYLE.items():
        pts = sorted((float(r["setting"]), r["test_ppl"]) for r in rows
                     if r["method"] == method and ":" not in r["setting"] and r["setting"] != "dense")
        if pts:
            ax.plot(*zip(*pts), color=color, marker=marker, label=method)
    if dense:
        ax.axhline(dense, color="k", ls=":", label=f"dense {dense:.1f}")
    ax.set(xlabel="zero fraction of decoder Linear weights", ylabel="test perplexity", yscale="log",
           title="unstructured")
    ax.legend(fontsize=7)
    nm = [r for r in rows if ":" in r["setting"]]
    settings = sorted({r["setting"] for r in nm})
    methods = [m for m in STYLE if any(r["method"] == m for r in nm)]
    width = 0.8 / max(len(methods), 1)
    for i, m in enumerate(methods):
        for j, s in enumerate(settings):
            v = [r["test_ppl"] for r in nm if r["method"] == m and r["setting"] == s]
            if v:
                ax2.bar(j + i * width, v[0], width, color=STYLE[m][0], label=m if j == 0 else None)
    if dense:
        ax2.axhline(dense, color="k", ls=":")
    ax2.set_xticks([j + 0.4 - width / 2 for j in range(len(settings))], settings)
    ax2.set(ylabel="test perplexity", yscale="log", title="N:M")
    ax2.legend(fontsize=7)
    for key, (color, ls) in {"owl_0.7": ("tab:purple", "-"), "gsp-model_0.7": ("tab:olive", "-"),
                             "owl_0.5": ("tab:purple", "--"), "gsp-model_0.5": ("tab:olive", "--")}.items():
        if key in alloc:
            b = alloc[key]["blocks"]
            ax3.plot([x["block"] for x in b], [x["sparsity"] for x in b], color=color, ls=ls, marker="o",
                     label=key.replace("_", " @ "))
    ax3.set(xlabel="decoder block", ylabel="zero fraction of the block", title="layer allocation: GSP (model group) vs OWL")
    ax3.legend(fontsize=7)
    # GSP's allocation by kind of layer (OWL gives every Linear of a block the same sparsity)
    for j, key in enumerate(k for k in ("gsp-model_0.5", "gsp-model_0.7") if k in alloc):
        kinds: dict[str, list[float]] = {}
        for name, z in alloc[key]["layers"].items():
            kinds.setdefault(name.rsplit(".", 1)[-1], []).append(z)
        names = sorted(kinds)
        ax4.bar([i + 0.4 * j for i in range(len(names))], [sum(kinds[n]) / len(kinds[n]) for n in names], 0.4,
                label=key.replace("_", " @ "))
        ax4.set_xticks(range(len(names)), names, rotation=30, fontsize=8)
    ax4.set(ylabel="mean zero fraction over blocks", title="GSP (model group): allocation by layer kind")
    ax4.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

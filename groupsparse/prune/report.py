"""Sparsity report: per tensor and overall, exact zeros and average Hoyer sparsity; table and JSON."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import torch
from torch import nn

from .vectors import as_vectors, check_mode


@dataclass
class LayerStats:
    name: str
    shape: list[int]
    numel: int
    zeros: int
    zero_fraction: float
    hoyer: float | None  # mean Hoyer sparsity of the tensor's vectors (None when vectors have one entry)


@dataclass
class SparsityReport:
    vectors: str
    layers: list[LayerStats] = field(default_factory=list)

    @property
    def numel(self) -> int:
        return sum(layer.numel for layer in self.layers)

    @property
    def zeros(self) -> int:
        return sum(layer.zeros for layer in self.layers)

    @property
    def zero_fraction(self) -> float:
        return self.zeros / self.numel if self.numel else 0.0

    @property
    def hoyer(self) -> float | None:
        """Element-weighted mean of the per-tensor averages (big layers weigh as much as their size)."""
        vals = [(layer.hoyer, layer.numel) for layer in self.layers if layer.hoyer is not None]
        n = sum(c for _, c in vals)
        return sum(h * c for h, c in vals) / n if n else None

    def to_dict(self) -> dict:
        return {"vectors": self.vectors, "numel": self.numel, "zeros": self.zeros,
                "zero_fraction": self.zero_fraction, "hoyer": self.hoyer,
                "layers": [asdict(layer) for layer in self.layers]}

    def to_json(self, path=None, *, indent: int = 2) -> str:
        text = json.dumps(self.to_dict(), indent=indent)
        if path is not None:
            from ..io import atomic_path

            with atomic_path(path) as tmp:
                tmp.write_text(text + "\n")
        return text

    def table(self, title: str | None = "Sparsity"):
        """A :class:`rich.table.Table` (print with ``rich.print`` or ``Console().print``)."""
        from rich.table import Table

        t = Table(title=title)
        for col, just in (("tensor", "left"), ("shape", "left"), ("params", "right"), ("zeros", "right"),
                          (f"Hoyer ({self.vectors})", "right")):
            t.add_column(col, justify=just)
        for layer in self.layers:
            t.add_row(layer.name, "×".join(map(str, layer.shape)), f"{layer.numel:,}", f"{layer.zero_fraction:.2%}",
                      "-" if layer.hoyer is None else f"{layer.hoyer:.3f}")
        t.add_section()
        t.add_row("total", "", f"{self.numel:,}", f"{self.zero_fraction:.2%}",
                  "-" if self.hoyer is None else f"{self.hoyer:.3f}")
        return t

    def print(self, console=None, title: str | None = "Sparsity") -> None:
        from rich.console import Console

        (console or Console()).print(self.table(title))

    def __str__(self) -> str:
        lines = [f"{'tensor':<40} {'shape':<18} {'params':>12} {'zeros':>8} {'hoyer':>7}"]
        for layer in self.layers:
            h = "-" if layer.hoyer is None else f"{layer.hoyer:.3f}"
            lines.append(f"{layer.name:<40} {'x'.join(map(str, layer.shape)):<18} {layer.numel:>12,} "
                         f"{layer.zero_fraction:>8.2%} {h:>7}")
        h = "-" if self.hoyer is None else f"{self.hoyer:.3f}"
        lines.append(f"{'total':<40} {'':<18} {self.numel:>12,} {self.zero_fraction:>8.2%} {h:>7}")
        return "\n".join(lines)


def _mean_hoyer(w: torch.Tensor, mode: str) -> float | None:
    try:
        m = as_vectors(w.detach(), mode)
    except ValueError:
        return None
    if m.shape[1] < 2 or m.shape[0] == 0:
        return None
    m = m.double().abs()
    n = m.shape[1]
    l1, l2 = m.sum(1), torch.linalg.vector_norm(m, dim=1)
    sq = n ** 0.5
    sp = torch.where(l2 > 0, (sq - l1 / torch.where(l2 > 0, l2, torch.ones_like(l2))) / (sq - 1), torch.ones_like(l2))
    return float(sp.mean())


def sparsity_report(source: nn.Module | Mapping[str, torch.Tensor], *, vectors: str = "filter",
                    names: list[str] | None = None, **selection: Any) -> SparsityReport:
    """Measure zeros and Hoyer sparsity.

    ``source`` is a model (its selected parameters, see :func:`~groupsparse.prune.select_parameters`; masks
    are applied first so a torch-prune or parametrized model reports its effective weights) or a mapping of
    name -> tensor (e.g. a state_dict; ``names`` picks keys, default the checkpoint rule of
    :func:`~groupsparse.prune.select_state_dict_keys`). Hoyer sparsity is averaged over the vectors of ``vectors``
    mode, as the projection defines it.
    """
    mode = check_mode(vectors)
    canonical: dict[str, torch.Tensor] = {}
    if isinstance(source, nn.Module):
        from .masks import pruned_state_dict
        from .selection import select_parameters

        sd = pruned_state_dict(source)
        targets = select_parameters(source, **selection)
        tensors = {t.name: sd[t.name] for t in targets}
        # (in, out)-stored layers are measured in the (out, in) layout, as the projection sees them
        canonical = {t.name: t.canonical(sd[t.name]) for t in targets}
    else:
        if not isinstance(source, Mapping):
            raise TypeError(f"source: got {type(source).__name__}, expected an nn.Module or a mapping of tensors")
        if names is None:
            from .selection import select_state_dict_keys

            names = select_state_dict_keys(source, **selection)
        tensors = {n: source[n] for n in names}
    report = SparsityReport(mode)
    for n, w in tensors.items():
        w = w.detach()
        z = int((w == 0).sum())
        report.layers.append(LayerStats(n, list(w.shape), w.numel(), z, z / w.numel() if w.numel() else 0.0,
                                        _mean_hoyer(canonical.get(n, w), mode)))
    return report

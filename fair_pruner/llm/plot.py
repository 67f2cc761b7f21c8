"""A pruned LM's widths at a glance: one row per decoder layer, attention and MLP side by side."""
from __future__ import annotations

from typing import Dict, List, Optional

from ..plan import Plan
from ..scorebook import ScoreBook, atomic_write

ROLES = (("attention", "attention", "#d9822b"), ("ffn", "MLP", "#3b75af"),
         ("experts", "experts", "#5a9e4b"))


def _layers(book: ScoreBook) -> Dict[object, Dict[str, object]]:
    rows: Dict[object, Dict[str, object]] = {}
    for g in book.groups:
        role = g.meta.get("family", g.kind)
        role = "experts" if g.kind == "expert" else role
        rows.setdefault(g.meta.get("layer", g.name), {})[role] = g
    return rows


def plot_layers(book: ScoreBook, plan: Plan, path, title: Optional[str] = None) -> List[tuple]:
    """Write a PNG: per decoder layer, the kept fraction of each unit kind as a horizontal bar
    labelled ``kept/total`` (``KV`` / ``q`` marks the attention unit: a KV group or a query
    head). Unit kinds the book has no group for are left out. Returns the bars drawn, as
    ``(layer, role, kept, total)``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = _layers(book)
    roles = [r for r in ROLES if any(r[0] in fams for fams in rows.values())]
    n, k = len(rows), max(1, len(roles))
    h = 0.8 / k
    drawn: List[tuple] = []
    fig, ax = plt.subplots(figsize=(7.5, max(3.0, 0.28 * n * k + 1.4)))
    for j, (role, label, color) in enumerate(roles):
        ys, xs, texts = [], [], []
        for i, (layer, fams) in enumerate(rows.items()):
            g = fams.get(role)
            if g is None:
                continue
            kept = plan.kept[g.name]
            drawn.append((layer, role, kept, g.size))
            unit = {"kv": " KV", "query": " q"}.get(g.meta.get("mode"), "")
            ys.append(i + (j - (k - 1) / 2) * h)
            xs.append(kept / g.size if g.size else 1.0)
            texts.append(f"{kept}/{g.size}{unit}")
        ax.barh(ys, xs, height=h * 0.92, color=color, label=label)
        for y, x, t in zip(ys, xs, texts):
            ax.text(min(x, 1.0) + 0.01, y, t, va="center", fontsize=6.5)
    ax.set_yticks(range(n))
    ax.set_yticklabels([str(l) for l in rows], fontsize=7)
    ax.set_ylim(n - 0.5, -0.5)
    ax.set_xlim(0, 1.22)
    ax.set_xlabel("kept fraction of the layer's units")
    ax.set_ylabel("decoder layer")
    ax.legend(loc="lower right", fontsize=7)
    ax.set_title(title or f"{plan.strategy}: attention+MLP params "
                          f"-{plan.params_reduction:.1%} ({plan.signal})", fontsize=9)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=110))
    plt.close(fig)
    return drawn

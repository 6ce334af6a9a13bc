"""Results on disk: atomic JSON, training-curve plots (PNG) and a Markdown report."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from moma_core.atomic import atomic_write


def write_json(path: str | Path, obj: object) -> None:
    """Write ``obj`` as indented JSON, atomically (a crash never leaves half a file)."""
    text = json.dumps(obj, indent=2, default=float)
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def plot_curves(path: str | Path, x: Sequence[float], panels: dict[str, dict[str, Sequence]],
                xlabel: str, title: str = "",
                hlines: dict[str, tuple[float, str]] | None = None,
                notes: dict[str, str] | None = None) -> Path:
    """One subplot per panel, one line per series: ``{"loss": {"train": [...]}, ...}``.

    ``hlines``: per panel a reference level drawn dashed, ``(y, label)`` (chance level, say);
    ``notes``: per panel the text shown instead of an empty plot when no series has a value
    (default "no data").
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    hlines, notes = hlines or {}, notes or {}
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, series) in zip(axes[0], panels.items(), strict=True):
        plotted = False
        for label, ys in series.items():
            pts = [(a, b) for a, b in zip(x, ys, strict=False) if b is not None]
            if pts:
                ax.plot(*zip(*pts, strict=True), marker="o", markersize=3, label=label)
                plotted = True
        ax.set_title(name)
        if not plotted:
            ax.text(0.5, 0.5, notes.get(name, "no data"), ha="center", va="center",
                    wrap=True, fontsize=9, transform=ax.transAxes)
            ax.set_xticks([])
            ax.set_yticks([])
            continue
        if name in hlines:
            y, label = hlines[name]
            ax.axhline(y, linestyle="--", color="grey", linewidth=1, label=label)
        ax.set_xlabel(xlabel)
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A Markdown table; floats with 4 decimals."""
    def fmt(v: object) -> str:
        return f"{v:.4f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in columns) + " |" for r in rows]
    return "\n".join(lines)

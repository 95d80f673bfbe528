"""Turn the study's records into a Markdown report and two PNG figures.

- ``report.md``: test error per method (rows) and batch size (columns, 32 ... 2 as in SPEC §3 and the
  Group Norm paper), mean ± std over seeds; then training error, wall time per run, and Switchable Norm's
  learned importance weights.
- ``error_vs_batch.png``: test error versus batch size, one line per method (the GN paper's Figure 1).
- ``sn_importance.png``: SN's IN / LN / BN shares for the mean and the variance versus batch size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

REPORT_FILE = "report.md"
ERROR_FIGURE = "error_vs_batch.png"
SN_FIGURE = "sn_importance.png"

DISPLAY = {"bn": "BN", "gn": "GN", "ln": "LN", "in": "IN", "sn": "SN", "wn": "WN", "cosine": "Cosine"}
SOURCES = ("in", "ln", "bn")


def display_name(method: str) -> str:
    return DISPLAY.get(method, "no norm" if method == "none" else method)


@dataclass
class Cell:
    """The seeds of one (method, batch size)."""

    test: list[float] = field(default_factory=list)  # errors as fractions
    train: list[float] = field(default_factory=list)
    wall: list[float] = field(default_factory=list)
    sn: list[dict] = field(default_factory=list)

    @property
    def n(self) -> int:
        return len(self.test)


def mean_std(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def collect(records: list[dict]) -> dict[tuple[str, int], Cell]:
    cells: dict[tuple[str, int], Cell] = {}
    for r in records:
        cell = cells.setdefault((r["method"], r["batch_size"]), Cell())
        cell.test.append(r["test_error"])
        cell.train.append(r["train_error"])
        cell.wall.append(r["wall_s"])
        if r.get("sn_importance"):
            cell.sn.append(r["sn_importance"])
    return cells


def sn_share(cell: Cell, part: str, source: str) -> tuple[float, float] | None:
    values = [imp[part][source] for imp in cell.sn if imp.get(part, {}).get(source) is not None]
    return mean_std(values) if values else None


# --- Markdown ---------------------------------------------------------------------------------------------


def markdown(records: list[dict], methods: list[str], batch_sizes: list[int], title: str = "") -> str:
    cells = collect(records)
    columns = sorted(batch_sizes, reverse=True)
    seeds = sorted({c.n for c in cells.values()}) or [0]
    seeds_text = f"{seeds[0]}" if len(seeds) == 1 else f"{seeds[0]}–{seeds[-1]}"
    out = [f"# {title}" if title else "# normlab study", ""]

    def table(caption: str, value, bold_min: bool = False) -> None:
        out.extend([caption, "", "| images per batch | " + " | ".join(map(str, columns)) + " |"])
        out.append("|---" * (len(columns) + 1) + "|")
        best = {}
        if bold_min:
            for b in columns:
                means = [mean_std(cells[m, b].test)[0] for m in methods if (m, b) in cells]
                best[b] = min(means) if means else None
        for m in methods:
            row = []
            for b in columns:
                cell = cells.get((m, b))
                text = value(cell) if cell is not None and cell.n else "–"
                if bold_min and cell is not None and cell.n and math.isclose(mean_std(cell.test)[0], best[b]):
                    text = f"**{text}**"
                row.append(text)
            out.append(f"| {display_name(m)} | " + " | ".join(row) + " |")
        out.append("")

    def pct(values: list[float]) -> str:
        mean, std = mean_std(values)
        return f"{100 * mean:.1f} ± {100 * std:.1f}" if len(values) > 1 else f"{100 * mean:.1f}"

    table(
        f"Test error (%), mean ± std over {seeds_text} seed(s); lowest per column in bold:",
        lambda c: pct(c.test),
        bold_min=True,
    )
    table("Training error (%) on the last epoch's batches, in training mode:", lambda c: pct(c.train))
    table("Wall time per run (s), mean over seeds:", lambda c: f"{mean_std(c.wall)[0]:.1f}")

    sn_methods = [m for m in methods if any(cells.get((m, b)) and cells[m, b].sn for b in columns)]
    for m in sn_methods:
        out.extend(
            [
                f"{display_name(m)}'s learned importance weights (softmax), averaged over its layers and seeds "
                "(the head's layers mix only LN and BN):",
                "",
                "| images per batch | " + " | ".join(map(str, columns)) + " |",
                "|---" * (len(columns) + 1) + "|",
            ]
        )
        for part in ("mean", "var"):
            for source in SOURCES:
                row = []
                for b in columns:
                    cell = cells.get((m, b))
                    share = sn_share(cell, part, source) if cell is not None else None
                    row.append("–" if share is None else f"{share[0]:.2f}")
                if any(v != "–" for v in row):
                    out.append(f"| {source.upper()} share of the {part} | " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


# --- figures ----------------------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    return plt


def _batch_axis(ax, batch_sizes: list[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(batch_sizes)
    ax.set_xticklabels([str(b) for b in batch_sizes])
    ax.set_xlim(max(batch_sizes) * 1.25, min(batch_sizes) / 1.25)  # 32 on the left, 2 on the right
    ax.set_xlabel("images per batch")
    ax.grid(True, which="major", alpha=0.3)


def plot_error(
    records: list[dict], methods: list[str], batch_sizes: list[int], path: str | Path, title: str = ""
) -> None:
    """Test error (%) versus batch size, one line per method, error bars = std over seeds (log y)."""
    from matplotlib.ticker import FixedLocator, FuncFormatter, NullFormatter

    plt = _pyplot()
    cells = collect(records)
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    lowest = 100.0
    for i, m in enumerate(methods):
        bs = [b for b in sorted(batch_sizes) if (m, b) in cells]
        if not bs:
            continue
        stats = [mean_std([100 * e for e in cells[m, b].test]) for b in bs]
        means = [max(s[0], 0.05) for s in stats]
        lowest = min(lowest, *means)
        style = "-" if m in ("bn", "gn", "sn") else "--"
        ax.errorbar(
            bs,
            means,
            yerr=[s[1] for s in stats],
            marker="o",
            ms=4,
            capsize=3,
            linestyle=style,
            linewidth=2.2 if m in ("bn", "gn", "sn") else 1.2,
            label=display_name(m),
            color=f"C{i}",
        )
    _batch_axis(ax, sorted(batch_sizes))
    ax.set_yscale("log")
    bottom = max(lowest / 1.6, 0.03)
    ax.set_ylim(bottom, 100)
    ticks = [t for t in (0.1, 0.2, 0.5, 1, 2, 3, 5, 10, 20, 50, 100) if t >= bottom]
    ax.yaxis.set_major_locator(FixedLocator(ticks))
    ax.yaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_ylabel("test error (%), log scale")
    ax.set_title(title or "test error vs batch size")
    ax.legend(ncol=2, fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def plot_sn(records: list[dict], batch_sizes: list[int], path: str | Path, method: str = "sn", title: str = "") -> bool:
    """SN's IN/LN/BN shares versus batch size (mean and variance panels). False when there is no SN."""
    cells = {k: c for k, c in collect(records).items() if k[0] == method and c.sn}
    if not cells:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8), dpi=120, sharey=True)
    for ax, part in zip(axes, ("mean", "var"), strict=True):
        for source, color in zip(SOURCES, ("C2", "C1", "C0"), strict=True):
            bs, means, stds = [], [], []
            for b in sorted(batch_sizes):
                share = sn_share(cells[method, b], part, source) if (method, b) in cells else None
                if share is not None:
                    bs.append(b)
                    means.append(share[0])
                    stds.append(share[1])
            if bs:
                ax.errorbar(
                    bs,
                    means,
                    yerr=stds,
                    marker="o",
                    ms=4,
                    capsize=3,
                    color=color,
                    linewidth=2.2 if source == "bn" else 1.2,
                    label=f"{source.upper()} share",
                )
        _batch_axis(ax, sorted(batch_sizes))
        ax.set_title(f"importance for the {'mean' if part == 'mean' else 'variance'}")
        ax.set_ylim(0, 1)
    axes[0].set_ylabel("softmax weight, mean over layers")
    axes[0].legend(fontsize=8)
    fig.suptitle(title or "Switchable Norm: learned importance weights vs batch size")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def write_report(
    records: list[dict],
    methods: list[str],
    batch_sizes: list[int],
    out: str | Path,
    title: str = "",
    protocol_text: str = "",
) -> dict[str, Path]:
    """Write report.md and the figures into ``out``; returns {"report": path, "error_figure": ..., ...}."""
    out = Path(out)
    paths = {"report": out / REPORT_FILE, "error_figure": out / ERROR_FIGURE}
    text = markdown(records, methods, batch_sizes, title)
    if protocol_text:
        text = text.replace("\n\n", f"\n\n{protocol_text}\n\n", 1)
    text += f"\nFigures: `{ERROR_FIGURE}`"
    plot_error(records, methods, batch_sizes, paths["error_figure"], title)
    if plot_sn(records, batch_sizes, out / SN_FIGURE):
        paths["sn_figure"] = out / SN_FIGURE
        text += f", `{SN_FIGURE}`"
    paths["report"].write_text(text + ".\n")
    return paths

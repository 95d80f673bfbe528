"""The benchmark's terminal table and JSON."""

from __future__ import annotations

import json


def _num(value, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def _speedup(entry: dict | None) -> str:
    """baseline time ÷ this time: 2.0 means twice as fast as the baseline."""
    if entry is None or not entry.get("x_baseline"):
        return "-"
    return f"{1.0 / entry['x_baseline']:.2f}"


def table(report: dict) -> str:
    """One line per (method, shape, dtype, provider): times in ms (medians), ×clone (time ÷ a clone of the
    same tensor timed in the same loop), speedup over the baseline, forward+backward GB/s and the memory
    kept for backward as a multiple of the tensor's size."""
    head = (
        f"{'method':6} {'shape':16} {'dtype':8} {'provider':8} "
        f"{'fwd ms':>8} {'×clone':>6} {'speedup':>7}  {'bwd ms':>8} {'×clone':>6} {'speedup':>7}  "
        f"{'f+b ms':>8} {'×clone':>6} {'speedup':>7} {'GB/s':>6}  {'saved':>6}"
    )
    lines = [head, "-" * len(head)]
    for r in report["results"]:
        cells = []
        for which in ("fwd", "bwd", "fwd+bwd"):
            e = r.get(which)
            cells.append(
                f"{_num(e and e['ms'], '8.3f')} {_num(e and e['x_clone'], '6.2f')} {_speedup(e):>7}"
            )
        fb = r.get("fwd+bwd")
        saved = r["saved_bytes"] / r["tensor_bytes"]
        lines.append(
            f"{r['method']:6} {'x'.join(map(str, r['shape'])):16} {r['dtype']:8} {r['provider']:8} "
            f"{cells[0]}  {cells[1]}  {cells[2]} {_num(fb and fb['gbps'], '6.1f')}  {saved:5.2f}x"
        )
    m, s = report["machine"], report["settings"]
    lines.append(
        f"torch {m['torch']}, {_where(m, s)}; median of {s['reps']} after {s['warmup']} warm-up; "
        "×clone = time ÷ clone of the same tensor (same loop); speedup = baseline time ÷ time "
        "(baseline: torch.nn; SN: the authors' composite; WN: torch's weight_norm); saved = memory kept "
        "for backward ÷ the tensor's size"
    )
    return "\n".join(lines)


def _where(machine: dict, settings: dict) -> str:
    """The device line: the GPU and normlab's backend, or the CPU threads."""
    backend = settings.get("backend", "auto")
    layout = ", channels_last inputs" if settings.get("layout") == "channels_last" else ""
    if machine.get("gpu"):
        return f"{machine['gpu']} ({machine['device']}), normlab backend {backend}{layout}"
    return f"{machine['threads']} threads, {machine['cpus']} CPUs, normlab backend {backend}{layout}"


def markdown(report: dict) -> str:
    """The table as GitHub markdown (for the README): one row per (method, shape, dtype, provider)."""
    lines = [
        "| method | shape | dtype | provider | fwd ms | fwd ×clone | fwd speedup | bwd ms | f+b ms | f+b ×clone "
        "| f+b speedup | f+b GB/s | saved |",
        "|---|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for r in report["results"]:
        f, b, fb = r.get("fwd"), r.get("bwd"), r.get("fwd+bwd")
        cells = [
            r["method"], "×".join(map(str, r["shape"])), r["dtype"], r["provider"],
            _num(f and f["ms"], ".3f"), _num(f and f["x_clone"], ".2f"), _speedup(f),
            _num(b and b["ms"], ".3f"),
            _num(fb and fb["ms"], ".3f"), _num(fb and fb["x_clone"], ".2f"), _speedup(fb),
            _num(fb and fb["gbps"], ".1f"), f"{r['saved_bytes'] / r['tensor_bytes']:.2f}×",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    m, s = report["machine"], report["settings"]
    lines.append("")
    lines.append(f"torch {m['torch']}, {_where(m, s)}; median of {s['reps']} after "
                 f"{s['warmup']} warm-up; speedup = baseline time ÷ time; ×clone = time ÷ a clone of the same "
                 "tensor timed in the same loop; saved = memory kept for backward ÷ the tensor's size.")
    return "\n".join(lines)


def to_json(report: dict) -> str:
    return json.dumps(report, indent=2)

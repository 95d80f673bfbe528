"""The benchmark matrix: every method × shape × dtype × provider, measured by one harness."""

from __future__ import annotations

import os
import platform
from collections.abc import Callable, Iterable

import torch

from normlab.bench.harness import PASSES, measure
from normlab.bench.providers import BASELINE, LAYOUTS, METHODS, providers, setup

DEFAULT_SHAPES: tuple[tuple[int, ...], ...] = (
    (32, 64, 56, 56),  # ResNet stage 1 at batch 32
    (8, 256, 28, 28),
    (2, 512, 14, 14),
    (1, 128, 128, 128),  # diffusion UNet block (GN with 32 groups)
    (4096, 1024),  # transformer rows: LN (and WN on a Linear)
    (2, 32, 8, 8),  # the study's batch: per-call overhead
)
DEFAULT_DTYPES = ("float32", "bfloat16")


def parse_shape(text: str) -> tuple[int, ...]:
    """'32x64x56x56' -> (32, 64, 56, 56)."""
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"a shape is 2 or more positive sizes joined by 'x', e.g. 32x64x56x56; got {text!r}")
    return shape


def machine(device: str = "cpu") -> dict:
    device = torch.device(device)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {
        "device": str(device),
        "gpu": gpu,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
    }


def run(
    methods: Iterable[str] = METHODS,
    shapes: Iterable[tuple[int, ...]] = DEFAULT_SHAPES,
    dtypes: Iterable[str] = DEFAULT_DTYPES,
    reps: int = 15,
    warmup: int = 3,
    passes: tuple[str, ...] = PASSES,
    progress: Callable[[dict], None] | None = None,
    device: str = "cpu",
    backend: str = "auto",
    checkpoint: Callable[[dict], None] | None = None,
    layout: str = "contiguous",
) -> dict:
    """Run the matrix; returns {"machine", "settings", "results": [one dict per case]}.

    Each result: method, provider, baseline (the provider it is compared with), shape, dtype, saved_bytes,
    tensor_bytes and, per pass, ms / clone_ms / x_clone / gbps — plus x_baseline (time ÷ the baseline's
    time, filled in once both are measured). ``progress`` is called with each result as it is measured,
    ``checkpoint`` with the report so far after each (method, shape, dtype) group. Interrupted (Ctrl-C), it
    returns what was complete, with ``"interrupted": True``.
    ``device`` places every provider's layer and input (CUDA timings synchronize); ``backend`` picks
    normlab's kernel ("auto": Triton on CUDA; on the CPU normlab's native kernels, else ATen's); ``layout``
    "channels_last" stores 4-d and 5-d inputs (and WN's conv weights) channels_last for every provider.
    """
    methods, shapes, dtypes = list(methods), [tuple(s) for s in shapes], list(dtypes)
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ValueError(f"unknown methods {unknown}; expected some of {list(METHODS)}")
    for dtype in dtypes:
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"unknown dtype {dtype!r}; expected a torch dtype name such as float32 or bfloat16")
    if layout not in LAYOUTS:
        raise ValueError(f"unknown layout {layout!r}; expected one of {list(LAYOUTS)}")
    settings = {"reps": reps, "warmup": warmup, "statistic": "median", "passes": list(passes), "backend": backend,
                "layout": layout}
    report = {"machine": machine(device), "settings": settings, "results": [], "interrupted": False}
    try:
        for dtype in dtypes:
            for shape in shapes:
                for method in methods:
                    cases = [setup(method, provider, shape, getattr(torch, dtype), device=device, backend=backend,
                                   layout=layout) for provider in providers(method)]
                    cases = [case for case in cases if case is not None]
                    group = []
                    for case, row in zip(cases, measure(cases, reps, warmup, passes) if cases else [], strict=True):
                        group.append({"method": method, "provider": case.provider, "baseline": BASELINE[method],
                                      "shape": list(shape), "dtype": dtype, **row})
                        if progress is not None:
                            progress(group[-1])
                    _compare(group, passes)
                    report["results"].extend(group)
                    if checkpoint is not None:
                        checkpoint(report)
    except KeyboardInterrupt:
        report["interrupted"] = True
    return report


def _compare(group: list[dict], passes: tuple[str, ...]) -> None:
    base = next((r for r in group if r["provider"] == r["baseline"]), None)
    for row in group:
        for which in passes:
            row[which]["x_baseline"] = row[which]["ms"] / base[which]["ms"] if base else None

"""One runner for every case: forward, backward and forward+backward timed the same way.

Each repetition times a ``clone`` of the same tensor right before the timed pass, and the providers of one
case take turns repetition by repetition, so yardstick and providers see the same machine state (these
machines are shared and noisy); all are reported as medians of the repetitions, after warm-up repetitions
that are not counted. The model of bytes moved — forward: x in, y out;
backward: x and dy in, dx out — gives GB/s. Memory kept for backward is measured, not modelled: the
distinct storages that autograd saves during one forward (`torch.autograd.graph.saved_tensors_hooks`).
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import Tensor

from normlab.bench.providers import Case

PASSES = ("fwd", "bwd", "fwd+bwd")
BYTES_MOVED = {"fwd": 2, "bwd": 3, "fwd+bwd": 5}  # tensors of x's size read or written per pass


def saved_bytes(case: Case) -> int:
    """Bytes of the distinct storages autograd keeps for backward after one forward of ``case``."""
    storages: dict[int, int] = {}

    def pack(t: Tensor) -> Tensor:
        storage = t.untyped_storage()
        storages[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = case.forward()
    del out
    return sum(storages.values())


def _sync(t: Tensor) -> None:
    """Wait for queued GPU work, so a CUDA timing covers the kernels and not just their launch."""
    if t.is_cuda:
        torch.cuda.synchronize(t.device)


def _reset(leaves: list[Tensor]) -> None:
    for t in leaves:
        t.grad = None


def _pass(case: Case, dy: Tensor, which: str) -> tuple[Callable[[], object], Callable[[], object]]:
    """(untimed setup, timed call) for one repetition of ``which``."""
    state: dict[str, Tensor] = {}

    def setup() -> None:
        _reset(case.leaves)
        if which == "bwd":
            state["y"] = case.forward()

    def timed() -> None:
        if which == "fwd":
            case.forward()
        elif which == "bwd":
            state.pop("y").backward(dy)
        else:
            case.forward().backward(dy)

    return setup, timed


def time_pass(cases: list[Case], dys: list[Tensor], which: str, reps: int, warmup: int) -> list[tuple[float, float]]:
    """Per case, median seconds of ``which`` and of a clone of its tensor. Repetitions interleave the cases
    (clone, case 1, clone, case 2, ...), so every provider sees the same machine state."""
    passes = [_pass(case, dy, which) for case, dy in zip(cases, dys, strict=True)]
    times: list[tuple[list[float], list[float]]] = [([], []) for _ in cases]
    for rep in range(warmup + reps):
        for case, (setup, timed), (op_times, clone_times) in zip(cases, passes, times, strict=True):
            _sync(case.tensor)
            start = time.perf_counter()
            case.tensor.clone()
            _sync(case.tensor)
            clone_time = time.perf_counter() - start
            setup()
            _sync(case.tensor)
            start = time.perf_counter()
            timed()
            _sync(case.tensor)
            op_time = time.perf_counter() - start
            if rep >= warmup:
                clone_times.append(clone_time)
                op_times.append(op_time)
    for case in cases:
        _reset(case.leaves)
    return [(statistics.median(op), statistics.median(clone)) for op, clone in times]


def measure(cases: list[Case], reps: int = 15, warmup: int = 3, passes: tuple[str, ...] = PASSES) -> list[dict]:
    """Times, ratios to the clone, GB/s and saved-for-backward bytes of cases timed together (the providers
    of one method on one input), one JSON-ready dict each."""
    dys, rows = [], []
    for case in cases:
        y = case.forward()
        dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(1))
        dys.append(torch.empty_like(y).copy_(dy))  # (in y's layout, as the gradient from the next layer would be)
        del y
        _reset(case.leaves)
        nbytes = case.tensor.numel() * case.tensor.element_size()
        rows.append({"saved_bytes": saved_bytes(case), "tensor_bytes": nbytes})
    for which in passes:
        for row, (seconds, clone) in zip(rows, time_pass(cases, dys, which, reps, warmup), strict=True):
            row[which] = {
                "ms": seconds * 1e3,
                "clone_ms": clone * 1e3,
                "x_clone": seconds / clone,
                "gbps": BYTES_MOVED[which] * row["tensor_bytes"] / seconds / 1e9,
            }
    return rows

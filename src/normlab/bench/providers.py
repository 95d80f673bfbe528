"""One setup per (method, provider): the layer, its input, and the tensor whose clone is the yardstick.

Every provider is a module in training mode called as in a training step, so the timings include what a
model pays per call (argument checks, running-statistics updates). The baseline of each method:

    bn, gn, in, ln   torch.nn's own layer
    sn               `AuthorsSwitchNorm2d`, the authors' plain-PyTorch composite (4-d inputs)
    wn               torch.nn.utils.parametrizations.weight_norm on the same Conv2d/Linear; the timed call
                     recomputes the weight (w = g·v/‖v‖), and the tensor is the weight, not an activation
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

import normlab
from normlab.bench.authors_switch_norm import AuthorsSwitchNorm2d

METHODS = ("bn", "gn", "in", "ln", "sn", "wn")
LAYOUTS = ("contiguous", "channels_last")
BASELINE = {"bn": "torch", "gn": "torch", "in": "torch", "ln": "torch", "sn": "authors", "wn": "torch"}
GROUPS = 32  # GN's groups (the GN paper's default; every default shape has 32 | C), or gcd(32, C)


@dataclass
class Case:
    """A ready-to-time setup. ``forward()`` runs the layer once and returns the output to differentiate;
    ``tensor`` is what the yardstick clones and the bytes model counts (the input, or WN's weight);
    ``leaves`` are the tensors whose ``.grad`` a backward fills (reset between repetitions); ``layer`` is
    the module timed."""

    method: str
    provider: str
    forward: Callable[[], Tensor]
    tensor: Tensor
    leaves: list[Tensor]
    layer: nn.Module


def providers(method: str) -> tuple[str, str]:
    """(normlab, the baseline) for ``method``."""
    return ("normlab", BASELINE[method])


def _weight_norm_fn(provider: str):
    if provider == "torch":
        return torch.nn.utils.parametrizations.weight_norm
    try:
        from normlab.nn.weight_norm import weight_norm
    except ImportError:
        return None
    return weight_norm


def applies(method: str, shape: tuple[int, ...]) -> bool:
    """Feature norms run on (N, C, *spatial) inputs — SN's authors' baseline exactly 4-d — and LN also on
    transformer rows (N, features); WN runs on every shape (a layer sized by its channels)."""
    if method in ("ln", "wn"):
        return len(shape) >= 2
    if method == "sn":
        return len(shape) == 4
    return len(shape) >= 3


def _feature_layer(method: str, provider: str, shape: tuple[int, ...]) -> nn.Module:
    channels, spatial = shape[1], len(shape) - 2
    lib = normlab if provider == "normlab" else nn
    if method == "bn":
        return getattr(lib, f"BatchNorm{max(spatial, 1)}d")(channels)
    if method == "gn":
        return lib.GroupNorm(math.gcd(GROUPS, channels), channels)
    if method == "in":
        return getattr(lib, f"InstanceNorm{spatial}d")(channels, affine=True)
    if method == "ln":
        return lib.LayerNorm(shape[1:])
    if provider == "authors":
        return AuthorsSwitchNorm2d(channels)
    return normlab.SwitchNorm2d(channels)


def _weight_layer(shape: tuple[int, ...]) -> nn.Module:
    channels = shape[-1] if len(shape) == 2 else shape[1]
    return nn.Linear(channels, channels) if len(shape) == 2 else nn.Conv2d(channels, channels, 3)


def in_layout(t: Tensor, layout: str) -> Tensor:
    """``t`` stored as ``layout`` says: "channels_last" gives 4-d and 5-d tensors channels_last(_3d) strides
    (a practitioner's `model.to(memory_format=torch.channels_last)`); other tensors stay as they are."""
    if layout == "channels_last" and t.dim() in (4, 5):
        return t.contiguous(memory_format=torch.channels_last if t.dim() == 4 else torch.channels_last_3d)
    return t


def setup(method: str, provider: str, shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0,
          device: str | torch.device = "cpu", backend: str = "auto", layout: str = "contiguous") -> Case | None:
    """The case, or None where it does not apply (shape) or cannot run here (WN module not importable).
    ``backend`` picks normlab's kernel ("auto", "torch", "native", "cpu", "triton"); baselines ignore it.
    ``layout`` (one of `LAYOUTS`) stores the input — WN: the conv's weight v — channels_last for every provider."""
    if not applies(method, shape):
        return None
    generator = torch.Generator().manual_seed(seed)
    if method == "wn":
        wrap = _weight_norm_fn(provider)
        if wrap is None:
            return None
        torch.manual_seed(seed)
        layer = wrap(_weight_layer(shape)).to(device=device, dtype=dtype)
        if layout == "channels_last":  # (4-d parameters only: a Linear's weight stays as it is)
            layer = layer.to(memory_format=torch.channels_last)
        leaves = [p for p in layer.parameters() if p.requires_grad]
        return Case(method, provider, lambda: layer.weight, layer.weight.detach(), leaves, layer)
    layer = _feature_layer(method, provider, shape).to(device=device, dtype=dtype).train()
    if provider == "normlab":
        layer.backend = backend
    x = in_layout(torch.randn(shape, generator=generator).to(device=device, dtype=dtype), layout).requires_grad_()
    leaves = [x, *(p for p in layer.parameters() if p.requires_grad)]
    return Case(method, provider, lambda: layer(x), x.detach(), leaves, layer)

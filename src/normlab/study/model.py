"""The study's network: one small convolutional net, built the same way for every method.

    trunk:  conv 3x3 stride 1 (width channels)           -> [norm] -> ReLU     full resolution
            conv 3x3 stride 2 (channels x2, up to max)   -> [norm] -> ReLU     repeated while the maps
                                                                               can halve and keep >= 2
    head:   flatten -> (linear -> [norm] -> ReLU) x head_layers -> linear -> logits

"[norm]" is the method's feature norm (``create_norm(method, C, dim=...)``); a weight-side method instead
rewrites every conv and hidden linear layer (``wrap_layer``) and no feature norm follows. The method is
chosen purely by name through normlab's registry, so nothing but the normalization differs between
methods: the same layers, the same initial weights for a given seed.

How many values each statistic sees is what the study is about. 8x8 digits: trunk 8x8 -> 4x4 -> 2x2, then
a head on (N, 64) vectors. In the head a BN statistic is computed from B values (at batch 2 from two: the
normalized pair is exactly +-1), while LN and GN compute theirs per sample from 64 and 8 values whatever
the batch. In the trunk's last layer BN sees B x 4 values, IN 4. The trunk stops at 2 positions per side
because IN (and SN's IN source) needs more than one position per channel. Instance norm is undefined on
(N, C) vectors, so the head of the IN network is left unnormalized (`head_norm` says so).
"""

from __future__ import annotations

import math

import torch
from torch import nn

import normlab
from normlab.registry import canonical_name

GN_GROUPS = 8  # GroupNorm's groups at every layer (the gcd with the channel count where 8 does not divide)


def gn_kwargs(method: str, channels: int) -> dict:
    return {"groups": math.gcd(channels, GN_GROUPS)} if canonical_name(method) == "gn" else {}


def trunk_plan(
    in_channels: int, spatial: tuple[int, ...], width: int, max_width: int
) -> tuple[list[tuple[int, int, int]], tuple[int, ...]]:
    """(c_in, c_out, stride) per conv (a stride-1 stem, then stride 2 while every side stays >= 2), and
    the final spatial shape."""
    plan = [(in_channels, width, 1)]
    size, channels = list(spatial), width
    while all((s + 1) // 2 >= 2 for s in size):
        out = min(2 * channels, max_width)
        plan.append((channels, out, 2))
        size, channels = [(s + 1) // 2 for s in size], out
    return plan, tuple(size)


class StudyNet(nn.Module):
    """Conv trunk down to 2 positions per side + MLP head (see the module docstring)."""

    def __init__(
        self,
        method: str,
        in_channels: int,
        spatial: tuple[int, ...],
        num_classes: int,
        *,
        seed: int = 0,
        width: int = 16,
        max_width: int = 64,
        head_layers: int = 2,
    ):
        super().__init__()
        dim = len(spatial)
        if dim not in (1, 2, 3):
            raise ValueError(f"inputs must have 1, 2 or 3 spatial dims, got spatial shape {spatial}")
        if min(spatial) < 2:
            raise ValueError(f"inputs need at least 2 positions per side, got spatial shape {spatial}")
        self.method = method
        plan, final = trunk_plan(in_channels, spatial, width, max_width)
        conv_cls = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
        convs = [conv_cls(c_in, c_out, 3, stride=stride, padding=1) for c_in, c_out, stride in plan]
        flat = plan[-1][1] * math.prod(final)
        hidden = [nn.Linear(flat if i == 0 else max_width, max_width) for i in range(head_layers)]
        classifier = nn.Linear(max_width if head_layers else flat, num_classes)
        _init_from_seed([*convs, *hidden, classifier], seed)

        weight_side = normlab.norm_kind(method) == "weight"
        trunk: list[nn.Module] = []
        for conv, (_, c_out, _) in zip(convs, plan, strict=True):
            if weight_side:
                trunk.append(normlab.wrap_layer(method, conv))
            else:
                trunk += [conv, normlab.create_norm(method, c_out, dim=dim, **gn_kwargs(method, c_out))]
            trunk.append(nn.ReLU())
        self.trunk = nn.Sequential(*trunk)

        self.head_norm = method
        head: list[nn.Module] = []
        for linear in hidden:
            if weight_side:
                head.append(normlab.wrap_layer(method, linear))
            else:
                head += [linear, self._vector_norm(method, max_width)]
            head.append(nn.ReLU())
        self.head = nn.Sequential(*head)
        self.classifier = classifier

    def _vector_norm(self, method: str, channels: int) -> nn.Module:
        if canonical_name(method) == "in":  # statistics over positions: there are none in (N, C) vectors
            self.head_norm = "none"
            return normlab.create_norm("none", channels, dim=0)
        return normlab.create_norm(method, channels, dim=0, **gn_kwargs(method, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.head(torch.flatten(self.trunk(x), 1)))


def _init_from_seed(layers: list[nn.Module], seed: int) -> None:
    """He-normal weights, zero biases, drawn in a fixed order from the seed alone.

    Done before any normalization is attached, so every method starts from the very same weights.
    He init also keeps the network without normalization trainable.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            fan_in = layer.weight[0].numel()
            layer.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
            layer.bias.zero_()


def sn_importance(model: nn.Module) -> dict[str, dict[str, float]] | None:
    """Switchable Norm's learned weights, {"mean": {source: p}, "var": {...}}, averaged over its layers.

    Returns None when the model has no module with an ``importance()`` method. A source missing from some
    layers (the head's SN on vectors mixes only LN and BN) is averaged over the layers that have it.
    """
    layers = [m.importance() for m in model.modules() if callable(getattr(m, "importance", None))]
    if not layers:
        return None
    out: dict[str, dict[str, float]] = {}
    for part in ("mean", "var"):
        values: dict[str, list[float]] = {}
        for imp in layers:
            for source, p in imp[part].items():
                values.setdefault(source, []).append(float(p))
        out[part] = {source: sum(ps) / len(ps) for source, ps in values.items()}
    return out

"""The study's network: one small convolutional net, built the same way for every method.

    stem:   conv 3x3, stride 1          -> width channels at full resolution
    blocks: conv 3x3, stride 2 (pad 1)  -> channels doubled (up to max_width), resolution halved
            ... repeated until the feature maps are 1 x 1
    head:   flatten -> linear -> logits

Every conv is followed by [feature norm] -> ReLU, or is itself rewritten by a weight-side method. The
method is chosen purely by name through normlab's registry (`create_norm`, `norm_kind`, `wrap_layer`),
so nothing but the normalization differs between methods.

Why down to 1 x 1: at the deepest layer a BN statistic is computed from B x 1 x 1 values per channel, so
at batch 2 from two values (the normalized pair is then exactly +-1). That is the regime where BN breaks;
with 4 x 4 maps it would see 32 values even at batch 2 and would not degrade. 8x8 digits go
8 -> 4 -> 2 -> 1; 28x28 MNIST 28 -> 14 -> 7 -> 4 -> 2 -> 1; MNIST-1D's 40 samples 40 -> 20 -> ... -> 1.
"""

from __future__ import annotations

import math

import torch
from torch import nn

import normlab
from normlab.registry import canonical_name

GN_GROUPS = 8  # groups for GroupNorm at every layer (gcd with the channel count if it does not divide)


def conv_layer(dim: int, c_in: int, c_out: int, stride: int) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return conv(c_in, c_out, kernel_size=3, stride=stride, padding=1, bias=True)


def norm_kwargs(method: str, channels: int) -> dict:
    return {"groups": math.gcd(channels, GN_GROUPS)} if canonical_name(method) == "gn" else {}


class StudyNet(nn.Module):
    """conv stem + stride-2 conv blocks down to 1 x 1 + linear classifier (see the module docstring)."""

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
        min_size: int = 1,
    ):
        super().__init__()
        dim = len(spatial)
        if dim not in (1, 2, 3):
            raise ValueError(f"inputs must have 1, 2 or 3 spatial dims, got spatial shape {spatial}")
        self.method = method
        # Plan the convs: (c_in, c_out, stride) for the stem, then stride 2 until the maps are 1 x 1.
        plan = [(in_channels, width, 1)]
        size, channels = max(spatial), width
        while size > min_size:
            out = min(2 * channels, max_width)
            plan.append((channels, out, 2))
            size, channels = (size + 1) // 2, out
        # Initialize the convs and the classifier first, from the seed alone, so every method starts from
        # the very same weights (He init for the convs: it also suits the network without normalization).
        gen = torch.Generator().manual_seed(seed)
        convs = [conv_layer(dim, c_in, c_out, stride) for c_in, c_out, stride in plan]
        self.classifier = nn.Linear(channels, num_classes)
        with torch.no_grad():
            for conv in convs:
                fan_in = conv.weight[0].numel()
                conv.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=gen)
                conv.bias.zero_()
            bound = 1.0 / math.sqrt(channels)
            self.classifier.weight.uniform_(-bound, bound, generator=gen)
            self.classifier.bias.zero_()
        layers: list[nn.Module] = []
        weight_side = normlab.norm_kind(method) == "weight"
        for conv, (_, c_out, _) in zip(convs, plan, strict=True):
            if weight_side:
                layers.append(normlab.wrap_layer(method, conv))
            else:
                layers.append(conv)
                layers.append(normlab.create_norm(method, c_out, dim=dim, **norm_kwargs(method, c_out)))
            layers.append(nn.ReLU(inplace=True))
        self.features = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x)
        return self.classifier(h.flatten(2).mean(2))


def sn_importance(model: nn.Module) -> dict[str, dict[str, float]] | None:
    """Switchable Norm's learned weights, {"mean": {source: p}, "var": {...}}, averaged over its layers.

    Returns None when the model has no module with an ``importance()`` method. A source missing from some
    layers (SN1d mixes only LN and BN) is averaged over the layers that have it.
    """
    layers = [m.importance() for m in model.modules() if callable(getattr(m, "importance", None))]
    if not layers:
        return None
    out: dict[str, dict[str, float]] = {}
    for part in ("mean", "var"):
        sums: dict[str, list[float]] = {}
        for imp in layers:
            for source, p in imp[part].items():
                sums.setdefault(source, []).append(float(p))
        out[part] = {source: sum(ps) / len(ps) for source, ps in sums.items()}
    return out

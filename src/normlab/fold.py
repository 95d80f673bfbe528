"""Fold Batch Norm into the preceding convolution or linear layer for inference.

    fold_bn(model.eval())    every BN (eval statistics) that directly follows a Conv/Linear disappears:
                             w' = w · γ/sqrt(var + ε) per output channel, b' = (b − mean) · γ/sqrt(var + ε) + β

Pairs are found with torch.fx, falling back to reading nn.Sequential containers; a layer whose output is also
used elsewhere, a shared layer, or a weight-normalized one is left alone.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import nn

from normlab.convert import describe

_FOLDABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d,
             nn.ConvTranspose3d)


def fold_bn(model: nn.Module) -> nn.Module:
    """Fold every BN that directly follows a Conv/Linear layer into that layer, for inference.

    With s = γ / sqrt(running_var + ε) per output channel, the layer's weight becomes W·s and its bias
    (b − running_mean)·s + β, and the BN an `nn.Identity`: the model then computes what it computed in
    eval mode, with one layer less. "Directly follows" is read from the model's graph (torch.fx, with the
    norm layers kept whole) when it can be traced, else from consecutive layers of nn.Sequential
    containers; a Conv/Linear whose output is also used elsewhere, or that is used twice, is left alone,
    as are BN layers without running statistics and weight-normalized layers.
    """
    modules = dict(model.named_modules(remove_duplicate=False))
    uses = Counter(id(m) for m in modules.values())
    for conv_name, bn_name in _conv_bn_pairs(model, modules):
        conv, bn = modules[conv_name], modules[bn_name]
        if uses[id(conv)] > 1 or uses[id(bn)] > 1 or not _foldable(conv, bn):
            continue
        _fold_into(conv, bn)
        if bn_name:
            parent_name, _, child = bn_name.rpartition(".")
            setattr(model.get_submodule(parent_name), child, nn.Identity())
    return model


def _is_folding_bn(module: nn.Module) -> bool:
    info = describe(module)
    return info is not None and info.kind in ("bn", "sync_bn", "frozen_bn") and info.track_running_stats


def _foldable(conv: nn.Module, bn: nn.Module) -> bool:
    if not isinstance(conv, _FOLDABLE) or not _is_folding_bn(bn):
        return False
    if "weight" not in conv._parameters or getattr(conv, "parametrizations", None):  # WN & co.: skip
        return False
    out_channels = conv.out_features if isinstance(conv, nn.Linear) else conv.out_channels
    return out_channels == bn.num_features


def _conv_bn_pairs(model: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    try:
        return _traced_pairs(model, modules)
    except Exception:  # not traceable (data-dependent control flow, ...): read nn.Sequential containers
        return _sequential_pairs(model)


class _NormLeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return describe(m) is not None or type(m).__module__.startswith("normlab") or super().is_leaf_module(
            m, qualname
        )


def _traced_pairs(model: nn.Module, modules: dict[str, nn.Module]) -> list[tuple[str, str]]:
    graph = _NormLeafTracer().trace(model)
    calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
    pairs = []
    for node in graph.nodes:
        if node.op != "call_module" or not _is_folding_bn(modules[node.target]):
            continue
        src = node.args[0] if node.args else None
        if (
            isinstance(src, torch.fx.Node) and src.op == "call_module" and len(src.users) == 1
            and len(node.args) == 1 and not node.kwargs and calls[src.target] == 1 and calls[node.target] == 1
        ):
            pairs.append((src.target, node.target))
    return pairs


def _sequential_pairs(model: nn.Module) -> list[tuple[str, str]]:
    pairs = []
    for name, seq in model.named_modules():
        if isinstance(seq, nn.Sequential):
            children = list(seq.named_children())
            for (a, _), (b, _) in zip(children, children[1:], strict=False):
                prefix = f"{name}." if name else ""
                pairs.append((prefix + a, prefix + b))
    return pairs


@torch.no_grad()
def _fold_into(conv: nn.Module, bn: nn.Module) -> None:
    #   BN(z) = (z − μ)·s + β,  s = γ / sqrt(σ² + ε),  z = W∗x + b
    #   => W' = W·s (per output channel),  b' = (b − μ)·s + β
    weight = conv.weight
    acc = torch.promote_types(weight.dtype, torch.float64)
    scale = torch.rsqrt(bn.running_var.to(acc) + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight.to(acc)
    shift = -bn.running_mean.to(acc) * scale
    if bn.bias is not None:
        shift = shift + bn.bias.to(acc)
    bias = conv.bias.to(acc) if conv.bias is not None else torch.zeros_like(shift)
    if isinstance(conv, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
        # weight (C_in, C_out / groups, *k): output channel g·(C_out/groups) + j is [g-th block, j]
        groups = conv.groups
        w = weight.to(acc).reshape(groups, weight.shape[0] // groups, weight.shape[1], -1)
        w = w * scale.reshape(groups, 1, -1, 1)
    else:
        w = weight.to(acc) * scale.reshape(-1, *([1] * (weight.dim() - 1)))  # weight (C_out, ...)
    weight.copy_(w.reshape(weight.shape).to(weight.dtype))
    new_bias = (bias * scale + shift).to(weight.dtype)
    if conv.bias is None:
        conv.bias = nn.Parameter(new_bias, requires_grad=weight.requires_grad)
    else:
        conv.bias.copy_(new_bias)

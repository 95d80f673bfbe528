"""Weight Normalization (Salimans & Kingma, 2016): w = g · v / ‖v‖, a reparametrization that pickles.

    weight_norm(nn.Linear(20, 40))          # module.weight is now computed from g and v on every access
    weight_norm_init_(model, first_batch)   # the paper's data-dependent initialization
    remove_weight_norm(layer)               # back to a plain `weight` parameter with the same values

State-dict keys are those of `torch.nn.utils.parametrizations.weight_norm`, so checkpoints load strictly
in both directions:

    <prefix>parametrizations.<name>.original0    g: the weight's shape with 1 on every axis but `dim`
    <prefix>parametrizations.<name>.original1    v: the weight's shape

torch's parametrized modules refuse to pickle (their class is made on the fly and cannot be looked up by
name). Ours is made on the fly too — one subclass per module, holding a property per reparametrized
tensor — but `__reduce_ex__` rebuilds it from the original class, so pickle, `copy.deepcopy` and
`torch.save(module)` work.

``dim`` is the axis that keeps its own norm (0: one norm per output unit of Linear/Conv; 1 for the output
channels of ConvTranspose) and ``dim=None`` takes one norm over the whole tensor. Negative dims count from
the end as in Python; note that torch's weight_norm reads ``dim=-1`` as "whole tensor" instead.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from normlab._stats import stats_dtype
from normlab.registry import register_norm

__all__ = [
    "WeightNorm",
    "is_weight_normed",
    "remove_weight_norm",
    "weight_norm",
    "weight_norm_init_",
    "weight_normalized",
]

_LINEAR = (nn.Linear,)
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_TRANSPOSE = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
_LAYERS = _LINEAR + _CONV + _CONV_TRANSPOSE
_LAYER_NAMES = "Linear, Conv1d/2d/3d or ConvTranspose1d/2d/3d"


from normlab.functional.weight_norm import norm_except_dim, weight_normalized  # noqa: E402,F401

# --------------------------------------------------------------------------------------------------------
# The reparametrization: a container for g and v, and a per-module subclass with a property per tensor
# --------------------------------------------------------------------------------------------------------


class WeightNorm(nn.Module):
    """Holds g (``original0``) and v (``original1``) of one reparametrized tensor; calling it returns w.

    It lives at ``module.parametrizations[name]``, which gives torch's state-dict keys.
    """

    def __init__(self, weight: Tensor, dim: int | None = 0) -> None:
        super().__init__()
        self.dim = dim
        with torch.no_grad():
            g = norm_except_dim(weight, dim)
        self.original0 = nn.Parameter(g.detach().clone(), requires_grad=weight.requires_grad)
        self.original1 = nn.Parameter(weight.detach().clone(), requires_grad=weight.requires_grad)

    @property
    def g(self) -> nn.Parameter:
        return self.original0

    @property
    def v(self) -> nn.Parameter:
        return self.original1

    def forward(self) -> Tensor:
        return weight_normalized(self.original1, self.original0, self.dim)

    @torch.no_grad()
    def right_inverse_(self, weight: Tensor) -> None:
        """Set g and v so that the reparametrized tensor equals ``weight`` (v = weight, g = ‖weight‖)."""
        if weight.shape != self.original1.shape:
            raise ValueError(
                f"cannot assign a tensor of shape {tuple(weight.shape)} to a weight-normalized tensor of "
                f"shape {tuple(self.original1.shape)}"
            )
        self.original1.copy_(weight)
        self.original0.copy_(norm_except_dim(weight.to(self.original1.dtype), self.dim))

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


def _property(name: str) -> property:
    def get(self: nn.Module) -> Tensor:
        return self.parametrizations[name]()

    def set_(self: nn.Module, value: Tensor) -> None:
        self.parametrizations[name].right_inverse_(value)

    return property(get, set_, doc=f"{name} = g · v/‖v‖ (weight normalization)")


def _reduce_ex(self: nn.Module, protocol: int):
    # Rebuild the per-module class from the original one instead of looking it up by name.
    cls = type(self)
    return _rebuild, (cls._weight_norm_base, tuple(self.parametrizations.keys())), self.__getstate__()


def _make_class(base: type, names: Iterable[str]) -> type:
    attrs = {name: _property(name) for name in names}
    attrs.update(_weight_norm_base=base, __reduce_ex__=_reduce_ex, __module__=__name__)
    return type(f"WeightNorm{base.__name__}", (base,), attrs)


def _rebuild(base: type, names: tuple[str, ...]) -> nn.Module:
    cls = _make_class(base, names)
    return cls.__new__(cls)


def _compat_hook(module, state_dict, prefix, local_metadata, strict, missing, unexpected, errors, *, name):
    """Accept the ``<name>_g`` / ``<name>_v`` keys of the old `torch.nn.utils.weight_norm`, like torch."""
    if not is_weight_normed(module, name):
        return
    g_key, v_key = f"{prefix}{name}_g", f"{prefix}{name}_v"
    if g_key in state_dict and v_key in state_dict:
        state_dict[f"{prefix}parametrizations.{name}.original0"] = state_dict.pop(g_key)
        state_dict[f"{prefix}parametrizations.{name}.original1"] = state_dict.pop(v_key)


def is_weight_normed(module: nn.Module, name: str | None = None) -> bool:
    """Whether ``module`` has this file's weight normalization (on ``name``, or on anything when None)."""
    if getattr(type(module), "_weight_norm_base", None) is None:
        return False
    container = module._modules.get("parametrizations")
    if not isinstance(container, nn.ModuleDict):
        return False
    if name is None:
        return any(isinstance(p, WeightNorm) for p in container.values())
    return isinstance(container._modules.get(name), WeightNorm)


def _check_dim(dim: object, weight: Tensor, name: str, who: str) -> int | None:
    if dim is None:
        return None
    if not isinstance(dim, int) or isinstance(dim, bool):
        raise TypeError(f"{who}: dim must be an int or None (one norm over the whole tensor), got {dim!r}")
    ndim = weight.dim()
    if ndim == 0:
        raise ValueError(f"{who}: {name!r} is a 0-d tensor; only dim=None applies to it, got dim={dim}")
    if not -ndim <= dim < ndim:
        raise ValueError(
            f"{who}: dim must be in [{-ndim}, {ndim - 1}] for {name!r} of shape {tuple(weight.shape)} "
            f"(or None for one norm over the whole tensor), got dim={dim}"
        )
    return dim % ndim


def weight_norm(module: nn.Module, name: str = "weight", dim: int | None = 0) -> nn.Module:
    """Reparametrize ``module.<name>`` as w = g · v / ‖v‖ in place; returns ``module``.

    Args:
        module: any module holding the parameter (Linear, Conv1d/2d/3d and ConvTranspose1d/2d/3d are the
            intended ones).
        name: the parameter to reparametrize.
        dim: the axis that keeps one norm per index (0, the default, is one per output unit of
            Linear/Conv — for ConvTranspose, whose weight is (in, out/groups, ...), pass 1 for one per
            output channel); None for a single norm over the whole tensor.

    After the call ``module.<name>`` is computed from g = ``module.parametrizations.<name>.original0``
    (initialized to ‖weight‖) and v = ``...original1`` (initialized to the weight), so the module computes
    the same function as before. Create optimizers after this call: g and v are new parameters.
    """
    who = "weight_norm"
    if not isinstance(module, nn.Module):
        raise TypeError(
            f"{who} expects an nn.Module (e.g. nn.Linear or nn.Conv2d), got {type(module).__name__}"
        )
    if not isinstance(name, str):
        raise TypeError(f"{who}: name must be a str naming a parameter, got {type(name).__name__}")
    if is_weight_normed(module, name):
        raise ValueError(f"{who}: {type(module).__name__}.{name} is already weight-normalized")
    container = module._modules.get("parametrizations")
    if container is not None and not is_weight_normed(module):
        raise ValueError(
            f"{who}: {type(module).__name__} already has torch parametrizations "
            f"({list(container.keys())}); apply normlab's weight_norm to a plain module"
        )
    param = module._parameters.get(name)
    if param is None:
        if name in module._buffers:
            raise ValueError(f"{who}: {name!r} is a buffer of {type(module).__name__}, not a parameter")
        params = [n for n, p in module.named_parameters(recurse=False) if p is not None]
        raise ValueError(
            f"{who}: {type(module).__name__} has no parameter {name!r}; its parameters are {params}"
        )
    if isinstance(param, nn.parameter.UninitializedParameter):
        raise ValueError(
            f"{who}: {type(module).__name__}.{name} is uninitialized (a lazy module); run one forward "
            "pass first so that its shape is known"
        )
    dim = _check_dim(dim, param, name, who)

    if not is_weight_normed(module):
        module.__class__ = _make_class(type(module), ())
        module.parametrizations = nn.ModuleDict()
    del module._parameters[name]
    module.parametrizations[name] = WeightNorm(param, dim)
    setattr(type(module), name, _property(name))
    module.register_load_state_dict_pre_hook(functools.partial(_compat_hook, name=name))
    return module


def remove_weight_norm(module: nn.Module, name: str = "weight") -> nn.Module:
    """Undo `weight_norm`: ``module.<name>`` becomes a plain parameter holding the current g · v/‖v‖."""
    if not isinstance(module, nn.Module):
        raise TypeError(f"remove_weight_norm expects an nn.Module, got {type(module).__name__}")
    if not is_weight_normed(module, name):
        normed = [] if not is_weight_normed(module) else list(module.parametrizations.keys())
        raise ValueError(
            f"remove_weight_norm: {type(module).__name__}.{name} is not weight-normalized "
            f"(weight-normalized tensors: {normed})"
        )
    container = module.parametrizations
    with torch.no_grad():
        weight = container[name]().detach().clone()
    requires_grad = container[name].original1.requires_grad
    delattr(type(module), name)
    del container[name]
    if not len(container):
        del module.parametrizations
        module.__class__ = type(module)._weight_norm_base
    module.register_parameter(name, nn.Parameter(weight, requires_grad=requires_grad))
    return module


# --------------------------------------------------------------------------------------------------------
# Data-dependent initialization (Salimans & Kingma, 2016, §3)
# --------------------------------------------------------------------------------------------------------


def _output_dim(layer: nn.Module) -> int:
    """The weight axis that indexes output units: 0 for Linear/Conv, 1 for ConvTranspose."""
    return 1 if isinstance(layer, _CONV_TRANSPOSE) else 0


def _check_init_layer(layer: nn.Module, path: str) -> None:
    who = "weight_norm_init_"
    where = f"{path or 'module'} ({type(layer).__name__})"
    if not isinstance(layer, _LAYERS):
        raise TypeError(f"{who}: {where} is weight-normalized but is not a {_LAYER_NAMES} layer")
    wn = layer.parametrizations["weight"]
    out_dim = _output_dim(layer)
    if wn.dim != out_dim:
        raise ValueError(
            f"{who}: {where} has weight norm over dim={wn.dim}; the initialization sets one g per output "
            f"unit, which needs dim={out_dim}"
        )
    if isinstance(layer, _CONV_TRANSPOSE) and layer.groups != 1:
        raise ValueError(
            f"{who}: {where} has groups={layer.groups}; with groups > 1 a ConvTranspose weight has no axis "
            "with one entry per output channel, so g cannot be set per output unit"
        )
    if layer.bias is None:
        raise ValueError(f"{who}: {where} has no bias, which the initialization needs to zero the mean")


@torch.no_grad()
def _init_layer(layer: nn.Module, x: Tensor, init_scale: float, eps: float) -> None:
    g, bias = layer.parametrizations["weight"].original0, layer.bias
    g.fill_(1.0)  # w = v/‖v‖
    bias.zero_()
    t = layer.forward(x)  # t = v·x/‖v‖ (forward, not __call__: no hooks, ours included)
    channel_axis = -1 if isinstance(layer, _LINEAR) else 1
    t = t.movedim(channel_axis, 0).reshape(t.shape[channel_axis], -1).to(stats_dtype(t.dtype))  # (C_out, m)
    mean = t.mean(dim=1)  # (C_out,)
    scale = init_scale * torch.rsqrt(t.var(dim=1, unbiased=False) + eps)  # (C_out,)
    g.copy_(scale.reshape(g.shape))  # g ← scale/σ[t]
    bias.copy_(-mean * scale)  # b ← −μ[t]·scale/σ[t]


def weight_norm_init_(module: nn.Module, *inputs, init_scale: float = 1.0, eps: float = 1e-5):
    """The paper's data-dependent initialization, in place; returns ``module(*inputs)`` after it.

    Runs one forward pass over a first batch. Each weight-normalized Linear/Conv/ConvTranspose layer in
    ``module`` (``module`` itself included), in the order the forward pass reaches it, computes its
    pre-activations t = v·x/‖v‖ on its actual input and sets

        g ← init_scale / sqrt(Var[t] + eps),   b ← −E[t] · init_scale / sqrt(Var[t] + eps)

    (biased variance, statistics per output unit over the batch and spatial positions), so its
    pre-activations on that batch have zero mean and variance init_scale² per output unit; later layers see
    the initialized earlier ones. v keeps its direction. The layers need ``dim`` = the output axis
    (0, or 1 for ConvTranspose with groups=1) and a bias. A layer the forward pass calls twice is
    initialized on its first call. Other layers (e.g. mean-only batch norm in training mode) run as usual.
    """
    who = "weight_norm_init_"
    if not isinstance(module, nn.Module):
        raise TypeError(f"{who} expects an nn.Module, got {type(module).__name__}")
    if not inputs:
        raise ValueError(f"{who} needs a first batch: weight_norm_init_(module, batch)")
    layers = {path: m for path, m in module.named_modules() if is_weight_normed(m, "weight")}
    if not layers:
        raise ValueError(
            f"{who}: {type(module).__name__} contains no weight-normalized weight; apply weight_norm first"
        )
    for path, layer in layers.items():
        _check_init_layer(layer, path)

    done: set[int] = set()

    def hook(layer: nn.Module, args: tuple) -> None:
        if id(layer) not in done:
            _init_layer(layer, args[0], init_scale, eps)
            done.add(id(layer))

    handles = [layer.register_forward_pre_hook(hook) for layer in layers.values()]
    try:
        with torch.no_grad():
            out = module(*inputs)
    finally:
        for handle in handles:
            handle.remove()
    missed = [path or "module" for path, layer in layers.items() if id(layer) not in done]
    if missed:
        raise ValueError(f"{who}: the forward pass never reached {missed}, so they were not initialized")
    return out


# --------------------------------------------------------------------------------------------------------
# Registry: wrap_layer("wn", layer)
# --------------------------------------------------------------------------------------------------------

_OUTPUT_AXIS = object()


@register_norm("wn", "weight_norm", kind="weight")
def _make_weight_norm(layer: nn.Module, *, dim=_OUTPUT_AXIS, name: str = "weight") -> nn.Module:
    """``wrap_layer("wn", layer)``: weight-normalize a Linear/Conv/ConvTranspose layer in place.

    By default one norm per output unit (dim=0, or dim=1 for ConvTranspose), which is what the
    data-dependent initialization needs.
    """
    if not isinstance(layer, _LAYERS):
        raise TypeError(f"wrap_layer('wn', layer) expects a {_LAYER_NAMES} layer, got {type(layer).__name__}")
    return weight_norm(layer, name=name, dim=_output_dim(layer) if dim is _OUTPUT_AXIS else dim)

"""Rewrite an existing model's normalization: swap methods, synchronize BN, freeze BN.

    convert(model, "gn")                  every norm layer (torch.nn's or normlab's) -> GroupNorm
    convert_sync_batchnorm(model)         BN -> SyncBatchNorm, SN -> SyncSwitchNorm
    revert_sync_batchnorm(model)          ... and back (torch converts one way only)
    freeze_bn(model) / unfreeze_bn(model) BN uses its running statistics and stops updating them
    (fold_bn, for inference, lives in normlab.fold)

Every function works in place on nested models and returns the model (a new module only when the model
itself is a norm layer, so use the return value). New layers keep the old one's device, dtype and
train/eval mode. What carries over, where it means the same thing:

- affine weight and bias (per channel in BN, IN, GN, SN: γ and β of SPEC §1's y = γ x̂ + β);
- running statistics between layers whose running statistics are BN's — BN, SyncBN, frozen BN, SN (its BN
  source) — unless one side uses SN's ``authors_compat`` storage;
- everything (a strict state_dict) between a layer and its synchronized or frozen twin;
- eps, affine, bias; momentum and track_running_stats between BN-like layers.

Channels-first norms only: torch.nn.LayerNorm and normlab.LayerNorm normalize trailing dims with an
elementwise affine (transformers), so no channels-first method replaces them; they are left as they are.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab.distributed import SyncBatchNorm, SyncSwitchNorm
from normlab.nn import batch_norm as _nl_bn
from normlab.nn import group_norm as _nl_gn
from normlab.nn import instance_norm as _nl_in
from normlab.nn import switch_norm as _nl_sn
from normlab.registry import canonical_name, create_norm

try:  # mean-only BN (Weight Normalization's companion) is optional here
    from normlab.nn.mean_only_batch_norm import _MeanOnlyBatchNorm
except ImportError:  # pragma: no cover
    _MeanOnlyBatchNorm = ()

__all__ = [
    "FrozenBatchNorm",
    "convert",
    "convert_sync_batchnorm",
    "freeze_bn",
    "revert_sync_batchnorm",
    "unfreeze_bn",
]

# Layer kinds (`NormInfo.kind`); SOURCE_KINDS is what ``convert(..., only=...)`` accepts.
SOURCE_KINDS = ("bn", "sync_bn", "frozen_bn", "mobn", "in", "gn", "sn", "sync_sn")
_SYNC_NAMES = {"sync_bn": "sync_bn", "syncbn": "sync_bn", "sync_batch_norm": "sync_bn",
               "sync_sn": "sync_sn", "syncsn": "sync_sn", "sync_switch_norm": "sync_sn"}
_DIM_FREE = ("gn", "ln", "none", "sync_bn")  # targets that do not depend on the input's spatial dims
_BN_LIKE = ("bn", "sync_bn", "frozen_bn", "mobn", "sn", "sync_sn")  # with BN's running statistics
_ORIGIN = "_normlab_origin"  # attribute of a synchronized or frozen layer: the `Origin` of what it replaced
_TWINS = ({"bn", "sync_bn", "frozen_bn"}, {"sn", "sync_sn"})  # same state_dict, same meaning


class FrozenBatchNorm(nn.Module):
    """Batch Norm with frozen statistics: y = (x − running_mean) / sqrt(running_var + eps) · weight + bias
    in training and eval alike; the running statistics are never updated.

    The state_dict has BN's keys (weight, bias, running_mean, running_var, num_batches_tracked), so BN
    checkpoints load into it and back. ``weight``/``bias`` stay parameters: `freeze_bn` sets their
    ``requires_grad`` (frozen by default). Input (N, C, *spatial). Build it with `freeze_bn`.
    """

    def __init__(self, num_features: int, eps: float = 1e-5, affine: bool = True, device=None, dtype=None,
                 *, bias: bool = True) -> None:
        super().__init__()
        factory = {"device": device, "dtype": dtype}
        self.num_features, self.eps, self.affine = num_features, eps, affine
        self.weight = nn.Parameter(torch.ones(num_features, **factory)) if affine else None
        self.bias = nn.Parameter(torch.zeros(num_features, **factory)) if affine and bias else None
        self.register_buffer("running_mean", torch.zeros(num_features, **factory))
        self.register_buffer("running_var", torch.ones(num_features, **factory))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def forward(self, input: Tensor) -> Tensor:
        return F.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                            0.0, self.eps)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}, affine={self.affine}, bias={self.bias is not None}"


# ---------------------------------------------------------------- reading any norm layer


@dataclass
class Origin:
    """How to rebuild the layer that a synchronized or frozen layer replaced (a plain attribute of it, so
    it survives copy.deepcopy and pickling, not state_dict)."""

    cls: type
    options: dict  # constructor keywords beyond (num_features, eps, affine, bias): momentum, process_group
    requires_grad: dict[str, bool]
    origin: Origin | None  # what that layer had itself replaced


def _origin_of(module: nn.Module) -> Origin:
    options = {name: getattr(module, name) for name in ("momentum", "process_group") if hasattr(module, name)}
    requires_grad = {name: p.requires_grad for name, p in module.named_parameters(recurse=False)}
    return Origin(type(module), options, requires_grad, getattr(module, _ORIGIN, None))


def _origins(module: nn.Module) -> Iterator[Origin]:
    origin = getattr(module, _ORIGIN, None)
    while origin is not None:
        yield origin
        origin = origin.origin


def _rebuild(origin: Origin, module: nn.Module, info: NormInfo, **overrides) -> nn.Module:
    """``origin``'s layer with ``module``'s channels, eps, affine and bias (and ``overrides``)."""
    options = {"eps": info.eps, "affine": info.affine, **origin.options, **overrides}
    if info.affine and not info.bias:
        options["bias"] = False
    accepted = set(inspect.signature(origin.cls.__init__).parameters)
    new = origin.cls(info.num_channels, **{k: v for k, v in options.items() if k in accepted})
    if origin.origin is not None:
        setattr(new, _ORIGIN, origin.origin)
    return new


@dataclass
class NormInfo:
    """A norm layer read uniformly: its kind, channels, spatial dims (None when its class does not fix
    them) and the settings that carry over."""

    kind: str
    num_channels: int
    dim: int | None
    eps: float
    affine: bool
    bias: bool
    momentum: float | None = None
    track_running_stats: bool = False
    authors_compat: bool = False
    using_bn: bool = True


def _dim_of(module: nn.Module) -> int | None:
    """Spatial dims fixed by the class (BatchNorm2d: 2, SwitchNorm1d: 1) or by the class of the layer it
    replaced; None for GroupNorm & co."""
    if isinstance(module, SyncSwitchNorm):
        return module.dim
    for cls in (type(module), *(origin.cls for origin in _origins(module))):
        for suffix, dim in (("1d", 1), ("2d", 2), ("3d", 3)):
            if cls.__name__.endswith(suffix):
                return dim
    return None


def describe(module: nn.Module) -> NormInfo | None:
    """`NormInfo` for a channels-first norm layer of torch.nn or normlab; None for anything else."""
    kind = _kind(module)
    if kind is None:
        return None
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    channels = getattr(module, "num_features", None) or getattr(module, "num_channels", None)
    return NormInfo(
        kind=kind,
        num_channels=int(channels),
        dim=_dim_of(module),
        eps=float(getattr(module, "eps", 1e-5)),  # mean-only BN has none
        affine=weight is not None or bias is not None,
        bias=bias is not None,
        momentum=getattr(module, "momentum", None),
        track_running_stats=getattr(module, "running_mean", None) is not None,
        authors_compat=bool(getattr(module, "authors_compat", False)),
        using_bn="bn" in getattr(module, "sources", ("bn",)),
    )


def _kind(module: nn.Module) -> str | None:
    return _kind_of_class(type(module))


def _kind_of_class(cls: type) -> str | None:
    if issubclass(cls, nn.modules.lazy.LazyModuleMixin):  # not built yet: nothing to read
        return None
    if issubclass(cls, (nn.SyncBatchNorm, SyncBatchNorm)):
        return "sync_bn"
    if issubclass(cls, FrozenBatchNorm):
        return "frozen_bn"
    if issubclass(cls, SyncSwitchNorm):
        return "sync_sn"
    if issubclass(cls, (nn.modules.batchnorm._BatchNorm, _nl_bn._BatchNorm)):
        return "bn"
    if issubclass(cls, (nn.modules.instancenorm._InstanceNorm, _nl_in._InstanceNorm)):
        return "in"
    if issubclass(cls, _MeanOnlyBatchNorm):
        return "mobn"
    if issubclass(cls, (nn.GroupNorm, _nl_gn.GroupNorm)):
        return "gn"
    if issubclass(cls, _nl_sn._SwitchNorm):
        return "sn"
    return None


# ---------------------------------------------------------------- convert


def convert(
    model: nn.Module,
    to: str | Callable[..., nn.Module],
    *,
    only: str | Iterable[str] | None = None,
    dim: int | None = None,
    **kwargs,
) -> nn.Module:
    """Replace every channels-first normalization layer of ``model`` by method ``to``; returns the model.

    ``to``: a name `normlab.create_norm` knows ("bn", "gn", "ln", "in", "sn", "none", aliases, registered
    methods), "sync_bn" / "sync_sn" (`normlab.distributed`), or a factory called ``to(num_channels,
    **kwargs)`` like `create_norm` calls one. ``kwargs`` go to the new layers (``groups=`` for GN — an int,
    or a function of the channel count such as ``lambda c: math.gcd(c, 32)`` —, ``process_group=`` for the
    synchronized ones, ...) and override what carries over (see the module docstring).

    ``only``: the kinds of layer to replace, among SOURCE_KINDS ("bn", "sync_bn", "frozen_bn", "mobn" for
    mean-only BN, "in", "gn", "sn", "sync_sn"); all of them by default. ``dim``: the input's spatial dims,
    for layers whose class does not record them (GroupNorm, SyncBatchNorm) when the new method depends on
    them (BN, IN, SN).
    """
    kinds = _check_only(only)
    target = _target_name(to)
    memo: dict[int, nn.Module] = {}

    def replace(module: nn.Module, path: str) -> nn.Module:
        info = describe(module)
        if info is None or info.kind not in kinds:
            return module
        if id(module) not in memo:  # a layer used at several places stays one layer
            memo[id(module)] = _build(module, info, to, target, dim, kwargs, path)
        return memo[id(module)]

    return _map_modules(model, replace)


def _check_only(only) -> set[str]:
    if only is None:
        return set(SOURCE_KINDS)
    kinds = {only} if isinstance(only, str) else set(only)
    unknown = kinds - set(SOURCE_KINDS)
    if unknown:
        raise ValueError(f"convert: only= takes kinds among {SOURCE_KINDS}, got {sorted(unknown)}")
    return kinds


def _target_name(to) -> str | None:
    """The canonical target name, or None for a factory."""
    if isinstance(to, str):
        key = to.lower().replace("-", "_")
        return _SYNC_NAMES.get(key) or canonical_name(key)
    if callable(to):
        return None
    raise TypeError(f"convert: to= must be a method name or a factory, got {type(to).__name__}")


def _map_modules(model: nn.Module, fn: Callable[[nn.Module, str], nn.Module], path: str = "") -> nn.Module:
    """Apply ``fn`` to ``model`` and, where it keeps a module, to its children, replacing them in place."""
    new = fn(model, path)
    if new is not model:
        return new
    for name, child in list(model.named_children()):
        replaced = _map_modules(child, fn, f"{path}.{name}" if path else name)
        if replaced is not child:
            setattr(model, name, replaced)
    return model


def _build(old: nn.Module, info: NormInfo, to, target: str | None, dim: int | None, kwargs: dict,
           path: str) -> nn.Module:
    where = path or type(old).__name__
    dim = dim if info.dim is None else info.dim  # dim= is for layers whose class does not record it
    if target is not None and target not in _DIM_FREE and dim is None:
        raise ValueError(
            f"convert: {where} is a {type(old).__name__}, which does not record the spatial dims of its "
            f"input, and {target!r} depends on them; pass dim= (1 for (N, C, L), 2 for (N, C, H, W), 3 for "
            "(N, C, D, H, W))"
        )
    options = {**_carried(info, target), **kwargs}
    if callable(options.get("groups")):
        options["groups"] = options["groups"](info.num_channels)
    local_bn = next((o for o in _origins(old) if _kind_of_class(o.cls) == "bn"), None)
    if target == "sync_bn":
        new = SyncBatchNorm(info.num_channels, **options)
    elif target == "sync_sn":
        new = SyncSwitchNorm(info.num_channels, dim=dim, **options)
    elif target == "bn" and local_bn is not None:  # back to the very class the layer replaced
        new = _rebuild(local_bn, old, info, **options)
    else:
        new = create_norm(target or to, info.num_channels, dim=2 if dim is None else dim, **options)
    if info.kind in ("bn", "sn") and target in ("sync_bn", "sync_sn"):
        setattr(new, _ORIGIN, _origin_of(old))  # so revert_sync_batchnorm restores the very class
    _to_like(new, old)
    _carry_state(old, info, new)
    return new.train(old.training)


_FEATURE_SETTINGS = ("eps", "affine", "bias")
_BN_SETTINGS = (*_FEATURE_SETTINGS, "momentum", "track_running_stats")
_SETTINGS = {  # what each builtin target takes over from the layer it replaces
    "bn": _BN_SETTINGS,
    "sync_bn": _BN_SETTINGS,
    "gn": _FEATURE_SETTINGS,
    "ln": _FEATURE_SETTINGS,
    "in": _FEATURE_SETTINGS,
    "sn": ("eps", "affine", "momentum", "track_running_stats", "authors_compat", "using_bn"),
    "sync_sn": ("eps", "affine", "momentum", "track_running_stats", "authors_compat", "using_bn"),
    "mobn": ("affine", "momentum", "track_running_stats"),  # its affine is a bias alone
}


def _carried(info: NormInfo, target: str | None) -> dict:
    """Settings that mean the same in the new layer (builtin targets only: a factory gets just kwargs)."""
    out: dict = {}
    for key in _SETTINGS.get(target, ()):
        if key == "bias":
            if info.affine and not info.bias:
                out["bias"] = False
        elif key in ("momentum", "track_running_stats"):
            if info.kind in _BN_LIKE and not (key == "momentum" and info.kind == "frozen_bn"):
                out[key] = getattr(info, key)
        elif key in ("authors_compat", "using_bn"):
            if info.kind in ("sn", "sync_sn"):
                out[key] = getattr(info, key)
        else:
            out[key] = getattr(info, key)
    return out


def _to_like(new: nn.Module, old: nn.Module) -> None:
    """Move ``new`` to the device and floating dtype of ``old``'s tensors."""
    tensor = next((t for t in (*old.parameters(), *old.buffers()) if t.is_floating_point()), None)
    if tensor is not None:
        new.to(device=tensor.device, dtype=tensor.dtype)


@torch.no_grad()
def _carry_state(old: nn.Module, info: NormInfo, new: nn.Module) -> None:
    new_info = describe(new)
    if new_info is None:
        return
    if any(info.kind in twins and new_info.kind in twins for twins in _TWINS):
        old_state, new_state = old.state_dict(), new.state_dict()
        if {k: v.shape for k, v in old_state.items()} == {k: v.shape for k, v in new_state.items()}:
            new.load_state_dict(old_state)
            _carry_requires_grad(old, new)
            return
    for name in ("weight", "bias"):
        _copy(getattr(old, name, None), getattr(new, name, None))
    _carry_requires_grad(old, new)
    same_running = (
        info.kind in _BN_LIKE and new_info.kind in _BN_LIKE and not info.authors_compat
        and not new_info.authors_compat
    )
    if same_running:
        for name in ("running_mean", "running_var", "num_batches_tracked"):
            _copy(getattr(old, name, None), getattr(new, name, None))


def _copy(src: Tensor | None, dst: Tensor | None) -> None:
    if src is not None and dst is not None and src.numel() == dst.numel():
        dst.copy_(src.reshape(dst.shape))


def _carry_requires_grad(old: nn.Module, new: nn.Module) -> None:
    """Parameters with the same name keep whether they learn (a frozen γ stays frozen)."""
    old_params = dict(old.named_parameters(recurse=False))
    for name, param in new.named_parameters(recurse=False):
        if name in old_params:
            param.requires_grad_(old_params[name].requires_grad)


# ---------------------------------------------------------------- BN <-> SyncBN


def convert_sync_batchnorm(model: nn.Module, process_group=None, *, switch_norm: bool = True) -> nn.Module:
    """BN layers (torch.nn's or normlab's) -> `normlab.distributed.SyncBatchNorm`, and with ``switch_norm``
    SN layers -> `SyncSwitchNorm`, with their full state; `revert_sync_batchnorm` undoes it exactly.

    ``process_group``: the group whose processes share statistics (None: the default group).
    """
    model = convert(model, "sync_bn", only="bn", process_group=process_group)
    if switch_norm:
        model = convert(model, "sync_sn", only="sn", process_group=process_group)
    return model


def revert_sync_batchnorm(model: nn.Module, *, dim: int | None = None) -> nn.Module:
    """SyncBatchNorm layers (normlab's or torch.nn's) -> local BN, SyncSwitchNorm -> SwitchNorm, state kept.

    A layer made by `convert_sync_batchnorm` gets its original class back; another (a torch.nn
    SyncBatchNorm, which does not record its input's dims) becomes normlab's BatchNorm{dim}d.
    """
    model = convert(model, "bn", only="sync_bn", dim=dim)
    return convert(model, "sn", only="sync_sn")


# ---------------------------------------------------------------- freeze


def freeze_bn(model: nn.Module, *, affine: bool = True) -> nn.Module:
    """Every BN layer (local or synchronized, torch.nn's or normlab's) -> `FrozenBatchNorm`: in training as
    in eval it normalizes with its running statistics and never updates them. With ``affine`` the weight
    and bias stop learning too (``requires_grad=False``). `unfreeze_bn` restores the layers.
    """

    def freeze(module: nn.Module, path: str) -> nn.Module:
        info = describe(module)
        if info is None or info.kind not in ("bn", "sync_bn"):
            return module
        if not info.track_running_stats:
            raise ValueError(
                f"freeze_bn: {path or type(module).__name__} has no running statistics to freeze "
                "(track_running_stats=False); leave it out, e.g. convert(..., only=...) on a submodule"
            )
        frozen = FrozenBatchNorm(info.num_channels, info.eps, info.affine, bias=info.bias)
        _to_like(frozen, module)
        frozen.load_state_dict(module.state_dict())
        setattr(frozen, _ORIGIN, _origin_of(module))
        for p in frozen.parameters():
            p.requires_grad_(not affine and p.requires_grad)
        return frozen.train(module.training)

    return _map_modules(model, freeze)


def unfreeze_bn(model: nn.Module, *, dim: int | None = None) -> nn.Module:
    """Every `FrozenBatchNorm` -> the BN layer it replaced: same class, state, momentum, requires_grad
    (and process group). ``dim`` picks normlab's BatchNorm{dim}d for a frozen layer `freeze_bn` did not make.
    """

    def unfreeze(module: nn.Module, path: str) -> nn.Module:
        if not isinstance(module, FrozenBatchNorm):
            return module
        origin = getattr(module, _ORIGIN, None)
        if origin is None:
            if dim not in _nl_bn.BATCH_NORMS:
                raise ValueError(
                    f"unfreeze_bn: {path or 'the model'} is a FrozenBatchNorm that freeze_bn did not make, "
                    "so its BN class is unknown; pass dim= (1, 2 or 3) for normlab's BatchNorm{dim}d, "
                    f"got dim={dim!r}"
                )
            origin = Origin(_nl_bn.BATCH_NORMS[dim], {}, {}, None)
        new = _rebuild(origin, module, describe(module))
        _to_like(new, module)
        new.load_state_dict(module.state_dict())
        for name, p in new.named_parameters():
            p.requires_grad_(origin.requires_grad.get(name, True))
        return new.train(module.training)

    return _map_modules(model, unfreeze)

"""Build any normalization layer by name, channel count first (timm's `get_norm_layer` idea).

    create_norm("gn", 64, groups=32)      -> GroupNorm(32, 64)
    create_norm("bn", 64, dim=1)          -> BatchNorm1d(64)
    create_norm(functools.partial(...), 64)

Two kinds of method live here:

- ``kind="feature"`` (bn, ln, in, gn, sn, none): a layer placed after a convolution or linear layer. Its
  factory is called as ``factory(num_channels, dim=dim, **kwargs)`` where ``dim`` is the number of spatial
  dimensions of the input (1, 2 or 3; 0 for (N, C) inputs where that makes sense).
- ``kind="weight"`` (wn, cosine): a method that changes the convolution or linear layer itself. Its factory
  is called as ``factory(layer, **kwargs)`` and returns the layer to use in its place; build it with
  `wrap_layer`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

from torch import nn

NormFactory = Callable[..., nn.Module]

_FACTORIES: dict[str, NormFactory] = {}
_KINDS: dict[str, str] = {}
_ALIASES: dict[str, str] = {}


def register_norm(name: str, *aliases: str, kind: str = "feature") -> Callable[[NormFactory], NormFactory]:
    """Decorator: register a factory under ``name`` and its aliases (see the module docstring for kinds)."""
    if kind not in ("feature", "weight"):
        raise ValueError(f"kind must be 'feature' or 'weight', got {kind!r}")

    def decorate(factory: NormFactory) -> NormFactory:
        for key in (name, *aliases):
            key = key.lower()
            if key in _ALIASES and _ALIASES[key] != name:
                raise ValueError(f"norm name {key!r} is already registered for {_ALIASES[key]!r}")
            _ALIASES[key] = name
        _FACTORIES[name] = factory
        _KINDS[name] = kind
        return factory

    return decorate


def list_norms() -> list[str]:
    """Canonical names of every registered method (aliases are accepted by `create_norm` too)."""
    _load_builtin_norms()
    return sorted(_FACTORIES)


def canonical_name(name: str) -> str:
    """The canonical name for ``name`` or one of its aliases."""
    _load_builtin_norms()
    key = name.lower().replace("-", "_")
    if key not in _ALIASES:
        raise ValueError(f"unknown norm {name!r}; expected one of {list_norms()} (or an alias of one)")
    return _ALIASES[key]


def norm_kind(name: str) -> str:
    """'feature' for a layer placed after conv/linear, 'weight' for one that rewrites the conv/linear."""
    return _KINDS[canonical_name(name)]


def get_norm_factory(name: str) -> NormFactory:
    """The factory registered under ``name`` (or one of its aliases)."""
    return _FACTORIES[canonical_name(name)]


def wrap_layer(name: str, layer: nn.Module, **kwargs) -> nn.Module:
    """Apply a weight-side method (``kind="weight"``) to a Linear/Conv layer; returns the layer to use."""
    if norm_kind(name) != "weight":
        raise ValueError(
            f"{name!r} is a feature normalization: build it with create_norm({name!r}, num_channels) "
            "and place it after the layer instead"
        )
    return get_norm_factory(name)(layer, **kwargs)


def create_norm(
    name: str | NormFactory, num_channels: int, *, dim: int = 2, **kwargs
) -> nn.Module:
    """Create a normalization layer by name (or from a class / ``functools.partial``), channels first."""
    if isinstance(name, str):
        if norm_kind(name) != "feature":
            raise ValueError(
                f"{name!r} normalizes a layer's weights, not features: use wrap_layer({name!r}, layer)"
            )
        return get_norm_factory(name)(num_channels, dim=dim, **kwargs)
    if callable(name):
        if isinstance(name, functools.partial) or isinstance(name, type):
            return name(num_channels, **kwargs)
        return name(num_channels, dim=dim, **kwargs)
    raise TypeError(f"create_norm expects a registered name or a callable, got {type(name).__name__}")


def _load_builtin_norms() -> None:
    # Importing the layer packages runs their @register_norm decorators.
    from normlab import nn as _nn  # noqa: F401


@register_norm("none", "identity")
def _make_identity(num_channels: int, dim: int = 2, **kwargs) -> nn.Module:
    """No normalization (the study's baseline)."""
    return nn.Identity()

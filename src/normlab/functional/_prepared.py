"""Calls prepared once per geometry.

A training loop calls each norm with the same geometry at every step, and a small call (the study's batch of 2)
costs little more than its Python overhead. So what a feature-norm call decides from its arguments' geometry
alone — the input checks, the view, the spec, the backend and that backend's plan — is worked out by a
``prepare`` function once and kept, keyed by that geometry; later calls look it up (about a microsecond) and run
it. The key holds the input's type, shape, strides, dtype and device, the types and shapes of the other tensor
arguments (parameters, running statistics: the checks read nothing else of them, and the kernels take any dtype
and layout of them) and the values of the rest.
Nothing is cached while torch.compile traces (its graph holds the checks once anyway).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

MAX_PREPARED = 4096  # then the cache starts over (a program that keeps changing shapes pays the checks again)
_prepared: dict[tuple, Callable] = {}
_compiling = torch.compiler.is_compiling


_PLAIN = frozenset((int, float, bool, str, tuple, type(None)))


def _shape_or_value(arg):
    if type(arg) in _PLAIN:  # (first: isinstance(·, Tensor) of anything else runs Tensor's metaclass check, ~0.3 µs)
        return arg
    if isinstance(arg, Tensor):
        return type(arg), arg.shape
    return tuple(arg) if isinstance(arg, list) else arg  # (a normalized_shape given as a list)


def prepared(prepare: Callable[..., Callable], input, weight, bias, *rest) -> Callable:
    """``prepare(input, weight, bias, *rest)``, from the cache when a call of the same geometry was prepared
    before. ``prepare`` runs the call's checks (raising for bad input, which is therefore never cached) and
    returns its run function. The key holds the thread count too: backends plan their work for it."""
    if _compiling() or not isinstance(input, Tensor):
        return prepare(input, weight, bias, *rest)
    try:  # (weight and bias written out: a per-argument function call costs as much as the rest of the key)
        key = (prepare, torch.get_num_threads(), type(input), input.shape, input.stride(), input.dtype, input.device,
               None if weight is None else (type(weight), weight.shape),
               None if bias is None else (type(bias), bias.shape), *map(_shape_or_value, rest))
        run = _prepared.get(key)
    except (AttributeError, TypeError):  # a parameter that is no tensor, an unhashable argument: ``prepare`` says
        return prepare(input, weight, bias, *rest)
    if run is None:
        run = prepare(input, weight, bias, *rest)
        if len(_prepared) >= MAX_PREPARED:
            _prepared.clear()
        _prepared[key] = run
    return run


def clear_prepared() -> None:
    """Forget every prepared call (after changing a backend's thresholds, as the tests do)."""
    _prepared.clear()

"""Kernels: interchangeable backends behind one autograd contract (see `contract`).

``backend="auto"`` (the default everywhere) takes the first registered fast backend that supports the call
and falls back to the portable ``"torch"`` backend; naming a backend chooses it explicitly and fails with a
clear error if it cannot run the call. Optional backends register themselves here if their imports work.
"""

from __future__ import annotations

import importlib.util

from torch import Tensor

from normlab.kernels import torch_backend
from normlab.kernels.contract import Backend, NormSpec, SwitchSpec

_BACKENDS: dict[str, Backend] = {"torch": torch_backend}
_AUTO_ORDER: list[str] = []  # tried in order before "torch" when the backend is "auto"


def register_backend(backend: Backend, *, auto: bool = True) -> None:
    """Make ``backend`` selectable by its name (and, with ``auto``, preferred over the torch backend)."""
    _BACKENDS[backend.name] = backend
    if auto and backend.name not in _AUTO_ORDER:
        _AUTO_ORDER.append(backend.name)


def available_backends() -> list[str]:
    return sorted(_BACKENDS)


def _supports(backend: Backend, xv: Tensor, spec: NormSpec | SwitchSpec) -> bool:
    if isinstance(spec, SwitchSpec):
        check = getattr(backend, "supports_switch", None)
        return check is not None and check(xv, spec)
    return backend.supports(xv, spec)


def _auto_ok(backend: Backend, xv: Tensor) -> bool:
    """A backend may run some calls only when named (Triton's CPU interpreter, for tests): ``auto_ok``."""
    check = getattr(backend, "auto_ok", None)
    return check is None or check(xv)


def select_backend(requested: str | None, xv: Tensor, spec: NormSpec | SwitchSpec) -> Backend:
    """The backend that runs this call: ``requested`` by name, or the first that supports it."""
    if requested is None or requested == "auto":
        for name in _AUTO_ORDER:
            if _auto_ok(_BACKENDS[name], xv) and _supports(_BACKENDS[name], xv, spec):
                return _BACKENDS[name]
        return torch_backend
    if requested not in _BACKENDS:
        raise ValueError(f"unknown backend {requested!r}; expected 'auto' or one of {available_backends()}")
    backend = _BACKENDS[requested]
    if not _supports(backend, xv, spec):
        raise ValueError(
            f"backend {requested!r} cannot run this call (input {tuple(xv.shape)}, {xv.dtype}, "
            f"{xv.device.type}); use backend='auto' to fall back to one that can"
        )
    return backend


__all__ = ["NormSpec", "SwitchSpec", "available_backends", "register_backend", "select_backend"]

# Triton kernels for CUDA tensors (see triton_backend; its kernel modules, and Triton, load on first use).
if importlib.util.find_spec("triton") is not None:
    from normlab.kernels import triton_backend

    register_backend(triton_backend)

# CPU tensors: normlab's own kernels (see native_backend; built on first use), then ATen's fused kernels for
# what they do not take (see cpu_backend); other calls fall through to "torch".
from normlab.kernels import cpu_backend, native_backend  # noqa: E402

register_backend(native_backend)
register_backend(cpu_backend)

"""The Triton backend: normlab's own GPU kernels behind the contract of `normlab.kernels.contract`.

    backend="auto"    picks this backend for CUDA tensors (float32, float16, bfloat16) when Triton imports;
                      everything else — CPU tensors, float64 — falls back to the torch backend.
    backend="triton"  asks for it by name. On a CPU tensor that works only under Triton's interpreter
                      (environment TRITON_INTERPRET=1, set before the first call): slow, for tests.
                      `auto_ok` keeps ``"auto"`` from ever choosing the interpreter.

Which kernels run (each file documents its design):

    GN, IN, LN of a feature map (G = C, G = 1)   triton_group_norm  (set kernels, or the shared stages)
    BN with batch statistics                     triton_batch_norm  (two-stage reduction, then apply)
    LayerNorm over trailing dims                 triton_layer_norm  (register-resident rows)
    Switchable Norm                              triton_switch_norm (per-(n, c) moments, mixed)
    shared passes over the input                 triton_feature     (+ the launch heuristics, `TUNING`)

Statistics are float32; gradients of the affine parameters come back float32 and the autograd Function
casts them. The kernel modules are imported on first use, so the interpreter switch is read then, not when
normlab is imported. Forward and backward accept an extra ``activation`` ("relu", "silu" or None) for the
fused GN/BN + activation of `normlab.kernels.fused`; the backward then also needs ``bias``.

Verified under the Triton interpreter (tests/test_triton_kernels.py) and by compiling every kernel for
sm_90; bandwidth on an H100 is still to be measured with ``normlab bench`` (see `triton_feature.Tuning`).
"""

from __future__ import annotations

import contextlib
import os

import torch
from torch import Tensor

from normlab.kernels.contract import NormSpec, SwitchSpec

name = "triton"
supports_activation = True  # forward/backward take ``activation`` (see normlab.kernels.fused)

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _runs_on(xv: Tensor) -> bool:
    if xv.dtype not in _DTYPES or xv.numel() == 0:
        return False
    return xv.is_cuda or (xv.device.type == "cpu" and _interpreting())


def auto_ok(xv: Tensor) -> bool:
    """Whether ``backend="auto"`` may choose this backend: CUDA tensors only, never the CPU interpreter."""
    return xv.is_cuda


def _kind(xv: Tensor, spec: NormSpec) -> str | None:
    if spec.view is None:
        return "ln" if xv.dim() == 2 and tuple(spec.dims) == (1,) else None
    if xv.dim() != 4:
        return None
    if tuple(spec.dims) == spec.view.group_dims:
        return "gn"
    if tuple(spec.dims) == spec.view.batch_dims:
        return "bn"
    return None


def supports(xv: Tensor, spec: NormSpec) -> bool:
    return _runs_on(xv) and _kind(xv, spec) is not None


def supports_switch(xv: Tensor, spec: SwitchSpec) -> bool:
    return _runs_on(xv) and xv.dim() == 4


def _device(xv: Tensor):
    return torch.cuda.device(xv.device) if xv.is_cuda else contextlib.nullcontext()


def _flat(param: Tensor | None) -> Tensor | None:
    return None if param is None else param.reshape(-1).contiguous()


def _stat_shape(xv: Tensor, dims) -> tuple[int, ...]:
    return tuple(1 if d in dims else size for d, size in enumerate(xv.shape))


def _activation_code(activation: str | None, kind: str) -> int:
    from normlab.kernels.triton_feature import ACTIVATIONS

    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {list(ACTIVATIONS)}, got {activation!r}")
    if activation is not None and kind == "ln":
        raise ValueError("the Triton backend fuses activations into GN and BN only, not LayerNorm")
    return ACTIVATIONS[activation]


# ---------------------------------------------------------------- BN, LN, IN, GN


def forward(xv: Tensor, weight, bias, spec: NormSpec, eps: float, activation: str | None = None):
    from normlab.kernels import triton_batch_norm, triton_group_norm, triton_layer_norm

    kind = _kind(xv, spec)
    act = _activation_code(activation, kind)
    x, w, b = xv.contiguous(), _flat(weight), _flat(bias)
    with _device(xv):
        if kind == "ln":
            yv, mean, var = triton_layer_norm.forward(x, w, b, eps)
        elif kind == "gn":
            yv, mean, var = triton_group_norm.forward(x, w, b, spec.view, eps, act)
        else:
            yv, mean, var = triton_batch_norm.forward(x, w, b, spec.view, eps, act)
    shape = _stat_shape(xv, spec.dims)
    var = var.view(shape)
    return yv.view(xv.shape), mean.view(shape), torch.rsqrt(var + eps), var


def backward(dy: Tensor, xv: Tensor, weight, mean: Tensor, rstd: Tensor, spec: NormSpec, needs,
             bias=None, activation: str | None = None):
    from normlab.kernels import triton_batch_norm, triton_group_norm, triton_layer_norm

    kind = _kind(xv, spec)
    act = _activation_code(activation, kind)
    need_dx, need_dweight, need_dbias = needs
    x, dy, w, b = xv.contiguous(), dy.contiguous(), _flat(weight), _flat(bias)
    mean, rstd = mean.reshape(-1).float().contiguous(), rstd.reshape(-1).float().contiguous()
    with _device(xv):
        if kind == "ln":
            dx, dweight, dbias = triton_layer_norm.backward(dy, x, w, mean, rstd, needs)
        elif kind == "gn":
            dx, dweight, dbias = triton_group_norm.backward(dy, x, w, b, mean, rstd, spec.view, needs, act)
        else:
            dx, dweight, dbias = triton_batch_norm.backward(dy, x, w, b, mean, rstd, spec.view, needs, act)
    affine = spec.affine_shape
    return (
        dx.view(xv.shape) if need_dx else None,
        dweight.view(affine) if need_dweight else None,
        dbias.view(affine) if need_dbias else None,
    )


# ---------------------------------------------------------------- Switchable Norm


def switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps):
    from normlab.kernels import triton_switch_norm

    with _device(xv):
        return triton_switch_norm.forward(
            xv.contiguous(), _flat(weight), _flat(bias), mean_logits, var_logits, running_mean, running_var,
            spec, eps,
        )


def switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                    mean_in, var_in, spec, eps, needs):
    from normlab.kernels import triton_switch_norm

    with _device(xv):
        dx, dweight, dbias, dmean_logits, dvar_logits = triton_switch_norm.backward(
            dy.contiguous(), xv.contiguous(), _flat(weight), mean_logits, var_logits, running_mean,
            running_var, mean_in, var_in, spec, eps, needs,
        )
    if dx is not None:
        dx = dx.view(xv.shape)
    return dx, dweight, dbias, dmean_logits, dvar_logits

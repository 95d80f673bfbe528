"""Compile every Triton kernel variant normlab launches for an H100 (sm_90), without a GPU.

    python tests/triton_sm90_check.py [--quick]   # one line per variant; exit 1 on a compile error or spill
                                                  # (--quick: float32 only, no SASS load widths)

The interpreter that runs tests/test_triton_kernels.py on the CPU skips Triton's compiler, so code it
accepts can still fail to compile, spill registers or lose vectorized loads. This script drives the real
host launchers on CPU tensors for realistic shapes (every path: single, looped, staged, both layouts,
three dtypes, fused activations), turns each launch into a compile for sm_90 through a stand-in driver
(``JITFunction.warmup``: the same specialization a real launch does — 16-byte alignment, ints divisible by
16, ints equal to 1), and reads registers, local memory (spills) and the widest global load/store from the
cubin with the cuobjdump that ships with Triton. Nothing runs: the kernels' results are never looked at.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

os.environ.pop("TRITON_INTERPRET", None)

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402

TOOLS = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


class _Sm90:
    """Just enough of Triton's driver for `warmup` to compile for an H100."""

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return GPUTarget("cuda", 90, 32)

    def get_active_torch_device(self):
        return torch.device("cpu")


driver.set_active(_Sm90())

from normlab._layout import to_view  # noqa: E402
from normlab.kernels import (  # noqa: E402
    NormSpec,
    SwitchSpec,
    triton_backend,
    triton_group_norm,
    triton_layer_norm,
)
from normlab.kernels import triton_feature as stages  # noqa: E402

KERNELS = {
    stages: ["_moments_kernel", "_combine_moments_kernel", "_apply_kernel", "_grad_sums_kernel",
             "_combine_grads_kernel", "_grad_input_kernel"],
    triton_group_norm: ["_gn_forward_kernel", "_gn_backward_kernel"],
    triton_layer_norm: ["_ln_forward_kernel", "_ln_backward_kernel"],
}
COMPILED: dict[tuple, object] = {}
SPILL_LIMIT = 16  # bytes of stack/local memory tolerated (a couple of registers, outside the hot loop)


class _Compile:
    """Stands in for a kernel: ``kernel[grid](*args, **meta)`` compiles instead of launching."""

    def __init__(self, kernel):
        self.kernel = kernel

    def __getitem__(self, grid):
        def launch(*args, **meta):
            key = (self.kernel.__name__,) + tuple(
                (str(a.dtype), a.data_ptr() % 16 == 0) if isinstance(a, torch.Tensor)
                else ("int1" if a == 1 else "int16" if isinstance(a, int) and a % 16 == 0 else type(a).__name__)
                for a in args
            ) + tuple(sorted(meta.items()))
            if key not in COMPILED:
                COMPILED[key] = (self.kernel.warmup(*args, grid=grid, **meta), meta)
        return launch


for module, names in KERNELS.items():
    for kernel_name in names:
        setattr(module, kernel_name, _Compile(getattr(module, kernel_name)))


def _feature(x, groups, kind):
    xv, view = to_view(x, groups)
    dims = view.group_dims if kind == "gn" else view.batch_dims
    return xv, NormSpec(dims, view.affine_shape(groups), view)


def _drive(xv, spec, channels, dtype, activation=None):
    w, b = torch.empty(channels, dtype=dtype), torch.empty(channels, dtype=dtype)
    if spec.view is not None:
        w, b = w.reshape(spec.affine_shape), b.reshape(spec.affine_shape)
    _, mean, _, var = triton_backend.forward(xv, w, b, spec, 1e-5, activation=activation)
    rstd = torch.rsqrt(var + 1e-5)
    triton_backend.backward(torch.empty_like(xv), xv, w, mean, rstd, spec, (True, True, True),
                            bias=b, activation=activation)


def drive_all(quick: bool = False):
    """Launch every path; ``quick``: float32 only (each path, each activation), fewer shapes."""
    stages.TUNING.num_sms = 132  # an H100 SXM
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float16):
        for channels_last in (False, True):
            fmt = torch.channels_last if channels_last else torch.contiguous_format
            # GN: staged (batch 1), looped (many large sets), single (small sets); channels_last is staged
            gn_shapes = ((1, 128, 128, 128), (16, 256, 28, 28), (64, 64, 8, 8))
            for shape in gn_shapes[:1] if channels_last else gn_shapes:
                x = torch.empty(shape, dtype=dtype).to(memory_format=fmt)
                for activation in (None, "silu"):
                    _drive(*_feature(x, 32, "gn"), shape[1], dtype, activation)
            if not channels_last:  # (N, C) with G = C: CG = L = 1, both specialized to constants
                _drive(*_feature(torch.empty(256, 64, dtype=dtype), 64, "gn"), 64, dtype)
            # BN: NCHW rows, channels_last rows, and the (N, C) case
            for shape in ((32, 64, 56, 56), (512, 1024))[:1 if quick else 2]:
                x = torch.empty(shape, dtype=dtype)
                x = x.to(memory_format=fmt) if x.dim() == 4 else x
                for activation in (None, "relu"):
                    _drive(*_feature(x, shape[1], "bn"), shape[1], dtype, activation)
        for rows, width in ((4096, 1024), (8192, 64), (1024, 16384), (64, 65536)):  # LayerNorm rows
            x = torch.empty(rows, width, dtype=dtype)
            _drive(x, NormSpec((1,), (1, width)), width, dtype)
        x = torch.empty(8, 64, 32, 32, dtype=dtype)  # Switchable Norm goes through the stages
        xv, view = to_view(x, 64)
        spec = SwitchSpec(view, ("in", "ln", "bn"), False, False, view.affine_shape(64))
        w = torch.empty(64, dtype=dtype).reshape(spec.affine_shape)
        logits = torch.zeros(3)
        _, mean_in, var_in, _, _ = triton_backend.switch_forward(xv, w, w, logits, logits, None, None, spec, 1e-5)
        triton_backend.switch_backward(torch.empty_like(xv), xv, w, logits, logits, None, None, mean_in, var_in,
                                       spec, 1e-5, (True,) * 5)


def inspect(kernel, sass: bool = True) -> dict:
    """Registers, stack/local bytes and (from the SASS, slow: skipped with ``sass=False``) widest LDG/STG."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        usage = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "--dump-resource-usage", f.name],
                               capture_output=True, text=True, check=True).stdout
        sass = subprocess.run([os.path.join(TOOLS, "cuobjdump"), "-sass", f.name],
                              capture_output=True, text=True, check=True).stdout if sass else ""
    regs = int(re.search(r"REG:(\d+)", usage).group(1))
    local = int(re.search(r"LOCAL:(\d+)", usage).group(1))
    stack = int(re.search(r"STACK:(\d+)", usage).group(1))  # spilled registers live in the stack frame
    loads = [int(w) if w else 32 for w in re.findall(r"LDG\.E[.A-Z0-9]*?(?:\.(64|128))?\s", sass)]
    stores = [int(w) if w else 32 for w in re.findall(r"STG\.E[.A-Z0-9]*?(?:\.(64|128))?\s", sass)]
    return {"regs": regs, "spill": local + stack, "ldg": max(loads, default=0), "stg": max(stores, default=0)}


def main() -> int:
    quick = "--quick" in sys.argv
    drive_all(quick)
    failed = 0
    for key, (kernel, meta) in sorted(COMPILED.items(), key=lambda kv: kv[0][0]):
        info = inspect(kernel, sass=not quick)
        flags = {k: v for k, v in meta.items() if k.isupper() or k == "num_warps"}
        spill = info["spill"] > SPILL_LIMIT
        failed += spill
        print(f"{key[0]:24s} regs {info['regs']:3d}  spill {info['spill']:5d}  widest LDG {info['ldg']:3d} bit"
              f"  STG {info['stg']:3d} bit  {'SPILL ' if spill else ''}{flags}  args {key[1:3]}")
    print(f"{len(COMPILED)} variants compiled for sm_90, {failed} spilling more than {SPILL_LIMIT} bytes")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

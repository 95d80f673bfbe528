"""The native CPU backend: normlab's own kernels (`native_cpu.cpp`) for float32, bfloat16 and float64 CPU tensors,
and its own autograd node for them (`native_ops.cpp`).

Why: on the CPU torch's batch norm in training, and instance norm (computed as a batch norm), take several
passes over memory; its group- and layer-norm kernels round the mean and cancel under large offsets. The
kernels here treat every method alike — a normalization over statistics sets small enough to stay in cache
while they are read three times (see the .cpp file) — so each direction costs about one memory pass:

    forward   x in, y out                    mean, 1/σ and σ² per set (float32+), offset-stable
    backward  x, dy in, dx out               dx = r·γ·dy + k·(x − μ) + c per set;  dγ = Σ dy·x̂, dβ = Σ dy

Calls it takes (`supports`): contiguous NCHW views of GN, IN, LN over (C, *) and BN, LN over trailing dims,
channels_last views of GN, IN and BN (rows of C channels: the .cpp's `forward_channels_last`), and Switchable
Norm, contiguous or channels_last (two passes forward, as its statistics mix across cells). Statistics,
parameters and arithmetic are float32 (float64 for float64 inputs). Channels_last LN over (C, *), float16
inputs, other devices and torch.compile tracing go to the next backend ("cpu", then "torch").

Per-call overhead: BN/LN/IN/GN calls from normlab.functional go through `bind`, a `Plan` of the call's geometry
from the library's Python module (pybind11), called with the tensors; its autograd node is in C++ (the contract
of `kernels.autograd`, see native_ops.cpp): a Python autograd.Function alone costs more per call than
torch.nn's whole GroupNorm, and so does a custom operator's generic binding. The backend's
`forward`/`backward` (the contract's functions, for callers of the contract) reach the same kernels through
ctypes. Switchable Norm likewise has a plan with its node in C++ (`bind_switch`, native_switch.cpp), and Weight
Normalization a node of ATen's fused forward and the native backward (`weight_norm_node`, native_weight_norm.cpp).

Built on first use with the system's C++ compiler (``$CXX``, else ``c++``; OpenMP, ``-march=native``; torch's
and Python's headers, torch's libraries) into ``$NORMLAB_CACHE_DIR`` (default ``~/.cache/normlab``), keyed by
the sources, the flags, torch's version and the CPU — about 45 s on two cores, once (the sources compile in
parallel). When that fails a warning says why and "auto" uses the other backends. ``NORMLAB_NATIVE=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import math
import os
import platform
import subprocess
import sys
import sysconfig
import tempfile
import warnings
from functools import cache, lru_cache
from pathlib import Path
from typing import NamedTuple

import torch
from torch import Tensor

from normlab._layout import to_view
from normlab._stats import moments, stats_dtype
from normlab.kernels import torch_backend
from normlab.kernels.contract import NormSpec, SwitchSpec

name = "native"

SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("native_cpu.cpp", "native_ops.cpp", "native_switch.cpp", "native_weight_norm.cpp"))
HEADERS = (Path(__file__).with_name("native_ops.h"),)
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c++17", "-Wno-c++20-extensions", "-Wno-psabi")
PARALLEL_MIN = 1 << 15  # below this many elements one thread is faster than waking the pool
LARGE_MIN = 1 << 24  # inputs of this many bytes and more outgrow the caches: see `_plan`
COLUMNS_ROWS_PER_THREAD = 8  # LN with fewer rows than this per thread: γ's and β's gradients by columns
_DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float64: 2}  # the .cpp's dtype codes
_compiling = torch.compiler.is_compiling
_ptr = ctypes.c_void_p
_i64 = ctypes.c_int64


# ---------------------------------------------------------------- building and loading

def _cache_dir() -> Path:
    root = os.environ.get("NORMLAB_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "normlab"
    )
    return Path(root)


def _cpu_tag() -> str:
    """The CPU's feature flags (``-march=native`` code is built for them)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _torch_flags() -> list[str]:
    """Compiling and linking against the running torch (headers, C++ ABI, libraries)."""
    root = Path(torch.__file__).parent
    lib = root / "lib"
    return [f"-I{root / 'include'}", f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
            f"-I{sysconfig.get_paths()['include']}", f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
            f"-L{lib}", "-lc10", "-ltorch_cpu", "-ltorch_python", f"-Wl,-rpath,{lib}"]


def _run(commands: list[list[str]]) -> None:
    """Run the commands at once (the sources compile in parallel); raise with the first failure's errors."""
    running = [subprocess.Popen(c, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for c in commands]
    errors = [process.communicate()[1] for process in running]
    failures = [(c, process.returncode, err) for c, process, err in zip(commands, running, errors, strict=True)
                if process.returncode != 0]
    if failures:
        command, code, err = failures[0]
        raise RuntimeError(f"{command[0]} failed (exit {code}): {err.strip()[-2000:]}")


def _build(compiler: str, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as work:  # built aside, renamed: concurrent builds are safe
        flags = _torch_flags()
        objects = [os.path.join(work, f"{source.stem}.o") for source in SOURCES]
        _run([[compiler, *FLAGS, "-c", str(source), "-o", obj, *flags]
              for source, obj in zip(SOURCES, objects, strict=True)])
        linked = os.path.join(work, target.name)
        _run([[compiler, *FLAGS, *objects, "-o", linked, *flags]])
        os.replace(linked, target)


MODULE = "_normlab_native"  # the library's Python module (PYBIND11_MODULE in native_ops.cpp)
_module = None  # that module, once `library` has loaded it


def _target() -> tuple[str, Path]:
    """The compiler and the library's path in the cache, keyed by what the build depends on."""
    compiler = os.environ.get("CXX", "c++")
    key = hashlib.sha256("\0".join(
        [*(source.read_text() for source in SOURCES + HEADERS), compiler, *FLAGS, torch.__version__, _cpu_tag(),
         sys.platform]
    ).encode()).hexdigest()[:16]
    return compiler, _cache_dir() / f"native_cpu-{key}.so"


def needs_build() -> bool:
    """Whether the first use of the kernels in this environment would build them (about 45 s: see above)."""
    return os.environ.get("NORMLAB_NATIVE", "1") != "0" and not _target()[1].exists()


@cache
def library() -> ctypes.CDLL | None:
    """The compiled kernels, built if needed; None (with one warning) when they cannot be built or loaded.
    Loading also imports the library as a Python module (`_module`) and registers its operator."""
    global _module
    if os.environ.get("NORMLAB_NATIVE", "1") == "0":
        return None
    compiler, target = _target()
    try:
        if not target.exists():
            _build(compiler, target)
        spec = importlib.util.spec_from_file_location(MODULE, target)
        module = importlib.util.module_from_spec(spec)  # loads it (registers normlab::feature_norm_graph_backward)
        spec.loader.exec_module(module)
        lib = ctypes.CDLL(str(target))  # the same library (after torch: its libgomp.so.1 is the one linked)
    except (OSError, RuntimeError, ImportError) as err:
        warnings.warn(f"normlab: native CPU kernels unavailable, using ATen's ({err})", RuntimeWarning, stacklevel=2)
        return None
    lib.nl_forward.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_double,
                               ctypes.c_int]
    lib.nl_backward.argtypes = [ctypes.c_int, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, _ptr, ctypes.c_int,
                                ctypes.c_int]
    _OPS.impl("feature_norm_graph_backward", _graph_backward, "CompositeImplicitAutograd")
    _OPS.impl("switch_norm_graph_backward", _switch_graph_backward, "CompositeImplicitAutograd")
    from normlab.functional.weight_norm import closed_form_backward  # (functional imports this module)

    _OPS.impl("weight_norm_graph_backward", closed_form_backward, "CompositeImplicitAutograd")
    _module = module
    return lib


_OPS = torch.library.Library("normlab", "IMPL")  # Python implementations of the library's operators


def _graph_backward(dy: Tensor, x: Tensor, weight: Tensor | None, view_shape, dims, affine_shape, eps: float):
    """The native node's double backward (FeatureNormBackward calls this with grad mode on): the torch backend's
    closed form on statistics recomputed from x, so that autograd records a graph through x, weight and dy —
    what `kernels.autograd` does for every backend. Returns dx in x's shape, dweight and dbias in the
    affine shape."""
    spec = NormSpec(tuple(dims), tuple(affine_shape) or None)
    xv, dy = x.reshape(view_shape), dy.reshape(view_shape)
    mean, var = moments(xv, spec.dims)
    rstd = torch.rsqrt(var + eps)
    wv = None if weight is None else weight.reshape(spec.affine_shape)
    needs = (True, weight is not None, spec.affine_shape is not None)
    dx, dweight, dbias = torch_backend.backward(dy, xv, wv, mean, rstd, spec, needs)
    none = xv.new_empty(0)  # the schema's stand-in for "not computed"
    return dx.reshape(x.shape), none if dweight is None else dweight, none if dbias is None else dbias


# ---------------------------------------------------------------- what runs here

def _kind(spec: NormSpec) -> str | None:
    """'rows' (LN over trailing dims), 'group' (GN/LN/IN over (N, G, C/G, L)), 'batch' (BN over (N, C, 1, L)),
    and for channels_last inputs 'group_cl' (over (N, L, G, C/G)) and 'batch_cl' (over (N, L, C, 1))."""
    view = spec.view
    if view is None:
        return "rows" if spec.dims == (1,) else None
    if view.channels_last:
        return "group_cl" if len(spec.dims) == 2 else "batch_cl"
    return "group" if len(spec.dims) == 2 else "batch"


def _usable(xv: Tensor) -> bool:
    return (xv.is_cpu and xv.dtype in _DTYPES and xv.numel() > 0 and xv.is_contiguous() and not _compiling()
            and library() is not None)


def supports(xv: Tensor, spec: NormSpec) -> bool:
    return _kind(spec) is not None and _usable(xv)


def supports_switch(xv: Tensor, spec: SwitchSpec) -> bool:
    return _usable(xv)


# ---------------------------------------------------------------- calls into the library

class _Plan(NamedTuple):
    """What a call of one shape, dtype and kind passes to the library (cached: small calls are common)."""

    geometry: ctypes.Array  # the .cpp's `Sets`
    fields: tuple[int, ...]  # the same values
    sets: int
    stats_shape: tuple[int, ...]
    channels: int  # parameter-gradient partials per row: channels, or elements for LN over rows
    rows: int  # rows of partials: n_outer, or threads for LN over many rows (which accumulate; by columns: 1)
    threads: int
    stream: int  # non-temporal stores for the output
    code: int  # the .cpp's dtype code
    acc: torch.dtype


@lru_cache(maxsize=512)
def _plan(shape: tuple[int, ...], dtype: torch.dtype, kind: str, threads: int, parallel_min: int,
          large_min: int) -> _Plan:
    numel = math.prod(shape)
    threads = threads if numel >= parallel_min else 1
    # An input larger than the caches: its output is written past them (float32's non-temporal stores), and
    # each set's output pass requests the next set (`ahead`, see the .cpp's `prefetch`).
    ahead = int(numel * dtype.itemsize >= large_min)
    stream = int(dtype == torch.float32 and ahead)
    # geometry: n_outer, n_inner, n_seg, len, outer, inner, step, ch_inner, ch_seg, channels, per_element, stream,
    # params_in_storage_type (0 here: the native node sets it per call, the ctypes path passes float32+
    # parameters), ahead, channels_last
    if kind in ("group_cl", "batch_cl"):  # slabs of rows of C channels; sets of C/G columns (see the .cpp)
        n, positions, groups, per_group = shape
        channels = groups * per_group
        if kind == "group_cl":
            geometry = (n, groups, per_group, positions, positions * channels, 0, 0, 0, 0, channels, 0, 0, 0, 0, 1)
            sets, stats_shape, part_rows = n * groups, (n, 1, groups, 1), n
        else:  # one slab of all samples' rows, a set per channel
            geometry = (1, channels, 1, n * positions, 0, 0, 0, 0, 0, channels, 0, 0, 0, 0, 1)
            sets, stats_shape, part_rows = channels, (1, 1, channels, 1), 1
        return _Plan((_i64 * len(geometry))(*geometry), geometry, sets, stats_shape, channels, part_rows,
                     threads, 0, _DTYPES[dtype], stats_dtype(dtype))
    if kind == "rows":  # γ_l, β_l per element; their gradients by columns when rows are few (per_element 2)
        rows, width = shape
        by_columns = rows < COLUMNS_ROWS_PER_THREAD * threads
        geometry = (rows, 1, 1, width, width, 0, 0, 0, 0, width, 2 if by_columns else 1, stream)
        sets, stats_shape, channels, part_rows = rows, (rows, 1), width, 1 if by_columns else threads
    else:
        n, groups, per_group, positions = shape
        channels = groups * per_group
        if kind == "group":
            geometry = (n, groups, per_group, positions, channels * positions, per_group * positions, positions,
                        per_group, 1, channels, 0, stream)
            sets, stats_shape, part_rows = n * groups, (n, groups, 1, 1), n
        else:  # batch: the view has groups = C
            geometry = (1, groups, n, positions, 0, positions, channels * positions, 1, 0, channels, 0, stream)
            sets, stats_shape, part_rows = groups, (1, groups, 1, 1), 1
    geometry += (0, ahead, 0)
    return _Plan((_i64 * len(geometry))(*geometry), geometry, sets, stats_shape, channels, part_rows,
                 threads, stream, _DTYPES[dtype], stats_dtype(dtype))


def _plan_for(xv: Tensor, kind: str) -> _Plan:
    return _plan(tuple(xv.shape), xv.dtype, kind, torch.get_num_threads(), PARALLEL_MIN, LARGE_MIN)


def _addr(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _param(p: Tensor | None, acc: torch.dtype) -> Tensor | None:
    """An affine parameter (any shape) as the contiguous statistics-dtype values that the kernels read."""
    if p is None or p.dtype == acc and p.is_contiguous():
        return p
    return p.reshape(-1).to(acc).contiguous()


def _moments(xv: Tensor, kind: str, y: Tensor | None, weight, bias, eps: float):
    """Run the forward kernel (y None: statistics only). Returns mean, rstd, var in the statistics shape."""
    plan = _plan_for(xv, kind)
    stats = torch.empty((3, *plan.stats_shape), dtype=plan.acc)  # mean, rstd, var
    at, step = stats.data_ptr(), plan.sets * stats.element_size()
    w, b = _param(weight, plan.acc), _param(bias, plan.acc)
    library().nl_forward(plan.code, xv.data_ptr(), _addr(y), _addr(w), _addr(b), at, at + step, at + 2 * step,
                         plan.geometry, eps, plan.threads)
    return stats.unbind()


def _sums(dy: Tensor, xv: Tensor, kind: str, dx: Tensor | None, weight, mean: Tensor, rstd: Tensor,
          need_dweight: bool, need_dbias: bool, sum_rows: bool = True):
    """Run the backward kernel (dx None: the parameter sums only). Returns the partial sums Σ dy·x̂ and Σ dy,
    (rows, channels) each, or None where not needed; with ``sum_rows`` their row 0 is the total over rows:
    dweight and dbias."""
    plan = _plan_for(xv, kind)
    w = _param(weight, plan.acc)
    make = torch.zeros if plan.fields[10] == 1 else torch.empty  # LN by rows: per-thread partials accumulate
    dw_part = make((plan.rows, plan.channels), dtype=plan.acc) if need_dweight else None
    db_part = make((plan.rows, plan.channels), dtype=plan.acc) if need_dbias else None
    mean, rstd = mean.contiguous(), rstd.contiguous()  # held while the kernel reads them
    library().nl_backward(plan.code, dy.data_ptr(), xv.data_ptr(), _addr(dx), _addr(w), mean.data_ptr(),
                          rstd.data_ptr(), _addr(dw_part), _addr(db_part), plan.geometry, int(sum_rows), plan.threads)
    return dw_part, db_part


# ---------------------------------------------------------------- BN, LN, IN, GN

def bind(xv: Tensor, spec: NormSpec, statistics: bool = True):
    """The contract's ``bind``: this geometry's call, run(x, weight, bias, eps) -> (y, mean, rstd, var), a `Plan`
    of the library's module with its autograd node in C++ (see the module docstring). ``x``: the tensor that
    ``xv`` views, contiguous (or ``xv`` itself); y has its shape. ``weight``/``bias`` in their own shapes.
    Without ``statistics`` run returns (y, None, None, None). Running estimates given after ``eps`` are updated
    in the same call (see the contract)."""
    plan = _plan_for(xv, _kind(spec))
    return _module.Plan(plan.fields, plan.threads, plan.rows, plan.stats_shape, xv.shape, spec.dims,
                        spec.affine_shape or (), statistics)


def update_running(running_mean: Tensor | None, running_var: Tensor | None, mean: Tensor, var: Tensor,
                   momentum: float, var_factor: float) -> bool:
    """running ← (1 − momentum)·running + momentum·b̄ for both running estimates, b̄ the mean over rows of the
    batch's (rows, C) statistics (var·var_factor for the variance), in one native loop; False (nothing done)
    where that does not apply: while torch.compile traces, without the library, or for tensors that are not
    contiguous CPU ones (statistics in float32/float64, running buffers in any floating dtype)."""
    return (not _compiling() and library() is not None
            and _module.update_running(running_mean, running_var, mean, var, momentum, var_factor))


def count_batch(tracked: Tensor) -> bool:
    """num_batches_tracked += 1 in one native step (see native_ops.cpp); False, nothing done, where that does not
    apply: while torch.compile traces, without the library, or for a counter that is no CPU int64 scalar."""
    return not _compiling() and library() is not None and _module.count_batch(tracked)


def weight_norm_node():
    """``weight_norm(v, g, dim) -> w`` with the library's autograd node (native_weight_norm.cpp: ATen's fused
    forward, the native backward along the first axis), or None without the library or while torch.compile
    traces."""
    return None if _compiling() or library() is None else _weight_norm


def _weight_norm(v: Tensor, g: Tensor, dim: int) -> Tensor:
    return _module.weight_norm(v, g, dim, PARALLEL_MIN, LARGE_MIN // 3)  # (∇w, v, ∇v: three of v's size)


def forward(xv: Tensor, weight, bias, spec: NormSpec, eps: float):
    y = torch.empty_like(xv)
    mean, rstd, var = _moments(xv, _kind(spec), y, weight, bias, eps)
    return y, mean, rstd, var


def backward(dy: Tensor, xv: Tensor, weight, mean: Tensor, rstd: Tensor, spec: NormSpec, needs):
    need_dx, need_dweight, need_dbias = needs
    dy = dy.to(xv.dtype).contiguous()
    dx = torch.empty_like(xv) if need_dx else None
    dw, db = _sums(dy, xv, _kind(spec), dx, weight, mean, rstd, need_dweight, need_dbias)
    shape = spec.affine_shape
    return dx, None if dw is None else dw[0].view(shape), None if db is None else db[0].view(shape)


# ---------------------------------------------------------------- Switchable Norm

_SOURCE_CODES = {"in": 0, "ln": 1, "bn": 2}  # native_switch.cpp's


def bind_switch(xv: Tensor, spec: SwitchSpec):
    """This geometry's SN call, a `SwitchPlan` of the library's module (native_switch.cpp: the mix in C++ between
    two passes over memory each way, its autograd node in C++):
    plan(x, weight, bias, mean_logits, var_logits, running_mean, running_var, eps) -> (y, batch_mean, batch_var),
    ``x`` the contiguous tensor that ``xv`` views (y in its shape), the other tensors in their own shapes;
    batch_mean/batch_var (C,) the batch's BN source (σ² as mixed, before any unbiasing) or None."""
    plan = _plan_for(xv, "group_cl" if spec.view.channels_last else "group")  # one statistics set per (n, c) cell
    return _module.SwitchPlan(plan.fields, plan.threads, [_SOURCE_CODES[s] for s in spec.sources],
                              ",".join(spec.sources), spec.running_bn, spec.authors_compat)


def switch_forward(xv, weight, bias, mean_logits, var_logits, running_mean, running_var, spec, eps):
    #   the contract's pair: the same C++ as `bind_switch`'s plan, without its node
    per_channel = spec.view.affine_shape(spec.view.input_shape[1])  # (1, C, 1, 1); channels_last (1, 1, C, 1)
    y, mean_in, var_in, batch_mean, batch_var = bind_switch(xv, spec).forward(
        xv, weight, bias, mean_logits, var_logits, running_mean, running_var, eps)
    if batch_mean is not None:
        batch_mean, batch_var = batch_mean.view(per_channel), batch_var.view(per_channel)
    per_cell = (xv.shape[0], *per_channel[1:])
    return y, mean_in.view(per_cell), var_in.view(per_cell), batch_mean, batch_var


def switch_backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                    mean_in, var_in, spec, eps, needs):
    return tuple(bind_switch(xv, spec).backward(dy, xv, weight, mean_logits, var_logits, running_mean, running_var,
                                                mean_in, var_in, eps, list(needs), spec.affine_shape or (1, 1, 1, 1)))


def _switch_graph_backward(dy: Tensor, x: Tensor, weight: Tensor | None, has_bias: bool, mean_logits: Tensor,
                           var_logits: Tensor, running_mean: Tensor | None, running_var: Tensor | None, sources: str,
                           running_bn: bool, authors_compat: bool, eps: float):
    """The SN node's double backward (SwitchNormBackward calls this with grad mode on): the torch backend's closed
    form on moments recomputed from x, recorded by autograd. Returns dx in x's shape and the gradients of weight,
    bias, mean_logits and var_logits (flat; empty where absent)."""
    channels = x.shape[1]
    xv, view = to_view(x, channels)
    spec = SwitchSpec(view, tuple(sources.split(",")), running_bn, authors_compat, view.affine_shape(channels))
    mean_in, var_in = moments(xv, view.group_dims)
    shaped = [None if t is None else t.reshape(spec.affine_shape) for t in (weight, running_mean, running_var)]
    needs = (True, weight is not None, has_bias, True, True)
    grads = torch_backend.switch_backward(dy.reshape(xv.shape), xv, shaped[0], mean_logits.reshape(-1),
                                          var_logits.reshape(-1), *shaped[1:], mean_in, var_in, spec, eps, needs)
    none = xv.new_empty(0)  # the schema's stand-in for "not computed"
    return (grads[0].reshape(x.shape), *(none if g is None else g.reshape(-1) for g in grads[1:]))

"""The Triton backend against the torch backend and the float64 reference: output and every gradient.

Without a GPU the kernels run on CPU tensors under Triton's interpreter (TRITON_INTERPRET=1, set below
before the kernel modules are first imported — they load lazily), so shapes are tiny and `Tuning` is
shrunk per case to force each kernel path (single tile, looped set, staged chunks, several channel blocks)
on them. With a GPU the same cases run compiled on CUDA tensors, plus a section of realistic shapes.

The interpreter must be switched on before anything imports Triton (its standard library, e.g. tl.sum, is
decorated at import): tests/conftest.py does that.

Tolerances: triton vs torch backend compute the same closed forms with float32 statistics, so float32
agrees to rounding (conftest's 1e-4); float16/bfloat16 outputs and dx differ by at most an ulp of the
dtype after the final cast (conftest's table). Against the float64 reference, float32 inputs get 1e-4.
"""

import os
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")

import numpy as np  # noqa: E402
import torch.nn.functional as TF  # noqa: E402

import normlab.functional as NF  # noqa: E402
from conftest import TOL, randn  # noqa: E402
from normlab import reference  # noqa: E402
from normlab._layout import to_view  # noqa: E402
from normlab.kernels import NormSpec, available_backends, fused, select_backend  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
pytestmark = pytest.mark.skipif("triton" not in available_backends(), reason="triton backend not registered")
REDUCED = [torch.float16, torch.bfloat16]


@pytest.fixture
def tuning(monkeypatch):
    """Set fields of the kernels' launch heuristics for one test."""
    from normlab.kernels.triton_feature import TUNING

    def set_fields(**fields):
        for field, value in fields.items():
            monkeypatch.setattr(TUNING, field, value)

    return set_fields


def _memory(x, channels_last):
    if not channels_last:
        return x
    return x.to(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)


def run(fn, inputs, backend, seed=7):
    """fn(**inputs, backend=...) and the gradients of Σ y·dy for every tensor input (None stays None)."""
    leaves = {k: (v.detach().clone().requires_grad_(v.is_floating_point()) if isinstance(v, torch.Tensor) else v)
              for k, v in inputs.items()}
    y = fn(**leaves, backend=backend)
    dy = randn(*y.shape, seed=seed).to(y.dtype).to(y.device)
    y.backward(dy)
    grads = {k: v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor) and v.requires_grad}
    return y, grads, dy


def compare(fn, inputs, dtype, *, check_layout=True):
    """Triton vs torch backend: output (values, dtype, memory format) and every gradient."""
    y_ref, g_ref, _ = run(fn, inputs, "torch")
    y, g, _ = run(fn, inputs, "triton")
    assert y.dtype == y_ref.dtype
    if check_layout:
        assert y.stride() == y_ref.stride(), "the output keeps the input's memory format"
    torch.testing.assert_close(y, y_ref, **TOL[dtype])
    for name in g_ref:
        assert g[name] is not None, name
        torch.testing.assert_close(g[name], g_ref[name], **TOL[dtype], msg=lambda m, n=name: f"d{n}: {m}")
    return y, g


def params(channels, seed=1, dtype=torch.float32):
    return (randn(channels, seed=seed, dtype=dtype).to(DEVICE) * 0.5 + 1,
            randn(channels, seed=seed + 1, dtype=dtype).to(DEVICE))


# ---------------------------------------------------------------- GN / IN / LN of a feature map

GN_CASES = [
    # (shape, groups, channels_last, tuning, why)
    ((2, 6, 5, 7), 3, False, {}, "single tile: CG = 2 and L = 35 (not powers of 2) exercise every mask"),
    ((2, 6, 5, 7), 1, False, {}, "G = 1: SPEC's LN of a feature map"),
    ((2, 6, 5, 7), 6, False, {}, "G = C: IN, 12 sets"),
    ((3, 6, 2, 2), 6, False, {"set_tile_forward": 16, "set_tile_backward": 16, "num_sms": 1, "programs_per_sm": 1},
     "single tile, 4 sets per program over 5 programs, the last one partial"),
    ((2, 4, 9, 9), 2, False, {"path": "looped", "set_tile_forward": 32, "set_tile_backward": 32, "num_sms": 1,
                              "looped_programs_per_sm": 1},
     "looped set kernel: a set spans several tiles; one persistent program walks all 4 sets"),
    ((1, 8, 9, 7), 2, False, {"path": "staged", "tile": 16, "combine_block": 4},
     "batch 1, few sets: position chunks over many programs, Chan combine over channels and chunks"),
    ((2, 8, 5, 6), 4, True, {}, "channels_last: (positions × channels) tiles, group of a column = c // CG"),
    ((2, 8, 5, 6), 2, True, {"tile": 4}, "channels_last with 2 channel blocks and many position chunks"),
    ((2, 6, 3, 2, 5), 3, True, {}, "5-d channels_last_3d input"),
    ((3, 4, 10), 2, False, {}, "3-d (N, C, L) input"),
    ((4, 6), 3, False, {}, "2-d (N, C) input: one position per channel"),
]


@pytest.mark.parametrize("shape,groups,channels_last,tune,why", GN_CASES, ids=[c[-1][:40] for c in GN_CASES])
def test_group_norm_matches_torch_backend(shape, groups, channels_last, tune, why, tuning):
    tuning(**tune)
    x = _memory(randn(*shape).to(DEVICE), channels_last)
    w, b = params(shape[1])
    compare(lambda x, w, b, backend: NF.group_norm(x, groups, w, b, backend=backend),
            {"x": x, "w": w, "b": b}, torch.float32)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("channels_last,tune", [(False, {}), (False, {"path": "staged", "tile": 16}), (True, {})],
                         ids=["single", "staged", "channels_last"])
def test_group_norm_reduced_precision(dtype, channels_last, tune, tuning):
    tuning(**tune)
    x = _memory(randn(2, 8, 6, 5, dtype=dtype).to(DEVICE), channels_last)
    w, b = params(8, dtype=dtype)
    compare(lambda x, w, b, backend: NF.group_norm(x, 4, w, b, backend=backend), {"x": x, "w": w, "b": b}, dtype)


@pytest.mark.parametrize("channels_last", [False, True])
def test_group_norm_matches_reference(channels_last):
    x = _memory(randn(2, 6, 4, 5).to(DEVICE), channels_last)
    w, b = params(6)
    y, g, dy = run(lambda x, w, b, backend: NF.group_norm(x, 3, w, b, backend=backend),
                   {"x": x, "w": w, "b": b}, "triton")
    out, cache = reference.group_norm.forward(x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy(), 3)
    grads = reference.group_norm.backward(dy.double().cpu().numpy(), cache)
    tol = {"rtol": 1e-4, "atol": 1e-4}
    np.testing.assert_allclose(y.detach().cpu().numpy(), out, **tol)
    for name, key in (("x", "x"), ("w", "gamma"), ("b", "beta")):
        np.testing.assert_allclose(g[name].cpu().numpy(), grads[key], **tol, err_msg=name)


def test_group_norm_without_affine_and_only_some_grads():
    x = randn(2, 4, 3, 3).to(DEVICE)
    compare(lambda x, backend: NF.group_norm(x, 2, backend=backend), {"x": x}, torch.float32)
    w, b = params(4)  # weight/bias need grads, x does not
    compare(lambda w, b, backend: NF.group_norm(x, 2, w, b, backend=backend), {"w": w, "b": b}, torch.float32)


@pytest.mark.parametrize("channels_last,tune", [(False, {}), (False, {"path": "looped", "set_tile_forward": 32}),
                                                 (True, {})], ids=["single", "looped", "channels_last"])
def test_group_norm_large_offset_and_constant_input(channels_last, tune, tuning):
    # SPEC §2: x = 1e4 + noise must not cancel (float32 rounds x itself to ~1e-3 there: the floor the torch
    # backend also has), and a constant input (zero variance) gives y = β with finite gradients
    tuning(**tune)
    x = _memory((randn(2, 4, 6, 6) + 1e4).to(DEVICE), channels_last)
    w, b = params(4)
    y = NF.group_norm(x, 2, w, b, backend="triton")
    out, _ = reference.group_norm.forward(x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy(), 2)
    np.testing.assert_allclose(y.cpu().numpy(), out, rtol=0, atol=3e-3)
    const = _memory(torch.full((2, 4, 3, 3), 3.0, device=DEVICE), channels_last)
    y, g = compare(lambda x, w, b, backend: NF.group_norm(x, 2, w, b, backend=backend),
                   {"x": const, "w": w, "b": b}, torch.float32)
    torch.testing.assert_close(y, b.view(1, 4, 1, 1).expand_as(y))
    assert all(torch.isfinite(t).all() for t in g.values())


@pytest.mark.parametrize("channels_last", [False, True])
def test_instance_norm_with_running_stats(channels_last):
    x = _memory(randn(3, 4, 5, 6).to(DEVICE), channels_last)
    w, b = params(4)
    stats = {}
    for backend in ("torch", "triton"):
        rm, rv = torch.zeros(4, device=DEVICE), torch.ones(4, device=DEVICE)
        NF.instance_norm(x, rm, rv, w, b, backend=backend)
        stats[backend] = (rm, rv)
    torch.testing.assert_close(stats["triton"], stats["torch"])
    compare(lambda x, w, b, backend: NF.instance_norm(x, None, None, w, b, backend=backend),
            {"x": x, "w": w, "b": b}, torch.float32)


# ---------------------------------------------------------------- BN

BN_CASES = [
    # (shape, channels_last, tuning, why)
    ((4, 3, 5, 6), False, {}, "NCHW: rows of L per (n, c), combined over samples and chunks"),
    ((4, 3, 5, 6), True, {}, "channels_last: N·L rows of C channels"),
    ((3, 5, 7, 4), False, {"tile": 8, "combine_block": 2}, "NCHW with position chunks (S > 1) per (n, c)"),
    ((3, 5, 7, 4), True, {"tile": 4}, "channels_last with 2 channel blocks and many row chunks"),
    ((8, 5), False, {}, "(N, C): one position per channel, read as channels_last rows"),
    ((4, 3, 7), False, {}, "3-d (N, C, L)"),
    ((2, 3, 2, 3, 4), True, {}, "5-d channels_last_3d"),
]


@pytest.mark.parametrize("shape,channels_last,tune,why", BN_CASES, ids=[c[-1][:40] for c in BN_CASES])
def test_batch_norm_matches_torch_backend(shape, channels_last, tune, why, tuning):
    tuning(**tune)
    x = _memory(randn(*shape).to(DEVICE), channels_last)
    w, b = params(shape[1])
    compare(lambda x, w, b, backend: NF.batch_norm(x, None, None, w, b, True, backend=backend),
            {"x": x, "w": w, "b": b}, torch.float32)


@pytest.mark.parametrize("dtype", REDUCED)
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_reduced_precision_and_running_stats(dtype, channels_last):
    x = _memory(randn(4, 6, 5, 5, dtype=dtype).to(DEVICE), channels_last)
    w, b = params(6, dtype=dtype)
    compare(lambda x, w, b, backend: NF.batch_norm(x, None, None, w, b, True, backend=backend),
            {"x": x, "w": w, "b": b}, dtype)
    stats = {}
    for backend in ("torch", "triton"):
        rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
        NF.batch_norm(x, rm, rv, w, b, True, momentum=0.3, backend=backend)
        stats[backend] = (rm, rv)
    torch.testing.assert_close(stats["triton"], stats["torch"])


def test_batch_norm_matches_reference():
    x = _memory(randn(4, 3, 3, 5).to(DEVICE), True)
    w, b = params(3)
    y, g, dy = run(lambda x, w, b, backend: NF.batch_norm(x, None, None, w, b, True, backend=backend),
                   {"x": x, "w": w, "b": b}, "triton")
    out, cache = reference.batch_norm.forward(x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy())
    grads = reference.batch_norm.backward(dy.double().cpu().numpy(), cache)
    np.testing.assert_allclose(y.detach().cpu().numpy(), out, rtol=1e-4, atol=1e-4)
    for name, key in (("x", "x"), ("w", "gamma"), ("b", "beta")):
        np.testing.assert_allclose(g[name].cpu().numpy(), grads[key], rtol=1e-4, atol=1e-4, err_msg=name)


# ---------------------------------------------------------------- LayerNorm over trailing dims

LN_CASES = [
    # (shape, normalized_shape, tuning, why)
    ((4, 7, 33), (33,), {}, "rows in registers, several rows per program, D = 33 masked"),
    ((3, 5, 4), (5, 4), {}, "two normalized dims: rows of 20"),
    ((5, 40), (40,), {"row_tile": 16, "row_tile_backward": 16, "ln_programs_per_sm": 1},
     "wide rows: looped forward and backward"),
    ((37, 8), (8,), {"ln_programs_per_sm": 1, "num_sms": 2}, "persistent backward: each program walks row blocks"),
]


@pytest.mark.parametrize("shape,normalized,tune,why", LN_CASES, ids=[c[-1][:40] for c in LN_CASES])
def test_layer_norm_matches_torch_backend_and_reference(shape, normalized, tune, why, tuning):
    tuning(**tune)
    x = randn(*shape).to(DEVICE)
    w = randn(*normalized, seed=3).to(DEVICE)
    b = randn(*normalized, seed=4).to(DEVICE)
    fn = lambda x, w, b, backend: NF.layer_norm(x, normalized, w, b, backend=backend)  # noqa: E731
    compare(fn, {"x": x, "w": w, "b": b}, torch.float32)
    y, g, dy = run(fn, {"x": x, "w": w, "b": b}, "triton")
    out, cache = reference.layer_norm.forward(x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy(), len(normalized))
    grads = reference.layer_norm.backward(dy.double().cpu().numpy(), cache)
    np.testing.assert_allclose(y.detach().cpu().numpy(), out, rtol=1e-4, atol=1e-4)
    for name, key in (("x", "x"), ("w", "gamma"), ("b", "beta")):
        np.testing.assert_allclose(g[name].cpu().numpy(), grads[key], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dtype", REDUCED)
def test_layer_norm_reduced_precision_and_no_affine(dtype):
    x = randn(6, 24, dtype=dtype).to(DEVICE)
    compare(lambda x, backend: NF.layer_norm(x, (24,), backend=backend), {"x": x}, dtype)


def test_layer_norm_channels_last_feature_map():
    # LN over (C, H, W) of a channels_last map: rows in memory order, elementwise affine permuted
    x = _memory(randn(2, 3, 4, 5).to(DEVICE), True)
    w, b = randn(3, 4, 5, seed=3).to(DEVICE), randn(3, 4, 5, seed=4).to(DEVICE)
    compare(lambda x, w, b, backend: NF.layer_norm(x, (3, 4, 5), w, b, backend=backend),
            {"x": x, "w": w, "b": b}, torch.float32)


# ---------------------------------------------------------------- Switchable Norm

SN_CASES = [
    # (shape, sources, channels_last, mode, why)
    ((3, 4, 5, 6), ("in", "ln", "bn"), False, "train", "all three sources, batch statistics"),
    ((3, 4, 5, 6), ("in", "ln", "bn"), True, "train", "channels_last"),
    ((3, 4, 5, 6), ("in", "ln"), False, "train", "no BN source (batch-independent)"),
    ((3, 4, 5, 6), ("bn",), True, "train", "BN only"),
    ((3, 4, 5, 6), ("in", "ln", "bn"), False, "eval", "running BN statistics: constants"),
    ((3, 4, 5, 6), ("in", "ln", "bn"), True, "authors", "authors_compat: unbiased IN variance"),
    ((6, 5), ("ln", "bn"), False, "authors", "(N, C) input, SwitchNorm1d: LN and BN, unbiased over C and N"),
]


@pytest.mark.parametrize("shape,sources,channels_last,mode,why", SN_CASES, ids=[c[-1][:40] for c in SN_CASES])
def test_switch_norm_matches_torch_backend(shape, sources, channels_last, mode, why, tuning):
    tuning(tile=8, combine_block=4)  # several position chunks and combine steps even on tiny shapes
    channels = shape[1]
    x = _memory(randn(*shape).to(DEVICE), channels_last)
    w, b = params(channels)
    inputs = {"x": x, "w": w, "b": b, "ml": randn(len(sources), seed=5).to(DEVICE),
              "vl": randn(len(sources), seed=6).to(DEVICE)}
    running = {}
    if mode == "eval":
        running = {"running_mean": randn(channels, seed=8).to(DEVICE),
                   "running_var": randn(channels, seed=9).to(DEVICE).abs() + 0.5}

    def fn(x, w, b, ml, vl, backend):
        return NF.switch_norm(x, ml, vl, w, b, training=mode != "eval", sources=sources,
                              authors_compat=mode == "authors", backend=backend, **running)

    compare(fn, inputs, torch.float32)
    if mode != "eval":  # and the float64 reference
        y, g, dy = run(fn, inputs, "triton")
        out, cache = reference.switch_norm.forward(
            x.cpu().numpy(), w.cpu().numpy(), b.cpu().numpy(), inputs["ml"].cpu().numpy(),
            inputs["vl"].cpu().numpy(), sources=sources, unbiased_in_var=mode == "authors")
        grads = reference.switch_norm.backward(dy.double().cpu().numpy(), cache)
        np.testing.assert_allclose(y.detach().cpu().numpy(), out, rtol=1e-4, atol=1e-4)
        for name, key in (("x", "x"), ("w", "gamma"), ("b", "beta"), ("ml", "mean_logits"), ("vl", "var_logits")):
            np.testing.assert_allclose(g[name].cpu().numpy(), grads[key], rtol=1e-4, atol=1e-4, err_msg=name)


@pytest.mark.parametrize("dtype", REDUCED)
def test_switch_norm_reduced_precision(dtype):
    x = randn(3, 4, 5, 6, dtype=dtype).to(DEVICE)
    w, b = params(4, dtype=dtype)
    inputs = {"x": x, "w": w, "b": b, "ml": randn(3, seed=5).to(DEVICE), "vl": randn(3, seed=6).to(DEVICE)}
    compare(lambda x, w, b, ml, vl, backend: NF.switch_norm(x, ml, vl, w, b, training=True, backend=backend),
            inputs, dtype)


# ---------------------------------------------------------------- fused activation

@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("channels_last,tune", [(False, {}), (False, {"path": "staged", "tile": 16}), (True, {})],
                         ids=["single", "staged", "channels_last"])
def test_group_norm_act(activation, channels_last, tune, tuning):
    tuning(**tune)
    x = _memory(randn(2, 8, 5, 6).to(DEVICE), channels_last)
    w, b = params(8)
    act = {"relu": torch.relu, "silu": TF.silu}[activation]

    def composed(x, w, b, backend):
        return act(NF.group_norm(x, 4, w, b, backend="torch"))

    y0, g0, _ = run(composed, {"x": x, "w": w, "b": b}, None)
    for backend in ("torch", "triton"):
        y, g, _ = run(lambda x, w, b, backend: fused.group_norm_act(x, 4, w, b, activation=activation,
                                                                    backend=backend),
                      {"x": x, "w": w, "b": b}, backend)
        assert y.stride() == y0.stride()
        torch.testing.assert_close(y, y0, **TOL[torch.float32])
        for name in g0:
            torch.testing.assert_close(g[name], g0[name], **TOL[torch.float32], msg=f"{backend} d{name}")


@pytest.mark.parametrize("activation", ["relu", "silu"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_batch_norm_act(activation, channels_last):
    x = _memory(randn(4, 6, 3, 5).to(DEVICE), channels_last)
    w, b = params(6)
    act = {"relu": torch.relu, "silu": TF.silu}[activation]
    results = {}
    for name, fn in (
        ("composed", lambda x, w, b, backend, rm, rv: act(NF.batch_norm(x, rm, rv, w, b, True, backend="torch"))),
        ("torch", lambda x, w, b, backend, rm, rv: fused.batch_norm_act(x, rm, rv, w, b, True,
                                                                        activation=activation, backend=backend)),
        ("triton", lambda x, w, b, backend, rm, rv: fused.batch_norm_act(x, rm, rv, w, b, True,
                                                                         activation=activation, backend=backend)),
    ):
        rm, rv = torch.zeros(6, device=DEVICE), torch.ones(6, device=DEVICE)
        y, g, _ = run(lambda x, w, b, backend, fn=fn, rm=rm, rv=rv: fn(x, w, b, backend, rm, rv),
                      {"x": x, "w": w, "b": b}, None if name == "composed" else name)
        results[name] = (y, g, rm, rv)
    y0, g0, rm0, rv0 = results["composed"]
    for name in ("torch", "triton"):
        y, g, rm, rv = results[name]
        torch.testing.assert_close(y, y0, **TOL[torch.float32])
        torch.testing.assert_close((rm, rv), (rm0, rv0))
        for key in g0:
            torch.testing.assert_close(g[key], g0[key], **TOL[torch.float32], msg=f"{name} d{key}")
    # eval mode: the running statistics, torch ops
    y = fused.batch_norm_act(x, rm0, rv0, w, b, False, activation=activation)
    torch.testing.assert_close(y, act(NF.batch_norm(x, rm0, rv0, w, b, False)))


def test_fused_act_double_backward_and_bad_activation():
    x = randn(2, 4, 3, 3, dtype=torch.float64).requires_grad_()
    w = randn(4, seed=2, dtype=torch.float64).requires_grad_()
    torch.autograd.gradgradcheck(lambda x, w: fused.group_norm_act(x, 2, w, None, activation="silu"), (x, w))
    with pytest.raises(ValueError, match="activation must be one of"):
        fused.group_norm_act(x, 2, activation="gelu")


# ---------------------------------------------------------------- backend selection

def _gn_call(x, groups=2):
    xv, view = to_view(x, groups)
    return xv, NormSpec(view.group_dims, view.affine_shape(groups), view)


@pytest.mark.skipif(DEVICE != "cpu", reason="the CPU interpreter rules")
def test_auto_never_picks_the_interpreter_but_explicit_does():
    xv, spec = _gn_call(randn(2, 4, 3, 3))
    assert select_backend("auto", xv, spec).name != "triton"
    assert select_backend("triton", xv, spec).name == "triton"


def test_unsupported_calls_fall_back_or_fail_clearly():
    xv, spec = _gn_call(randn(2, 4, 3, 3, dtype=torch.float64).to(DEVICE))
    assert select_backend("auto", xv, spec).name != "triton"  # float64 statistics stay float64
    with pytest.raises(ValueError, match="cannot run this call"):
        select_backend("triton", xv, spec)


# ---------------------------------------------------------------- the real compiler, without a GPU

@pytest.mark.slow
@pytest.mark.skipif(DEVICE != "cpu", reason="with a GPU every test above compiles its kernels for real")
def test_kernels_compile_for_sm90():
    """The interpreter skips Triton's compiler: compile every kernel variant for an H100 instead (see the
    script; about a minute on two cores), failing on compile errors and on register spills."""
    from pathlib import Path

    tools = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (tools / "ptxas").exists() or not (tools / "cuobjdump").exists():
        pytest.skip("this Triton ships no ptxas/cuobjdump")
    script = Path(__file__).with_name("triton_sm90_check.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, str(script), "--quick"], env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-4000:] + done.stderr[-4000:]


# ---------------------------------------------------------------- GPU: realistic shapes, compiled kernels

gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@gpu
def test_auto_picks_triton_on_cuda():
    xv, spec = _gn_call(randn(2, 4, 3, 3).cuda())
    assert select_backend("auto", xv, spec).name == "triton"


GPU_CASES = [
    # (norm, shape, channels_last, dtype, why)
    ("gn", (1, 128, 128, 128), False, torch.bfloat16, "diffusion-style batch 1, 32 groups: staged path"),
    ("gn", (1, 128, 128, 128), True, torch.float32, "the same channels_last"),
    ("gn", (16, 256, 28, 28), False, torch.float32, "many sets, 25k elements each: looped set kernel"),
    ("gn", (64, 64, 8, 8), False, torch.float16, "small sets: single-tile set kernel"),
    ("bn", (32, 64, 56, 56), False, torch.bfloat16, "ResNet stem BN"),
    ("bn", (32, 64, 56, 56), True, torch.float32, "the same channels_last"),
    ("bn", (512, 1024), False, torch.float32, "BN1d"),
    ("ln", (4096, 1024), False, torch.bfloat16, "transformer LayerNorm rows"),
    ("ln", (64, 65536), False, torch.float32, "rows wider than a register tile: looped"),
    ("sn", (8, 64, 32, 32), True, torch.float32, "Switchable Norm"),
]


@gpu
@pytest.mark.parametrize("norm,shape,channels_last,dtype,why", GPU_CASES, ids=[c[-1][:40] for c in GPU_CASES])
def test_gpu_shapes(norm, shape, channels_last, dtype, why):
    x = _memory(randn(*shape, dtype=dtype).cuda(), channels_last)
    channels = shape[-1] if norm == "ln" else shape[1]
    w, b = (p.cuda() for p in params(channels, dtype=dtype))
    inputs = {"x": x, "w": w, "b": b}
    if norm == "gn":
        fn = lambda x, w, b, backend: NF.group_norm(x, 32, w, b, backend=backend)  # noqa: E731
    elif norm == "bn":
        fn = lambda x, w, b, backend: NF.batch_norm(x, None, None, w, b, True, backend=backend)  # noqa: E731
    elif norm == "ln":
        fn = lambda x, w, b, backend: NF.layer_norm(x, (channels,), w, b, backend=backend)  # noqa: E731
    else:
        inputs.update(ml=torch.zeros(3, device="cuda"), vl=torch.zeros(3, device="cuda"))
        fn = lambda x, w, b, ml, vl, backend: NF.switch_norm(x, ml, vl, w, b, training=True,  # noqa: E731
                                                             backend=backend)
    tol = {"rtol": 1e-3, "atol": 1e-3} if dtype == torch.float32 else TOL[dtype]
    y_ref, g_ref, _ = run(fn, inputs, "torch")
    y, g, _ = run(fn, inputs, "triton")
    torch.testing.assert_close(y, y_ref, **tol)
    for name in g_ref:  # parameter gradients sum ~1e5 terms: relative tolerance
        torch.testing.assert_close(g[name], g_ref[name], rtol=max(tol["rtol"], 1e-3), atol=tol["atol"] * 10)

"""The two CPU backends — "native" (normlab's kernels, native_backend) and "cpu" (ATen's, cpu_backend) —
against the portable torch backend and normlab.reference.

Every case runs the method with the backend named and compares the output and every gradient (x, weight,
bias and, for SN, the mixing logits) with the NumPy float64 reference, and in float32 with the torch
backend. Each case runs twice (the `route` fixture): as is, and with the backend's size thresholds set to 0
— the "cpu" backend takes other routes below them (ATen's own batch norm; the torch backend for SN), the
"native" one runs its parallel loops and non-temporal stores only above them — so every route is covered on
small shapes. Then what does not apply falls back (channels_last, float16 for "native", tiny SN for "cpu"),
a large common offset and constant inputs stay exact, float64 gradcheck, and what autograd keeps for
backward. The native backend's plans and nodes themselves: test_native_plans.py.
"""

import math
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck
from torch.autograd.graph import saved_tensors_hooks

import normlab.functional as NF
from conftest import TOL, assert_close, randn
from normlab import reference
from normlab._layout import to_view
from normlab.functional._prepared import clear_prepared
from normlab.kernels import NormSpec, SwitchSpec, cpu_backend, native_backend, select_backend

EPS = 1e-5


@dataclass(frozen=True)
class Case:
    method: str  # bn, gn, in, ln (trailing dims), sn
    shape: tuple
    kwargs: dict = field(default_factory=dict)  # groups / normalized_ndim / sources / authors_compat
    channels_last: bool = False

    @property
    def id(self):
        extra = "-".join(f"{k}={v}" for k, v in self.kwargs.items())
        return "-".join(filter(None, [self.method, "x".join(map(str, self.shape)), extra,
                                      "cl" if self.channels_last else ""]))


CASES = [
    Case("bn", (3, 5, 7)),  # BN on (N, C, L): per-(n, c) moments pooled over n
    Case("bn", (4, 6, 5, 3)),  # 4-d, non-power-of-two sizes
    Case("bn", (4, 3, 1, 1)),  # 1x1 spatial: each (n, c) cell holds one value (σ²_nc = 0)
    Case("bn", (2, 4, 3, 3)),  # batch 2, as in the study
    Case("bn", (5, 3)),  # (N, C): BatchNorm1d without positions
    Case("bn", (2, 3, 2, 3, 2)),  # 5-d input
    Case("bn", (3, 4, 5, 2), channels_last=True),  # channels_last ("cpu": moments + batch-norm pass, ATen backward)
    # channels_last, natively: rows of C channels, each thread a share of the rows; more than 1024 rows of a
    # slab (the chunked sums leave a tail), a 5-d input (channels_last_3d)
    Case("gn", (2, 6, 4, 3), {"groups": 3}, channels_last=True),
    Case("in", (2, 5, 3, 3), channels_last=True),
    Case("gn", (2, 4, 40, 30), {"groups": 2}, channels_last=True),
    Case("bn", (3, 5, 20, 20), channels_last=True),
    Case("in", (2, 3, 2, 550), channels_last=True),
    Case("gn", (2, 4, 2, 3, 2), {"groups": 2}, channels_last=True),
    Case("sn", (2, 3, 4, 5), channels_last=True),  # SN: its moments, output and dx passes by columns
    Case("sn", (3, 4, 3, 3), {"sources": ("in", "ln")}, channels_last=True),
    Case("sn", (3, 2, 2, 2, 3), channels_last=True),
    Case("gn", (2, 6, 5), {"groups": 3}),  # 2 channels per group
    Case("gn", (2, 6, 4, 3), {"groups": 1}),  # G = 1: SPEC's LN with per-channel affine
    Case("gn", (2, 6, 4, 3), {"groups": 6}),  # G = C: IN
    Case("gn", (2, 4, 1, 1), {"groups": 2}),  # 1x1 spatial: statistics over the group's channels
    Case("in", (2, 3, 7)),  # per (n, c), 1d
    Case("in", (2, 5, 3, 3)),  # 2d, batch 2
    Case("ln", (3, 2, 5), {"normalized_ndim": 1}),  # transformer rows: over the last dim
    Case("ln", (2, 3, 5, 4), {"normalized_ndim": 3}),  # over (C, H, W), elementwise affine
    Case("ln", (9, 4, 7), {"normalized_ndim": 1}),  # 36 rows: native γ, β gradients by rows, not by columns
    Case("ln", (17, 3, 2, 2), {"normalized_ndim": 3}),  # over (C, H, W), 17 samples: by rows, an odd count
    Case("sn", (2, 3, 4, 5)),  # all three sources, batch 2
    Case("sn", (3, 4, 3), {"sources": ("in", "ln")}),  # using_bn=False
    Case("sn", (4, 3), {"sources": ("ln", "bn")}),  # (N, C): SwitchNorm1d, one position per channel
    Case("sn", (2, 3, 3, 4), {"authors_compat": True}),  # the authors' unbiased IN variance
    Case("sn", (3, 2, 2, 2, 3)),  # 5-d input
    # long segments: the native kernels' chunked sums (1024) and vector lanes (64) both leave a tail
    Case("gn", (2, 4, 1100), {"groups": 2}),
    Case("bn", (3, 2, 1031)),
    Case("ln", (3, 2500), {"normalized_ndim": 1}),  # (few rows: γ, β gradients by columns of 1024)
    Case("ln", (40, 1100), {"normalized_ndim": 1}),  # (many rows: by rows)
    # sets of more than 2^14 values: the native kernels' blocked moments (blocks of 4096, merged)
    Case("bn", (3, 2, 7001)),
    Case("ln", (2, 20000), {"normalized_ndim": 1}),
    # fewer sets than threads, each of 2·4096 values or more: the native kernels share one set among threads
    Case("ln", (1, 20000), {"normalized_ndim": 1}),
    Case("gn", (1, 2, 9000), {"groups": 1}),
    Case("bn", (3, 1, 5000)),
    # BN over 2^20 values or more in runs shorter than 2048: the native kernels sweep (n, c) cells in order
    Case("bn", (16, 64, 1030)),
]

LOW_PRECISION = [  # bf16/fp16: ATen's mixed-precision kernels with float32 statistics
    Case("bn", (4, 6, 5, 3)),
    Case("gn", (2, 6, 4, 3), {"groups": 3}),
    Case("in", (2, 5, 3, 3)),
    Case("ln", (3, 2, 16), {"normalized_ndim": 1}),
    Case("ln", (1, 5, 4096), {"normalized_ndim": 2}),  # one long row: blocked, or shared by the threads
    Case("sn", (2, 3, 4, 5)),
    Case("gn", (2, 6, 4, 3), {"groups": 3}, channels_last=True),
    Case("bn", (4, 6, 5, 3), channels_last=True),
    Case("sn", (2, 3, 4, 5), channels_last=True),
]


@pytest.fixture(params=["native", "cpu"])
def backend(request):
    if request.param == "native" and native_backend.library() is None:
        pytest.skip("the native kernels could not be built here (see the warning)")
    return request.param


@pytest.fixture(params=["small-route", "large-route"])
def route(request, monkeypatch):
    """Run each case on both sides of the backends' size thresholds."""
    if request.param == "large-route":  # and at least two threads, so that work is shared
        threads = torch.get_num_threads()
        torch.set_num_threads(max(threads, 2))
        request.addfinalizer(lambda: torch.set_num_threads(threads))
        monkeypatch.setattr(cpu_backend, "SMALL", 0)
        monkeypatch.setattr(cpu_backend, "SWITCH_SMALL", 0)
        monkeypatch.setattr(native_backend, "PARALLEL_MIN", 0)
        monkeypatch.setattr(native_backend, "LARGE_MIN", 0)
        clear_prepared()  # calls planned under the other thresholds
        request.addfinalizer(clear_prepared)
    return request.param


NATIVE_CHANNELS_LAST = ("bn", "gn", "in", "sn")  # the methods that the native kernels run on channels_last inputs


def skip_unsupported(case, backend, dtype=torch.float32):
    if backend == "native" and (case.channels_last and case.method not in NATIVE_CHANNELS_LAST
                                or dtype == torch.float16):
        pytest.skip("native takes float32/bfloat16/float64 inputs, contiguous or channels_last BN/GN/IN/SN "
                    "(others: test_*_fall_back)")
    if backend == "cpu" and case.channels_last and case.method != "bn":
        pytest.skip("cpu takes channels_last BN only (others: test_*_fall_back)")


def make_inputs(case, dtype, offset=0.0):
    c = case.shape[1] if len(case.shape) > 1 else 1
    x = randn(*case.shape, seed=1, dtype=torch.float64) + offset
    if case.method == "ln":
        pshape = case.shape[len(case.shape) - case.kwargs["normalized_ndim"]:]
    else:
        pshape = (c,)
    p = {"weight": 1.0 + 0.5 * randn(*pshape, seed=2, dtype=torch.float64),
         "bias": randn(*pshape, seed=3, dtype=torch.float64)}
    if case.method == "sn":
        k = len(case.kwargs.get("sources", ("in", "ln", "bn")))
        p["mean_logits"] = randn(k, seed=4, dtype=torch.float64)
        p["var_logits"] = randn(k, seed=5, dtype=torch.float64)
    x = x.to(dtype)
    if case.channels_last:
        x = x.contiguous(memory_format=torch.channels_last if x.dim() == 4 else torch.channels_last_3d)
    return x, {k: v.to(torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype) for k, v in p.items()}


def call(case, x, p, backend):
    kw = case.kwargs
    if case.method == "bn":
        return NF.batch_norm(x, None, None, p["weight"], p["bias"], True, 0.1, EPS, backend=backend)
    if case.method == "gn":
        return NF.group_norm(x, kw["groups"], p["weight"], p["bias"], EPS, backend=backend)
    if case.method == "in":
        return NF.instance_norm(x, None, None, p["weight"], p["bias"], True, 0.1, EPS, backend=backend)
    if case.method == "ln":
        return NF.layer_norm(x, p["weight"].shape, p["weight"], p["bias"], EPS, backend=backend)
    return NF.switch_norm(x, p["mean_logits"], p["var_logits"], p["weight"], p["bias"], training=True, eps=EPS,
                          sources=kw.get("sources", ("in", "ln", "bn")),
                          authors_compat=kw.get("authors_compat", False), backend=backend)


def run(case, x, p, backend, dy):
    """(output, {name: gradient}) of one call with every input differentiable."""
    x = x.detach().clone().requires_grad_()
    p = {k: v.detach().clone().requires_grad_() for k, v in p.items()}
    out = call(case, x, p, backend)
    out.backward(dy.to(out.dtype))
    return out.detach(), {"x": x.grad, **{k: v.grad for k, v in p.items()}}


def reference_run(case, x, p, dy):
    """The float64 NumPy oracle: (output, {name: gradient}) with the names of `run`."""
    a = lambda t: t.detach().double().numpy()  # noqa: E731
    xa, w, b, g = a(x), a(p["weight"]), a(p["bias"]), a(dy)
    kw = case.kwargs
    if case.method == "bn":
        out, cache = reference.batch_norm.forward(xa, w, b, EPS)
        grads = reference.batch_norm.backward(g, cache)
    elif case.method == "gn":
        out, cache = reference.group_norm.forward(xa, w, b, kw["groups"], EPS)
        grads = reference.group_norm.backward(g, cache)
    elif case.method == "in":
        out, cache = reference.instance_norm.forward(xa, w, b, EPS)
        grads = reference.instance_norm.backward(g, cache)
    elif case.method == "ln":
        out, cache = reference.layer_norm.forward(xa, w, b, kw["normalized_ndim"], EPS)
        grads = reference.layer_norm.backward(g, cache)
    else:
        out, cache = reference.switch_norm.forward(
            xa, w, b, a(p["mean_logits"]), a(p["var_logits"]), sources=kw.get("sources", ("in", "ln", "bn")),
            eps=EPS, unbiased_in_var=kw.get("authors_compat", False))
        grads = reference.switch_norm.backward(g, cache)
    names = {"gamma": "weight", "beta": "bias"}
    grads = {names.get(k, k): torch.from_numpy(np.asarray(v)) for k, v in grads.items()}
    return torch.from_numpy(np.asarray(out)), grads


F64_TOL = {"rtol": 1e-9, "atol": 1e-9}  # ATen's float64 kernels against the float64 oracle


def check_against(out, grads, ref_out, ref_grads, tol):
    torch.testing.assert_close(out.double(), ref_out, msg="output", **tol)
    for name, grad in grads.items():
        torch.testing.assert_close(grad.double(), ref_grads[name].reshape(grad.shape), msg=f"grad {name}", **tol)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["float64", "float32"])
def test_matches_reference_and_torch_backend(case, dtype, backend, route):
    skip_unsupported(case, backend)
    x, p = make_inputs(case, dtype)
    dy = randn(*case.shape, seed=6, dtype=dtype)
    out, grads = run(case, x, p, backend, dy)
    ref_out, ref_grads = reference_run(case, x, p, dy)
    check_against(out, grads, ref_out, ref_grads, F64_TOL if dtype == torch.float64 else TOL[dtype])
    t_out, t_grads = run(case, x, p, "torch", dy)
    tol = F64_TOL if dtype == torch.float64 else TOL[dtype]
    torch.testing.assert_close(out, t_out, **tol)
    for name in grads:
        torch.testing.assert_close(grads[name], t_grads[name], msg=f"grad {name} vs torch backend", **tol)
    if case.channels_last:  # the layout is kept, for the output and the input gradient
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert out.is_contiguous(memory_format=fmt) and grads["x"].is_contiguous(memory_format=fmt)


@pytest.mark.parametrize("case", LOW_PRECISION, ids=lambda c: c.id)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bfloat16", "float16"])
@pytest.mark.parametrize("params", ["float32", "input"], ids=["float32-params", "input-dtype-params"])
def test_low_precision(case, dtype, params, backend, route):
    """Output and gradients are the float64 result rounded to the input dtype (conftest's tolerances), with
    float32 parameters or parameters in the input's dtype (the native kernels read bfloat16 ones as they are)."""
    skip_unsupported(case, backend, dtype)
    x, p = make_inputs(case, dtype)
    if params == "input":
        p = {k: v.to(dtype) for k, v in p.items()}
    dy = randn(*case.shape, seed=6, dtype=dtype)
    out, grads = run(case, x, p, backend, dy)
    assert out.dtype == dtype and grads["x"].dtype == dtype
    ref_out, ref_grads = reference_run(case, x, p, dy)
    check_against(out, grads, ref_out, ref_grads, TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64, torch.float16], ids=str)
def test_auto_picks_a_cpu_backend_for_contiguous_cpu_tensors(dtype):
    """"native" where it runs (float16: "cpu"); "cpu" when the native kernels are not built."""
    expected = native_backend if dtype != torch.float16 and native_backend.library() is not None else cpu_backend
    x = randn(4, 8, 5, 5, dtype=dtype)
    for dims_of in ("group_dims", "batch_dims"):
        xv, view = to_view(x, 8 if dims_of == "batch_dims" else 2)
        spec = NormSpec(getattr(view, dims_of), view.affine_shape(xv.shape[1]), view)
        assert select_backend("auto", xv, spec) is expected
    assert select_backend("auto", x.view(40, 20), NormSpec((1,), (1, 20))) is expected  # LN rows
    # channels_last: native for BN, GN and IN too; "cpu" only for BN (ATen's channels_last GN cancels)
    channels_last = x.contiguous(memory_format=torch.channels_last)
    for dims_of, groups in (("group_dims", 2), ("batch_dims", 8)):
        xv, view = to_view(channels_last, groups)
        spec = NormSpec(getattr(view, dims_of), view.affine_shape(groups), view)
        if expected is native_backend or dims_of == "batch_dims":
            assert select_backend("auto", xv, spec) is expected


FALLBACKS = [
    # channels_last GN/IN/SN: ATen's kernels compute E[x²] − E[x]² there (cancels under an offset): "cpu" hands
    # them on; the native kernels run them (and BN) themselves
    Case("gn", (2, 6, 4, 3), {"groups": 3}, channels_last=True),
    Case("in", (2, 5, 3, 3), channels_last=True),
    Case("gn", (2, 6, 4, 3), {"groups": 1}, channels_last=True),
    Case("sn", (2, 3, 4, 5), channels_last=True),  # SN channels_last
]


@pytest.mark.parametrize("case", FALLBACKS + [Case("bn", (3, 4, 5, 2), channels_last=True)], ids=lambda c: c.id)
def test_unsupported_layouts_fall_back(case, backend):
    if backend == "cpu" and case.method == "bn":
        pytest.skip("the cpu backend runs channels_last BN")
    if backend == "native" and case.method in NATIVE_CHANNELS_LAST:
        pytest.skip("the native backend runs channels_last BN, GN, IN and SN")
    x, p = make_inputs(case, torch.float32)
    with pytest.raises(ValueError, match="cannot run this call"):
        call(case, x, p, backend)
    dy = randn(*case.shape, seed=6)
    out, grads = run(case, x, p, "auto", dy)
    t_out, t_grads = run(case, x, p, "torch", dy)
    assert_close(out, t_out)
    for name in grads:
        assert_close(grads[name], t_grads[name])
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("case", [c for c in CASES if not c.channels_last][::2] + [c for c in CASES if c.channels_last],
                         ids=lambda c: c.id)
def test_large_offset_stays_accurate(case, backend, route):
    """x = 1e4 + noise: float32 output within 5e-3 of float64 (SPEC §2), gradients as accurate as the torch
    backend's. "cpu" sees |μ|/σ > OFFSET_LIMIT and hands the call to the torch backend (the same numbers);
    "native" centres x itself (the corrected two-pass moments, dx from x − μ)."""
    skip_unsupported(case, backend)
    x, p = make_inputs(case, torch.float32, offset=1e4)
    dy = randn(*case.shape, seed=6)
    out, grads = run(case, x, p, backend, dy)
    ref_out, ref_grads = reference_run(case, x, p, dy)
    torch.testing.assert_close(out.double(), ref_out, rtol=0, atol=5e-3)
    t_out, t_grads = run(case, x, p, "torch", dy)
    if backend == "cpu":
        torch.testing.assert_close(out, t_out, rtol=0, atol=1e-6)
    for name in grads:  # the same order of error as the torch backend (4x its distance from float64, or 1e-5)
        ref = ref_grads[name].reshape(grads[name].shape)
        allowed = max(4 * float((t_grads[name].double() - ref).abs().max()), 1e-5)
        torch.testing.assert_close(grads[name].double(), ref, rtol=0, atol=allowed, msg=f"grad {name}")


@pytest.mark.parametrize("offset", [0.0, 1e4], ids=["centred", "offset"])
@pytest.mark.parametrize("method", ["gn", "bn"])
def test_outlier_first_in_a_set_read_once_stays_accurate(method, offset, backend, route):
    """Sets whose first value is a far outlier, of the kinds the native kernels read once, shifted by that first
    value: GN's contiguous sets of 256 values, BN's channels of 4 strided runs (1024 values). The float32 output
    is as close to float64 as the torch backend's."""
    x = randn(4, 8, 256, seed=1, dtype=torch.float64)
    x[0 if method == "bn" else slice(None), :, 0] = 100.0  # the first value of every set
    x = (x + offset).float()

    def norm(t, backend):
        if method == "gn":
            return NF.group_norm(t, 8, backend=backend)
        return NF.batch_norm(t, None, None, training=True, backend=backend)

    expected = norm(x.double(), "torch")
    allowed = max(2 * float((norm(x, "torch").double() - expected).abs().max()), 1e-5)
    torch.testing.assert_close(norm(x, backend).double(), expected, rtol=0, atol=allowed)


@pytest.mark.parametrize("method", ["bn", "gn", "in", "ln", "sn"])
@pytest.mark.parametrize("value", [0.0, -1e4], ids=["zero", "offset"])
def test_constant_input(method, value, backend, route):
    """Zero variance: the output is the bias and every gradient is finite."""
    case = {"bn": Case("bn", (4, 3, 5, 5)), "gn": Case("gn", (2, 6, 5), {"groups": 3}),
            "in": Case("in", (2, 3, 7)), "ln": Case("ln", (3, 2, 5), {"normalized_ndim": 1}),
            "sn": Case("sn", (2, 3, 4, 5))}[method]
    _, p = make_inputs(case, torch.float32)
    x = torch.full(case.shape, value)
    out, grads = run(case, x, p, backend, randn(*case.shape, seed=6))
    bias = p["bias"] if method == "ln" else p["bias"].view(1, -1, *([1] * (len(case.shape) - 2)))
    torch.testing.assert_close(out, bias.expand_as(out), rtol=0, atol=1e-2)
    assert all(torch.isfinite(g).all() for g in grads.values())


def test_eps_zero_with_constant_cells(backend, route):
    """BN with ε = 0 where every (n, c) cell is constant but the channels are not: finite, exact."""
    case = Case("bn", (4, 3, 5, 5))
    x = torch.arange(4.0).view(4, 1, 1, 1).expand(case.shape).contiguous()
    _, p = make_inputs(case, torch.float32)
    out = NF.batch_norm(x, None, None, p["weight"], p["bias"], True, 0.1, 0.0, backend=backend)
    expected = NF.batch_norm(x, None, None, p["weight"], p["bias"], True, 0.1, 0.0, backend="torch")
    assert_close(out, expected)


@pytest.mark.parametrize("method", ["bn", "in", "sn"])
def test_running_statistics_match_torch_backend(method, backend, route):
    """The batch statistics the backend returns (mean, biased var) feed the running estimates."""
    shape = (4, 3, 5, 5)
    x = randn(*shape, seed=1)
    buffers = {}
    for name in (backend, "torch"):
        rm, rv = torch.zeros(3), torch.ones(3)
        if method == "bn":
            NF.batch_norm(x, rm, rv, None, None, True, 0.1, EPS, backend=name)
        elif method == "in":
            NF.instance_norm(x, rm, rv, None, None, True, 0.1, EPS, backend=name)
        else:
            NF.switch_norm(x, torch.zeros(3), torch.zeros(3), None, None, rm, rv, True, 0.1, EPS, backend=name)
        buffers[name] = (rm, rv)
    for got, want in zip(buffers[backend], buffers["torch"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


GRADCHECK = [
    ("bn", lambda x, w, b, be: NF.batch_norm(x, None, None, w, b, True, backend=be), (3, 2, 2, 2)),
    ("gn", lambda x, w, b, be: NF.group_norm(x, 2, w, b, backend=be), (2, 4, 3)),
    ("in", lambda x, w, b, be: NF.instance_norm(x, None, None, w, b, backend=be), (2, 2, 2, 2)),
    ("ln", lambda x, w, b, be: NF.layer_norm(x, (2, 3), w.view(2, 3), b.view(2, 3), backend=be), (2, 2, 3)),
]


@pytest.mark.parametrize("name,fn,shape", GRADCHECK, ids=[g[0] for g in GRADCHECK])
def test_gradcheck_float64(name, fn, shape, backend, route):
    """First order through the backend's kernels; double backward through the torch backend's closed form."""
    c = 6 if name == "ln" else shape[1]
    x = randn(*shape, seed=1, dtype=torch.float64).requires_grad_()
    w = (1 + 0.5 * randn(c, seed=2, dtype=torch.float64)).requires_grad_()
    b = randn(c, seed=3, dtype=torch.float64).requires_grad_()
    assert gradcheck(lambda *t: fn(*t, backend), (x, w, b))
    assert gradgradcheck(lambda *t: fn(*t, backend), (x, w, b))


def test_gradcheck_switch_norm_float64(backend, route):
    def fn(x, w, b, ml, vl):
        return NF.switch_norm(x, ml, vl, w, b, training=True, backend=backend)

    x = randn(2, 3, 2, 2, seed=1, dtype=torch.float64).requires_grad_()
    inputs = [x] + [randn(*s, seed=k, dtype=torch.float64).requires_grad_() for k, s in
                    enumerate([(3,), (3,), (3,), (3,)], start=2)]
    assert gradcheck(fn, tuple(inputs))
    assert gradgradcheck(fn, tuple(inputs))  # the native node's double backward: the torch backend's closed form


@pytest.mark.parametrize("sources", [("in", "ln", "bn"), ("ln", "bn"), ("in", "ln")], ids="+".join)
@pytest.mark.parametrize("authors_compat", [False, True], ids=["ours", "authors"])
def test_switch_norm_eval_and_partial_gradients(sources, authors_compat, backend, route):
    """Eval mode with a running BN source (constants in the mix), gradients of only some inputs, and bias without
    weight — each against the torch backend, float64."""
    shape = (3, 4, 2, 3) if "in" in sources else (5, 4)
    x = randn(*shape, seed=1, dtype=torch.float64)
    ml, vl = randn(len(sources), seed=2, dtype=torch.float64), randn(len(sources), seed=3, dtype=torch.float64)
    b = randn(4, seed=4, dtype=torch.float64)
    rm, rv = 0.1 * randn(4, seed=5, dtype=torch.float64), torch.linspace(0.5, 2.0, 4, dtype=torch.float64)
    dy = randn(*shape, seed=6, dtype=torch.float64)
    for training, wanted in ((False, "x"), (False, "mean_logits"), (True, "bias"), (True, "var_logits")):
        results = []
        for name in (backend, "torch"):
            inputs = {"x": x.clone(), "mean_logits": ml.clone(), "var_logits": vl.clone(), "bias": b.clone()}
            inputs[wanted].requires_grad_()
            y = NF.switch_norm(inputs["x"], inputs["mean_logits"], inputs["var_logits"], None, inputs["bias"], rm, rv,
                               training, 0.1, EPS, sources=sources, authors_compat=authors_compat, backend=name)
            (grad,) = torch.autograd.grad(y, inputs[wanted], dy)
            results.append((y.detach(), grad))
        for got, want in zip(*results, strict=True):
            torch.testing.assert_close(got, want, **F64_TOL)


@pytest.mark.parametrize("case", [Case("bn", (4, 8, 6, 6)), Case("gn", (4, 8, 6, 6), {"groups": 4}),
                                  Case("ln", (4, 8, 36), {"normalized_ndim": 1}), Case("sn", (4, 8, 6, 6))],
                         ids=lambda c: c.id)
def test_saves_only_input_and_statistics(case, backend, route):
    """Kept for backward: the input's storage plus O(N·C) values (and the parameters)."""
    x, p = make_inputs(case, torch.float32)
    x.requires_grad_()
    p = {k: v.requires_grad_() for k, v in p.items()}
    storages = {}

    def pack(t):
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with saved_tensors_hooks(pack, lambda t: t):
        call(case, x, p, backend)
    params = sum(v.numel() * v.element_size() for v in p.values())
    small = 4 * 8 * 2 * 8  # mean and rstd per (n, c) in float64-sized slots: generous O(N·C)
    assert x.untyped_storage().data_ptr() in storages
    assert sum(storages.values()) <= x.numel() * x.element_size() + params + small


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_native_contract_functions_match_torch_backend(dtype, route):
    """The native backend's contract functions (the feature norms' ctypes path, SN's pair; normlab.functional uses
    their C++ nodes) agree with the portable torch backend on every kind of view."""
    if native_backend.library() is None:
        pytest.skip("the native kernels could not be built here (see the warning)")
    from normlab.kernels import torch_backend

    tol = F64_TOL if dtype == torch.float64 else TOL[dtype]
    x = randn(4, 6, 5, 3, seed=1, dtype=dtype)
    calls = [(randn(7, 20, seed=5, dtype=dtype), NormSpec((1,), (1, 20)))]  # LN over trailing dims
    for groups, dims_of in ((3, "group_dims"), (6, "batch_dims")):  # GN, BN
        xv, view = to_view(x, groups)
        calls.append((xv, NormSpec(getattr(view, dims_of), view.affine_shape(groups), view)))
    for xv, spec in calls:
        channels = math.prod(spec.affine_shape)
        w = (1 + 0.5 * randn(channels, seed=2, dtype=dtype)).view(spec.affine_shape)
        b = randn(channels, seed=3, dtype=dtype).view(spec.affine_shape)
        dy = randn(*xv.shape, seed=4, dtype=dtype)
        got, want = native_backend.forward(xv, w, b, spec, EPS), torch_backend.forward(xv, w, b, spec, EPS)
        for g, t in zip(got[:3], want[:3], strict=True):
            torch.testing.assert_close(g, t.to(g.dtype), **tol)
        needs = (True, True, True)
        grads = native_backend.backward(dy, xv, w, want[1], want[2], spec, needs)
        expected = torch_backend.backward(dy, xv, w, want[1], want[2], spec, needs)
        for g, t in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, t.to(g.dtype), **tol)
    # Switchable Norm's pair (the same C++ as its node), with a running BN source and with the batch's
    w, b = 1 + 0.5 * randn(6, seed=2, dtype=dtype), randn(6, seed=3, dtype=dtype)
    ml, vl = randn(3, seed=6, dtype=dtype), randn(3, seed=7, dtype=dtype)
    xv, view = to_view(x, 6)
    shape = view.affine_shape(6)
    rm, rv = 0.1 * randn(6, seed=8, dtype=dtype).view(shape), torch.linspace(0.5, 2, 6, dtype=dtype).view(shape)
    dy = randn(*xv.shape, seed=4, dtype=dtype)
    for running_bn in (False, True):
        spec = SwitchSpec(view, ("in", "ln", "bn"), running_bn, False, shape)
        args = (xv, w.view(shape), b.view(shape), ml, vl, rm, rv, spec, EPS)
        got, want = native_backend.switch_forward(*args), torch_backend.switch_forward(*args)
        for g, t in zip(got, want, strict=True):
            if t is None:
                assert g is None
            else:
                torch.testing.assert_close(g, t.to(g.dtype), **tol)
        backward_args = (dy, xv, w.view(shape), ml, vl, rm, rv, *want[1:3], spec, EPS, (True,) * 5)
        grads = native_backend.switch_backward(*backward_args)
        expected = torch_backend.switch_backward(*backward_args)
        for g, t in zip(grads, expected, strict=True):
            torch.testing.assert_close(g, t.to(g.dtype), **tol)

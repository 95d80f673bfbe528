"""The native CPU backend's own surface: its plans (statistics, running estimates updated in the call), the
batch counter, and the C++ nodes that autograd records. Its kernels' numbers are tested with every other CPU
backend's in test_cpu_backends.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
import normlab.functional as NF
from conftest import TOL, randn
from normlab._layout import to_view
from normlab.kernels import NormSpec, native_backend

EPS = 1e-5


@pytest.fixture(autouse=True)
def _native_library():
    if native_backend.library() is None:
        pytest.skip("the native kernels could not be built here (see the warning)")


def test_native_plans_return_the_statistics_where_the_caller_takes_them():
    """A native plan's (y, mean, rstd, var): var is the biased σ² that BN's and IN's running estimates take; a plan
    bound without statistics (GN, LN: y alone) returns None for all three, and its node still has what it saves."""
    x = randn(4, 6, 5, 3, seed=1)
    xv, view = to_view(x, 6)
    _, _, _, var = native_backend.bind(xv, NormSpec(view.batch_dims, view.affine_shape(6), view))(x, None, None, EPS)
    torch.testing.assert_close(var.reshape(-1), x.var(dim=(0, 2, 3), unbiased=False), **TOL[torch.float32])
    rows = randn(7, 20, seed=5).requires_grad_()
    y, mean, rstd, var = native_backend.bind(rows, NormSpec((1,), (1, 20)), statistics=False)(rows, None, None, EPS)
    assert mean is None and rstd is None and var is None
    y.backward(torch.ones_like(y))  # Σ over a row of dx is 0 (dx is orthogonal to the constant direction)
    torch.testing.assert_close(rows.grad.sum(1), torch.zeros(7), atol=1e-5, rtol=0)
    torch.testing.assert_close(y, NF.layer_norm(rows, (20,)), **TOL[torch.float32])


@pytest.mark.parametrize("method", ["bn", "in"])
@pytest.mark.parametrize("buffers", ["contiguous", "strided"])
def test_native_plans_update_running_estimates_in_the_call(method, buffers):
    """BN's and IN's training calls hand their running estimates to the native plan, which updates them in C++:
    by one loop for contiguous buffers, by tensor ops for others (here strided views). Both agree with torch's;
    a plan bound without statistics refuses them rather than skip the update."""
    functional = {"bn": (NF.batch_norm, F.batch_norm), "in": (NF.instance_norm, F.instance_norm)}[method]
    estimates = []
    for fn in functional:
        store = torch.stack([torch.zeros(6), torch.ones(6)], dim=1)  # (6, 2): columns are strided views
        rm, rv = (store[:, 0], store[:, 1]) if buffers == "strided" else (store[:, 0].clone(), store[:, 1].clone())
        assert rm.is_contiguous() == (buffers == "contiguous")
        for seed in range(3):
            fn(randn(4, 6, 5, 3, seed=seed) * 3 + 2, rm, rv, None, None, True, 0.25, EPS)
        estimates.append((rm, rv))
    for got, want in zip(*estimates, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    x = randn(4, 6, 5, 3, seed=1)
    xv, view = to_view(x, 2)
    plan = native_backend.bind(xv, NormSpec(view.group_dims, None, view), statistics=False)
    with pytest.raises(RuntimeError, match="running estimates given to a plan bound without statistics"):
        plan(x, None, None, EPS, torch.zeros(6), torch.ones(6), 0.1)


def test_num_batches_tracked_counts_like_torch():
    """The counter is incremented natively on the CPU; its value and version counter move as torch's add_ moves
    them (one bump per training step, none in eval)."""
    module, torch_module = normlab.BatchNorm2d(3), nn.BatchNorm2d(3)
    x = randn(2, 3, 4, 4, seed=1)
    for _ in range(3):
        module(x), torch_module(x)
    module.eval(), torch_module.eval()
    module(x), torch_module(x)
    assert module.num_batches_tracked.item() == torch_module.num_batches_tracked.item() == 3
    assert module.num_batches_tracked._version == torch_module.num_batches_tracked._version
    assert not native_backend.count_batch(torch.zeros((), dtype=torch.int32))  # not int64: left to add_


def test_native_nodes_are_the_ones_recorded():
    """Contiguous CPU calls record the native library's C++ nodes (not a Python Function, which costs more per call
    than a small layer's kernels); channels_last SN and a whole-tensor WN norm record the Python Functions."""
    from normlab.functional import weight_normalized

    x = randn(2, 4, 3, 3, seed=1).requires_grad_()
    logits = torch.zeros(3, requires_grad=True)
    assert NF.group_norm(x, 2).grad_fn.name() == "FeatureNormBackward"
    assert NF.switch_norm(x, logits, logits, training=True).grad_fn.name() == "SwitchNormBackward"
    channels_last = x.contiguous(memory_format=torch.channels_last)
    assert NF.switch_norm(channels_last, logits, logits, training=True).grad_fn.name() != "SwitchNormBackward"
    v = randn(5, 4, 3, seed=2).requires_grad_()
    g = torch.ones(5, 1, 1, requires_grad=True)
    assert weight_normalized(v, g, 0).grad_fn.name() == "WeightNormBackward"
    g_middle = torch.ones(1, 4, 1, requires_grad=True)  # the middle axis: not what the fused kernels take
    assert weight_normalized(v, g_middle, 1).grad_fn.name() != "WeightNormBackward"


# (v's shape, dim, what it exercises); rows of 99 values end in a partial vector block, rows of 1500 span chunks
WEIGHT_NORM_BACKWARD_CASES = [
    ((7, 33, 3), 0, "native rows"),
    ((5, 1500), 0, "native rows longer than a chunk"),
    ((7, 33, 3), 0, "native rows of a permuted tensor"),
    ((6, 4, 5), 2, "last axis: ATen's kernel"),
]


@pytest.mark.parametrize("route", ["one thread", "two threads", "streamed"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shape,dim,what", WEIGHT_NORM_BACKWARD_CASES, ids=[c[2] for c in WEIGHT_NORM_BACKWARD_CASES])
def test_weight_norm_node_backward_is_the_closed_form(shape, dim, what, dtype, route, monkeypatch):
    """The node's first-order backward against the closed form in float64, which test_weight_norm.py checks against
    the NumPy reference. By rows the native kernel runs for bfloat16 (on one thread, on several) and for float32
    weights large enough to stream ∇v (here all: "streamed"); ATen's kernel for the rest."""
    from normlab.functional.weight_norm import closed_form_backward, weight_normalized

    if route != "one thread":
        monkeypatch.setattr(native_backend, "PARALLEL_MIN", 1)
    if route == "streamed":
        monkeypatch.setattr(native_backend, "LARGE_MIN", 3)
    g_shape = [1] * len(shape)
    g_shape[dim] = shape[dim]
    v = randn(*shape, seed=3).to(dtype)
    if "permuted" in what:  # a view with v's shape and reversed strides
        v = randn(*reversed(shape), seed=3).to(dtype).permute(*reversed(range(len(shape))))
    v.requires_grad_()
    g = (0.5 + randn(*g_shape, seed=4).abs()).to(dtype).requires_grad_()
    dw = randn(*shape, seed=5).to(dtype)
    w = weight_normalized(v, g, dim)
    assert w.grad_fn.name() == "WeightNormBackward"
    w.backward(dw)
    dv, dg = closed_form_backward(dw.double(), v.detach().double(), g.detach().double(), dim)
    assert v.grad.dtype == dtype and g.grad.dtype == dtype
    torch.testing.assert_close(v.grad.double(), dv, **TOL[dtype])
    torch.testing.assert_close(g.grad.double(), dg, **TOL[dtype])

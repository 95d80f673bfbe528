"""Weight Normalization: the reparametrization against the NumPy reference and against torch's weight_norm,
its gradients (SPEC §1) and their property ∇v ⟂ v, serialization, torch.compile, removal, the paper's
data-dependent initialization, the registry, and clear errors."""

import copy
import io
import pickle

import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm as torch_weight_norm

from normlab.nn.weight_norm import (
    WeightNorm,
    is_weight_normed,
    remove_weight_norm,
    weight_norm,
    weight_norm_init_,
    weight_normalized,
)
from normlab.reference import weight_norm as ref
from normlab.registry import norm_kind, wrap_layer

# Tolerances (rtol = atol):
# - float64 vs the NumPy reference: same closed forms in double precision, a few ulps apart.
# - float32 vs torch's weight_norm: both round w = v·(g/‖v‖) in float32, in a different order of operations,
#   and layer gradients accumulate over the batch: a few float32 ulps of O(1) values.
# - ∇v ⟂ v: a sum of products of O(1) values, zero up to rounding.
TOL = {
    torch.float64: 1e-10,
    torch.float32: 2e-5,
}


def close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, check_dtype=False)


def randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# (v shape, dim, why)
REPARAM_CASES = [
    ((4, 3), 0, "Linear weight: one norm per output row"),
    ((4, 3), 1, "Linear weight normalized per input column (last axis)"),
    ((5, 3, 3, 2), 0, "Conv2d weight, non-square kernel"),
    ((3, 5, 2, 2), 1, "ConvTranspose2d weight (in, out, k, k): per output channel"),
    ((4, 3, 2), 2, "a middle/last axis: norm_except_dim's transpose path"),
    ((4, 3, 2), -1, "negative dim counts from the end (== 2)"),
    ((4, 3, 3), None, "dim=None: one norm over the whole tensor, g is 0-d"),
    ((6,), 0, "1-D weight: one norm per element, w = g·sign(v)"),
]


def _norm_axes(v, dim):
    """Every axis but dim (all for None)."""
    return [a for a in range(v.dim()) if dim is None or a != dim % v.dim()]


def _sum(t, axes, keepdim=False):
    # torch reads sum(dim=[]) as "sum everything"; a 1-D weight normalized per element reduces nothing
    return t.sum(axes, keepdim=keepdim) if axes else t


def _g_for(v, dim):
    """A positive g with torch's norm_except_dim layout, different from ‖v‖."""
    if dim is None:
        return torch.tensor(1.7, dtype=v.dtype)
    shape = [1] * v.dim()
    shape[dim % v.dim()] = v.shape[dim]
    return 0.5 + randn(*shape, seed=3).abs().to(v.dtype)


@pytest.mark.parametrize("shape,dim,why", REPARAM_CASES, ids=[c[2] for c in REPARAM_CASES])
def test_reparametrization_matches_reference(shape, dim, why):
    v = randn(*shape, seed=1).requires_grad_()
    g = _g_for(v.detach(), dim).requires_grad_()
    w = weight_normalized(v, g, dim)
    dw = randn(*shape, seed=2)
    w.backward(dw)
    w_ref, cache = ref.forward(v.detach().numpy(), g.detach().numpy(), dim)
    grads = ref.backward(dw.numpy(), cache)
    close(w.detach(), torch.from_numpy(w_ref), torch.float64)
    close(v.grad, torch.from_numpy(grads["v"]), torch.float64)
    close(g.grad, torch.from_numpy(grads["g"]), torch.float64)


@pytest.mark.parametrize("shape,dim,why", REPARAM_CASES, ids=[c[2] for c in REPARAM_CASES])
def test_reference_matches_autograd_of_the_formula(shape, dim, why):
    # The oracle itself, checked against torch autograd of w = g·v/‖v‖ written out directly.
    v = randn(*shape, seed=4).requires_grad_()
    g = _g_for(v.detach(), dim).requires_grad_()
    norm = _sum(v.square(), _norm_axes(v, dim), keepdim=dim is not None).sqrt()
    dw = randn(*shape, seed=5)
    (g * v / norm).backward(dw)
    _, cache = ref.forward(v.detach().numpy(), g.detach().numpy(), dim)
    grads = ref.backward(dw.numpy(), cache)
    close(torch.from_numpy(grads["v"]), v.grad, torch.float64)
    close(torch.from_numpy(grads["g"]), g.grad, torch.float64)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("shape,dim,why", REPARAM_CASES, ids=[c[2] for c in REPARAM_CASES])
def test_grad_v_is_orthogonal_to_v(shape, dim, why, dtype):
    # ∇v = (g/‖v‖)(∇w − (∇w·v̂) v̂): no component along v in any normalized slice.
    v = randn(*shape, seed=6, dtype=dtype).requires_grad_()
    g = _g_for(v.detach(), dim).requires_grad_()
    dw = randn(*shape, seed=7, dtype=dtype)
    weight_normalized(v, g, dim).backward(dw)
    axes = _norm_axes(v, dim)
    dots = _sum(v.grad * v.detach(), axes)  # one dot product per normalized slice
    # ∇v's own scale is g·‖∇w‖; rounding leaves a few ulps of ‖∇v‖·‖v‖ ≤ g·‖∇w‖·‖v‖/‖v‖·‖v‖
    scale = g.detach().abs().max() * _sum(dw.square(), axes).sqrt().max() * v.detach().abs().max()
    assert dots.abs().max() <= TOL[dtype] * scale


def test_gradient_can_fail():
    # Guard that the ⟂ check and the reference comparison bite: a plain w = g·v has a radial gradient.
    v = randn(4, 3).requires_grad_()
    (v * 2.0).backward(randn(4, 3, seed=1))
    assert (v.grad * v.detach()).sum(1).abs().max() > 1e-3


def test_gradcheck_and_gradgradcheck_float64():
    v = randn(3, 2, 2, seed=8).requires_grad_()
    g = _g_for(v.detach(), 0).requires_grad_()
    assert torch.autograd.gradcheck(lambda v, g: weight_normalized(v, g, 0), (v, g))
    assert torch.autograd.gradgradcheck(lambda v, g: weight_normalized(v, g, 0), (v, g))
    g0 = torch.tensor(1.3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda v, g: weight_normalized(v, g, None), (v, g0))


def test_layer_gradcheck_float64():
    conv = weight_norm(nn.Conv2d(2, 3, 2, padding=1).double())
    x = randn(2, 2, 3, 3, seed=9).requires_grad_()
    params = dict(conv.named_parameters())

    def f(x, g, v, b):
        prefix = "parametrizations.weight."
        params = {prefix + "original0": g, prefix + "original1": v, "bias": b}
        return torch.func.functional_call(conv, params, (x,))

    inputs = (x, params["parametrizations.weight.original0"], params["parametrizations.weight.original1"],
              params["bias"])
    assert torch.autograd.gradcheck(f, inputs, fast_mode=True)  # full Jacobians: the tests above


def test_linear_layer_matches_reference():
    layer = weight_norm(nn.Linear(5, 3).double())
    x = randn(4, 5, seed=10)
    y = layer(x)
    dy = randn(4, 3, seed=11)
    y.backward(dy)
    wn = layer.parametrizations.weight
    v, g, b = (t.detach().numpy() for t in (wn.v, wn.g, layer.bias))
    y_ref, cache = ref.linear_forward(x.numpy(), v, g, b)
    grads = ref.linear_backward(dy.numpy(), cache)
    close(y.detach(), torch.from_numpy(y_ref), torch.float64)
    close(wn.v.grad, torch.from_numpy(grads["v"]), torch.float64)
    close(wn.g.grad, torch.from_numpy(grads["g"]), torch.float64)
    close(layer.bias.grad, torch.from_numpy(grads["b"]), torch.float64)


# ---------------------------------------------------------------------------------------------------------
# Interoperability with torch.nn.utils.parametrizations.weight_norm
# ---------------------------------------------------------------------------------------------------------

# (layer factory, input shape, dim, why)
TORCH_CASES = [
    (lambda: nn.Linear(6, 4), (5, 6), 0, "Linear, default dim"),
    (lambda: nn.Linear(6, 4, bias=False), (5, 6), 1, "Linear without bias, per input column"),
    (lambda: nn.Conv1d(3, 4, 3, padding=1), (2, 3, 7), 0, "Conv1d"),
    (lambda: nn.Conv2d(3, 4, 3, stride=2, groups=1), (2, 3, 7, 7), 0, "Conv2d, strided"),
    (lambda: nn.Conv2d(4, 4, 3, groups=2), (2, 4, 6, 6), 0, "Conv2d, grouped"),
    (lambda: nn.Conv3d(2, 3, 2), (2, 2, 4, 4, 4), 0, "Conv3d"),
    (lambda: nn.ConvTranspose2d(3, 4, 3), (2, 3, 5, 5), 0, "ConvTranspose2d, torch's default dim 0 (inputs)"),
    (lambda: nn.ConvTranspose1d(3, 4, 3), (2, 3, 5), 1, "ConvTranspose1d per output channel"),
    (lambda: nn.Conv2d(3, 4, 3), (2, 3, 5, 5), None, "dim=None: one g for the whole weight"),
]


def _pair(factory, dim):
    torch.manual_seed(0)
    theirs = torch_weight_norm(factory(), dim=dim)
    torch.manual_seed(1)  # different values, so loading has something to do
    ours = weight_norm(factory(), dim=dim)
    return theirs, ours


def _outputs_and_grads(module, x):
    module.zero_grad()
    y = module(x)
    y.backward(torch.ones_like(y) + x.new_tensor(0.5) * torch.arange(y.numel()).reshape(y.shape).sin())
    return y.detach(), {name: p.grad.clone() for name, p in module.named_parameters()}


@pytest.mark.parametrize("factory,shape,dim,why", TORCH_CASES, ids=[c[3] for c in TORCH_CASES])
def test_torch_checkpoint_loads_strictly_and_matches(factory, shape, dim, why):
    theirs, ours = _pair(factory, dim)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = randn(*shape, seed=12, dtype=torch.float32)
    y_theirs, g_theirs = _outputs_and_grads(theirs, x)
    y_ours, g_ours = _outputs_and_grads(ours, x)
    close(y_ours, y_theirs, torch.float32)
    assert g_ours.keys() == g_theirs.keys()
    for name in g_ours:
        close(g_ours[name], g_theirs[name], torch.float32)
    close(ours.weight, theirs.weight, torch.float32)


@pytest.mark.parametrize("factory,shape,dim,why", TORCH_CASES, ids=[c[3] for c in TORCH_CASES])
def test_our_checkpoint_loads_into_torch(factory, shape, dim, why):
    theirs, ours = _pair(factory, dim)
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = randn(*shape, seed=13, dtype=torch.float32)
    close(theirs(x), ours(x), torch.float32)


@pytest.mark.parametrize("node", ["native", "python"])
def test_channels_last_layer_matches_torch(node, monkeypatch):
    # model.to(memory_format=torch.channels_last) makes v a channels_last tensor; ATen's fused kernels read memory
    # in row-major order whatever the strides, so it must be made contiguous before them (it once was not: w came
    # out silently wrong). "python": the autograd.Function that runs where the native library does not.
    from normlab.kernels import native_backend

    if node == "python":
        monkeypatch.setattr(native_backend, "weight_norm_node", lambda: None)
    theirs, ours = _pair(lambda: nn.Conv2d(3, 5, 3), 0)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    theirs, ours = (m.to(memory_format=torch.channels_last) for m in (theirs, ours))
    assert not ours.parametrizations.weight.original1.is_contiguous()
    x = randn(2, 3, 6, 6, seed=14, dtype=torch.float32).contiguous(memory_format=torch.channels_last)
    y_theirs, g_theirs = _outputs_and_grads(theirs, x)
    y_ours, g_ours = _outputs_and_grads(ours, x)
    close(y_ours, y_theirs, torch.float32)
    for name in g_ours:
        close(g_ours[name], g_theirs[name], torch.float32)


def test_old_style_weight_g_weight_v_keys_load():
    # The deprecated torch.nn.utils.weight_norm saved `weight_g` / `weight_v`; torch's new one accepts them.
    layer = weight_norm(nn.Linear(4, 3))
    g, v = randn(3, 1, dtype=torch.float32).abs() + 0.5, randn(3, 4, seed=1, dtype=torch.float32)
    layer.load_state_dict({"weight_g": g, "weight_v": v, "bias": torch.zeros(3)}, strict=True)
    close(layer.parametrizations.weight.original0.detach(), g, torch.float32)
    close(layer.parametrizations.weight.original1.detach(), v, torch.float32)


def test_same_function_after_wrapping():
    torch.manual_seed(0)
    plain = nn.Conv2d(3, 4, 3)
    wrapped = weight_norm(copy.deepcopy(plain))
    x = randn(2, 3, 5, 5, dtype=torch.float32)
    close(wrapped(x), plain(x), torch.float32)
    assert isinstance(wrapped, nn.Conv2d) and is_weight_normed(wrapped, "weight")
    assert torch.nn.utils.parametrize.type_before_parametrizations(wrapped) is nn.Conv2d


# ---------------------------------------------------------------------------------------------------------
# Serialization, compile, removal, assignment
# ---------------------------------------------------------------------------------------------------------


def _roundtrip_pickle(m):
    return pickle.loads(pickle.dumps(m))


def _roundtrip_torch_save(m):
    buf = io.BytesIO()
    torch.save(m, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("copier", [_roundtrip_pickle, _roundtrip_torch_save, copy.deepcopy],
                         ids=["pickle", "torch.save", "deepcopy"])
def test_copies_are_equal_and_independent(copier):
    layer = weight_norm(nn.Conv2d(3, 4, 3))
    layer(randn(1, 3, 4, 4, dtype=torch.float32))  # a forward pass first: no stale state may break copying
    clone = copier(layer)
    assert type(clone) is not type(layer) and type(clone).__name__ == type(layer).__name__
    x = randn(2, 3, 5, 5, dtype=torch.float32)
    close(clone(x), layer(x), torch.float32)
    assert clone.state_dict().keys() == layer.state_dict().keys()
    with torch.no_grad():
        clone.parametrizations.weight.original0.mul_(2)
    assert not torch.allclose(clone(x), layer(x))  # independent parameters
    remove_weight_norm(clone)  # the copy is fully functional
    assert type(clone) is nn.Conv2d


def test_torch_parametrized_module_refuses_to_pickle():
    # Why ours exists: torch's own weight-normed modules cannot be pickled.
    with pytest.raises(Exception):  # noqa: B017 - torch raises RuntimeError or PicklingError by version
        pickle.dumps(torch_weight_norm(nn.Linear(3, 2)))


# torch.compile (CPU). aot_eager keeps this test at ~2 s; inductor compiles the same graph in ~20 s.
def test_torch_compile_matches_eager():
    torch.manual_seed(0)
    eager = weight_norm(nn.Linear(6, 4))
    compiled_module = copy.deepcopy(eager)
    compiled = torch.compile(compiled_module, backend="aot_eager", fullgraph=True)
    x = randn(5, 6, dtype=torch.float32)
    y_eager, g_eager = _outputs_and_grads(eager, x)
    compiled_module.zero_grad()
    y = compiled(x)
    y.backward(torch.ones_like(y) + 0.5 * torch.arange(y.numel()).reshape(y.shape).sin())
    close(y.detach(), y_eager, torch.float32)
    for name, p in compiled_module.named_parameters():
        close(p.grad, g_eager[name], torch.float32)


def test_remove_restores_plain_weight_with_same_values():
    layer = weight_norm(nn.Conv2d(3, 4, 3))
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(3)
    w = layer.weight.detach().clone()
    x = randn(2, 3, 5, 5, dtype=torch.float32)
    y = layer(x)
    remove_weight_norm(layer)
    assert type(layer) is nn.Conv2d and not hasattr(layer, "parametrizations")
    assert isinstance(layer.weight, nn.Parameter)
    assert set(layer.state_dict()) == {"weight", "bias"}
    close(layer.weight.detach(), w, torch.float32)
    close(layer(x), y, torch.float32)
    with pytest.raises(ValueError, match="not weight-normalized"):
        remove_weight_norm(layer)


class TwoWeights(nn.Module):
    """A module with two weights (module-level, so that pickle finds it)."""

    def __init__(self):
        super().__init__()
        self.first = nn.Parameter(torch.randn(3, 4))
        self.second = nn.Parameter(torch.randn(2, 3))

    def forward(self, x):
        return x @ self.first.T @ self.second.T


def test_two_tensors_and_removing_one():
    module = weight_norm(weight_norm(TwoWeights(), "first"), "second", dim=None)
    assert list(module.parametrizations) == ["first", "second"]
    x = randn(5, 4, dtype=torch.float32)
    clone = _roundtrip_pickle(module)
    close(clone(x), module(x), torch.float32)
    remove_weight_norm(module, "first")
    assert is_weight_normed(module, "second") and not is_weight_normed(module, "first")
    assert isinstance(module.first, nn.Parameter) and is_weight_normed(clone, "first")
    close(module(x), clone(x), torch.float32)
    remove_weight_norm(module, "second")
    assert type(module) is TwoWeights


def test_assigning_the_weight_sets_g_and_v():
    layer = weight_norm(nn.Linear(4, 3))
    target = randn(3, 4, seed=14, dtype=torch.float32)
    layer.weight = target
    close(layer.weight.detach(), target, torch.float32)
    close(layer.parametrizations.weight.g.detach(), target.norm(dim=1, keepdim=True), torch.float32)
    with pytest.raises(ValueError, match="shape"):
        layer.weight = torch.zeros(2, 2)


def test_float16_parameters_keep_their_dtype():
    layer = weight_norm(nn.Linear(8, 3)).half()
    w = layer.weight
    assert w.dtype == torch.float16
    v, g = layer.parametrizations.weight.v.float(), layer.parametrizations.weight.g.float()
    # one float16 rounding of an O(1) value: 2^-11 relative
    torch.testing.assert_close(w.float(), g * v / v.norm(dim=1, keepdim=True), rtol=1e-3, atol=1e-3)


def test_repr_and_container():
    layer = weight_norm(nn.Linear(4, 3), dim=0)
    assert "WeightNormLinear" in repr(layer) and "WeightNorm(dim=0)" in repr(layer)
    assert isinstance(layer.parametrizations.weight, WeightNorm)


# ---------------------------------------------------------------------------------------------------------
# Data-dependent initialization
# ---------------------------------------------------------------------------------------------------------


def _standardized(t, channel_axis):
    t = t.movedim(channel_axis, 0).reshape(t.shape[channel_axis], -1).double()
    return t.mean(1), t.var(1, unbiased=False)


# (layer factory, input shape, dim, channel axis of the output, why)
INIT_CASES = [
    (lambda: nn.Linear(6, 4), (64, 6), 0, -1, "Linear"),
    (lambda: nn.Linear(6, 4), (8, 5, 6), 0, -1, "Linear on (N, T, features): statistics over N and T"),
    (lambda: nn.Conv2d(3, 5, 3), (8, 3, 6, 6), 0, 1, "Conv2d: statistics over N, H, W"),
    (lambda: nn.ConvTranspose2d(3, 5, 3), (8, 3, 4, 4), 1, 1, "ConvTranspose2d with dim=1 (output channels)"),
]


@pytest.mark.parametrize("factory,shape,dim,axis,why", INIT_CASES, ids=[c[4] for c in INIT_CASES])
def test_data_dependent_init_standardizes_preactivations(factory, shape, dim, axis, why):
    layer = weight_norm(factory(), dim=dim)
    x = 3.0 + 2.0 * randn(*shape, seed=15, dtype=torch.float32)  # offset and scale to undo
    v_before = layer.parametrizations.weight.v.detach().clone()
    out = weight_norm_init_(layer, x)
    mean, var = _standardized(layer(x).detach(), axis)
    torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
    torch.testing.assert_close(var, torch.ones_like(var), rtol=0, atol=1e-4)  # eps=1e-5 in the variance
    close(out, layer(x).detach(), torch.float32)
    assert torch.equal(layer.parametrizations.weight.v.detach(), v_before)  # direction untouched


def test_data_dependent_init_through_a_network_uses_initialized_inputs():
    torch.manual_seed(0)
    net = nn.Sequential(
        weight_norm(nn.Conv2d(3, 6, 3)), nn.ReLU(), weight_norm(nn.Conv2d(6, 4, 3)), nn.ReLU(),
        nn.Flatten(), weight_norm(nn.Linear(4 * 2 * 2, 5)),
    )
    x = 5.0 * randn(16, 3, 6, 6, seed=16, dtype=torch.float32)
    weight_norm_init_(net, x, init_scale=0.5)
    seen = {}
    hooks = [m.register_forward_hook(lambda m, i, o, k=k: seen.__setitem__(k, o.detach()))
             for k, m in enumerate(net) if is_weight_normed(m)]
    net(x)
    for h in hooks:
        h.remove()
    for k, axis in [(0, 1), (2, 1), (5, -1)]:
        mean, var = _standardized(seen[k], axis)
        torch.testing.assert_close(mean, torch.zeros_like(mean), rtol=0, atol=1e-5)
        torch.testing.assert_close(var, torch.full_like(var, 0.25), rtol=0, atol=1e-4)


@pytest.mark.parametrize(
    "build,match,error",
    [
        (lambda: weight_norm(nn.Linear(4, 3, bias=False)), "no bias", ValueError),
        (lambda: weight_norm(nn.Linear(4, 3), dim=1), "dim=0", ValueError),
        (lambda: weight_norm(nn.ConvTranspose2d(4, 4, 3, groups=2), dim=1), "groups", ValueError),
        (lambda: nn.Linear(4, 3), "no weight-normalized", ValueError),
        (lambda: weight_norm(nn.Bilinear(4, 4, 3)), "Linear, Conv", TypeError),
    ],
    ids=["no bias", "wrong dim", "grouped ConvTranspose", "nothing to init", "unsupported layer"],
)
def test_data_dependent_init_errors(build, match, error):
    module = build()
    shape = (2, 4, 3, 3) if isinstance(module, nn.ConvTranspose2d) else (2, 4)
    x = randn(*shape, dtype=torch.float32)
    with pytest.raises(error, match=match):
        weight_norm_init_(module, x)


def test_data_dependent_init_reports_layers_never_called():
    net = nn.ModuleDict({"used": weight_norm(nn.Linear(4, 3)), "unused": weight_norm(nn.Linear(4, 3))})
    net.forward = lambda x: net["used"](x)
    with pytest.raises(ValueError, match="unused"):
        weight_norm_init_(net, randn(8, 4, dtype=torch.float32))


# ---------------------------------------------------------------------------------------------------------
# Registry and errors
# ---------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "layer,dim",
    [(nn.Linear(4, 3), 0), (nn.Conv2d(3, 4, 3), 0), (nn.ConvTranspose2d(3, 4, 3), 1)],
    ids=["Linear", "Conv2d", "ConvTranspose2d: per output channel"],
)
def test_registry_wraps_by_name(layer, dim):
    assert norm_kind("wn") == "weight" and norm_kind("weight_norm") == "weight"
    wrapped = wrap_layer("wn", layer)
    assert wrapped is layer and layer.parametrizations.weight.dim == dim
    assert wrap_layer("weight-norm", nn.Linear(2, 2), dim=None).parametrizations.weight.dim is None


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: weight_norm("not a module"), TypeError, "expects an nn.Module"),
        (lambda: weight_norm(nn.Linear(3, 2), name="wieght"), ValueError, r"no parameter 'wieght'.*'weight'"),
        (lambda: weight_norm(nn.BatchNorm1d(3), name="running_mean"), ValueError, "buffer"),
        (lambda: weight_norm(nn.Linear(3, 2), dim=2), ValueError, r"dim must be in \[-2, 1\].*got dim=2"),
        (lambda: weight_norm(nn.Conv2d(3, 2, 3), dim=-5), ValueError, r"\[-4, 3\]"),
        (lambda: weight_norm(nn.Linear(3, 2), dim=0.5), TypeError, "int or None"),
        (lambda: weight_norm(weight_norm(nn.Linear(3, 2))), ValueError, "already weight-normalized"),
        (lambda: weight_norm(torch_weight_norm(nn.Linear(3, 2)), "bias"), ValueError, "torch parametriz"),
        (lambda: weight_norm(nn.LazyLinear(3)), ValueError, "lazy"),
        (lambda: wrap_layer("wn", nn.ReLU()), TypeError, "expects a Linear"),
        (lambda: remove_weight_norm(nn.Linear(3, 2)), ValueError, "not weight-normalized"),
    ],
    ids=["not a module", "unknown name", "a buffer", "dim too large", "dim too negative", "dim not int",
         "twice", "torch-parametrized", "lazy", "registry: wrong layer type", "remove: not normed"],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()



def test_per_sample_gradients_with_torch_func():
    """vmap(grad(·)) over a batch (per-sample gradients, as in differential privacy) equals one grad per sample."""
    from torch.func import functional_call, grad, vmap

    layer = weight_norm(nn.Linear(4, 3).double())
    params = {k: v.detach() for k, v in layer.named_parameters()}
    x = randn(5, 4, seed=11)

    def loss(p, xi):
        return functional_call(layer, p, (xi[None],)).square().sum()

    batched = vmap(grad(loss), in_dims=(None, 0))(params, x)
    for i in range(x.shape[0]):
        single = grad(loss)(params, x[i])
        for name in params:
            torch.testing.assert_close(batched[name][i], single[name], rtol=1e-10, atol=1e-10)

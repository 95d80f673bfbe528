"""normlab.functional against torch.nn.functional and against the NumPy reference, plus SPEC's properties.

One commented case table drives the comparisons: output and every gradient (x, weight, bias and, for SN,
the mixing logits), float32 against torch (1e-4) where torch has the method, float64 against
normlab.reference (1e-10) for every method, and float16/bfloat16 against the reference with their own
tolerances (see conftest). Then: numerical stability under a 1e4 offset (and proof that the naive formula
fails there), constant inputs, eps = 0 properties, LN = GN(1), IN = GN(C), and channels_last layouts.
"""

from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
import torch.nn.functional as TF

import normlab.functional as NF
from conftest import TOL, assert_close, randn
from normlab import reference

EPS = 1e-5
MOMENTUM = 0.1


@dataclass(frozen=True)
class Case:
    method: str  # bn, ln, in, gn, sn
    shape: tuple
    kwargs: dict = field(default_factory=dict)  # groups / normalized_ndim / sources / eval / authors_compat
    channels_last: bool = False  # channel dim stored last (NLC, NHWC, NDHWC strides)

    @property
    def id(self):
        extra = "-".join(f"{k}={v}" for k, v in self.kwargs.items())
        return "-".join(filter(None, [self.method, "x".join(map(str, self.shape)), extra,
                                      "cl" if self.channels_last else ""]))


ALL_SOURCES = ("in", "ln", "bn")

CASES = [
    # --- BN: statistics per channel over (N, *spatial)
    Case("bn", (2, 1)),  # minimal: one channel, two values
    Case("bn", (3, 5, 7)),  # non-power-of-two N, C, L
    Case("bn", (4, 3, 1, 1)),  # 1x1 spatial: statistics over the batch only
    Case("bn", (1, 3, 2, 3)),  # a single sample: statistics over positions only
    Case("bn", (2, 3, 4, 3), channels_last=True),  # channels_last (NHWC strides)
    Case("bn", (2, 2, 3, 2, 3), channels_last=True),  # channels_last_3d
    Case("bn", (2, 3, 2, 3), {"eval": True}),  # eval: running statistics are constants
    # --- LN: torch.nn's convention, statistics over the trailing normalized_ndim dims, elementwise affine
    Case("ln", (2, 5), {"normalized_ndim": 1}),  # (N, C): over C
    Case("ln", (3, 2, 5), {"normalized_ndim": 1}),  # transformer-style: over the last dim only
    Case("ln", (2, 3, 5, 7), {"normalized_ndim": 3}),  # SPEC's LN over (C, H, W), non-power-of-two
    Case("ln", (2, 3, 4, 3), {"normalized_ndim": 3}, channels_last=True),  # channels_last kept
    # --- IN: statistics per (n, c) over positions
    Case("in", (1, 1, 2)),  # minimal: one instance of two values
    Case("in", (2, 3, 7)),  # 1d, odd length
    Case("in", (2, 5, 3, 3), channels_last=True),  # channels_last, non-power-of-two C
    Case("in", (2, 2, 2, 3, 2)),  # 3d
    Case("in", (2, 3, 2, 3), {"eval": True}),  # running statistics (track_running_stats eval)
    # --- GN: statistics per (n, group of C/G channels)
    Case("gn", (1, 2, 1), {"groups": 1}),  # minimal: one sample, two values in one group
    Case("gn", (2, 6, 5), {"groups": 3}),  # non-power-of-two, 2 channels per group: the ⌊c/(C/G)⌋ grouping
    Case("gn", (2, 6, 2, 3), {"groups": 6}),  # G = C (IN)
    Case("gn", (2, 6, 2, 3), {"groups": 1}),  # G = 1 (LN with per-channel affine)
    Case("gn", (2, 4, 1, 1), {"groups": 2}),  # 1x1 spatial: statistics over the group's channels only
    Case("gn", (2, 6), {"groups": 2}),  # no spatial dims
    Case("gn", (2, 6, 3, 4), {"groups": 3}, channels_last=True),  # channels_last: groups over the last dim
    Case("gn", (2, 4, 2, 3, 2), {"groups": 2}, channels_last=True),  # channels_last_3d
    Case("gn", (2, 6, 5), {"groups": 2}, channels_last=True),  # 3-d input stored NLC
    # --- SN: IN/LN/BN statistics mixed by softmax weights
    Case("sn", (2, 3, 2, 3)),  # all three sources, training
    Case("sn", (2, 3), {"sources": ("ln", "bn")}),  # (N, C): SwitchNorm1d mixes LN and BN
    Case("sn", (2, 3, 5), {"sources": ("in", "ln")}),  # using_bn=False
    Case("sn", (3, 5, 2, 3), channels_last=True),  # channels_last, non-power-of-two
    Case("sn", (2, 2, 2, 3, 2), channels_last=True),  # 3d channels_last_3d
    Case("sn", (2, 3, 2, 3), {"eval": True}),  # eval: the BN source uses running statistics
    Case("sn", (1, 3, 2, 3), {"eval": True}),  # eval serves one sample alone
    Case("sn", (2, 3, 2, 3), {"authors_compat": True}),  # authors' unbiased IN variance feeding LN/BN
    Case("sn", (4, 3), {"sources": ("ln", "bn"), "authors_compat": True}),  # authors' 1d: unbiased over C / N
]
CASE_IDS = [c.id for c in CASES]
TORCH_CASES = [c for c in CASES if c.method != "sn"]  # torch has no Switchable Norm


def to_channels_last(x):
    """Channel dim stored last, any rank >= 3 (for 4-d/5-d this is channels_last / channels_last_3d)."""
    return x.movedim(1, -1).contiguous().movedim(-1, 1)


def make_inputs(case, dtype, affine=True):
    """x, differentiable params and running statistics (float32 for low-precision inputs, as in AMP)."""
    c = case.shape[1]
    x = randn(*case.shape, seed=1, dtype=dtype)
    if case.channels_last:
        x = to_channels_last(x)
    stat_dtype = torch.promote_types(dtype, torch.float32)
    params, stats = {}, {}
    if affine:
        pshape = case.shape[-case.kwargs["normalized_ndim"]:] if case.method == "ln" else (c,)
        params["weight"] = (randn(*pshape, seed=2) * 0.5 + 1).to(dtype)
        params["bias"] = randn(*pshape, seed=3, dtype=dtype)
    if case.method == "sn":
        k = len(case.kwargs.get("sources", ALL_SOURCES))
        params["mean_logits"] = randn(k, seed=4, dtype=dtype)
        params["var_logits"] = randn(k, seed=5, dtype=dtype)
    if case.method in ("bn", "in", "sn"):
        stats["running_mean"] = randn(c, seed=6, dtype=stat_dtype) * 0.1
        stats["running_var"] = torch.linspace(0.5, 2.0, c, dtype=stat_dtype)
    x.requires_grad_(True)
    for p in params.values():
        p.requires_grad_(True)
    return x, params, stats


def call_normlab(case, x, p, stats, eps=EPS):
    kw, training = case.kwargs, not case.kwargs.get("eval", False)
    w, b = p.get("weight"), p.get("bias")
    if case.method == "bn":
        return NF.batch_norm(x, stats.get("running_mean"), stats.get("running_var"), w, b, training,
                             MOMENTUM, eps)
    if case.method == "ln":
        return NF.layer_norm(x, x.shape[x.dim() - kw["normalized_ndim"]:], w, b, eps)
    if case.method == "in":
        return NF.instance_norm(x, stats.get("running_mean"), stats.get("running_var"), w, b, training,
                                MOMENTUM, eps)
    if case.method == "gn":
        return NF.group_norm(x, kw["groups"], w, b, eps)
    return NF.switch_norm(x, p["mean_logits"], p["var_logits"], w, b, stats.get("running_mean"),
                          stats.get("running_var"), training, MOMENTUM, eps,
                          sources=kw.get("sources", ALL_SOURCES),
                          authors_compat=kw.get("authors_compat", False))


def call_torch(case, x, p, stats):
    kw, training = case.kwargs, not case.kwargs.get("eval", False)
    w, b = p.get("weight"), p.get("bias")
    rm, rv = stats.get("running_mean"), stats.get("running_var")
    if case.method == "bn":
        return TF.batch_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
    if case.method == "ln":
        return TF.layer_norm(x, x.shape[x.dim() - kw["normalized_ndim"]:], w, b, EPS)
    if case.method == "in":
        return TF.instance_norm(x, rm, rv, w, b, training, MOMENTUM, EPS)
    return TF.group_norm(x, kw["groups"], w, b, EPS)


def np64(t):
    return None if t is None else t.detach().double().numpy()


def call_reference(case, x, p, stats):
    """(out, grads(dout) -> dict keyed like `p` plus "x", cache) from normlab.reference in float64."""
    kw, evaluating = case.kwargs, case.kwargs.get("eval", False)
    xs, w, b = np64(x), np64(p.get("weight")), np64(p.get("bias"))
    rm, rv = np64(stats.get("running_mean")), np64(stats.get("running_var"))
    if case.method in ("bn", "in") and evaluating:  # per-channel constants: BN's eval formula
        mod, (out, cache) = reference.batch_norm, reference.batch_norm.eval_forward(xs, rm, rv, w, b, EPS)
    elif case.method == "bn":
        mod, (out, cache) = reference.batch_norm, reference.batch_norm.forward(xs, w, b, EPS)
    elif case.method == "ln":
        mod = reference.layer_norm
        out, cache = mod.forward(xs, w, b, kw["normalized_ndim"], EPS)
    elif case.method == "in":
        mod, (out, cache) = reference.instance_norm, reference.instance_norm.forward(xs, w, b, EPS)
    elif case.method == "gn":
        mod, (out, cache) = reference.group_norm, reference.group_norm.forward(xs, w, b, kw["groups"], EPS)
    else:
        mod = reference.switch_norm
        out, cache = mod.forward(
            xs, w, b, np64(p["mean_logits"]), np64(p["var_logits"]), kw.get("sources", ALL_SOURCES), EPS,
            kw.get("authors_compat", False), rm if evaluating else None, rv if evaluating else None)

    def grads(dout):
        g = mod.backward(dout, cache)
        rename = {"gamma": "weight", "beta": "bias"}
        return {rename.get(k, k): torch.from_numpy(np.asarray(v)) for k, v in g.items()}

    return torch.from_numpy(out), grads, cache


def autograd_grads(out, x, params, dout):
    names = ["x", *params]
    values = torch.autograd.grad(out, [x, *params.values()], dout)
    return dict(zip(names, values, strict=False))


# ---------------------------------------------------------------- against torch.nn.functional

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_matches_torch_float32(case, affine):
    x, p, stats = make_inputs(case, torch.float32, affine)
    t_stats = {k: v.clone() for k, v in stats.items()}
    out = call_normlab(case, x, p, stats)
    expected = call_torch(case, x, p, t_stats)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert_close(out, expected)
    dout = randn(*case.shape, seed=7)
    got, want = autograd_grads(out, x, p, dout), autograd_grads(expected, x, p, dout)
    for name in want:
        assert_close(got[name], want[name], msg=f"grad {name}")
    for name in stats:  # running statistics updated (training) or left alone (eval) like torch
        assert_close(stats[name], t_stats[name], msg=name)


# ---------------------------------------------------------------- against the NumPy reference

@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_matches_reference_float64(case, affine):
    x, p, stats = make_inputs(case, torch.float64, affine)
    before = {k: v.clone() for k, v in stats.items()}
    out = call_normlab(case, x, p, stats)
    expected, ref_grads, cache = call_reference(case, x, p, before)
    assert out.dtype == torch.float64
    assert_close(out, expected)
    dout = randn(*case.shape, seed=7, dtype=torch.float64)
    got, want = autograd_grads(out, x, p, dout), ref_grads(dout.numpy())
    assert set(got) == set(want)
    for name in want:
        assert_close(got[name], want[name], msg=f"grad {name}")
    training = not case.kwargs.get("eval")
    if training and stats and "bn" in case.kwargs.get("sources", "bn"):
        # running ← (1 − m)·running + m·batch, with BN's unbiased batch variance; IN's batch statistics are
        # the averages over n of the per-instance ones; SN's authors_compat stores its own σ²_bn as computed
        positions = int(np.prod(case.shape[2:]))
        if case.method == "bn":
            mean_b, var_b = cache["mean"], cache["var_unbiased"]
        elif case.method == "in":
            mean_b, var_b = cache["mean"].mean(0), (cache["var"] * positions / (positions - 1)).mean(0)
        else:
            count = case.shape[0] * positions
            unbias = 1.0 if case.kwargs.get("authors_compat") else count / (count - 1)
            mean_b, var_b = cache["mean_bn"], cache["var_bn"] * unbias
        for name, batch in (("running_mean", mean_b), ("running_var", var_b)):
            want_stat = (1 - MOMENTUM) * before[name] + MOMENTUM * torch.from_numpy(np.asarray(batch))
            assert_close(stats[name], want_stat, msg=name)
    else:  # eval, or SN without a BN source: nothing to update
        for name in stats:
            assert torch.equal(stats[name], before[name]), f"{name} changed"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["float16", "bfloat16"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_low_precision_matches_reference(case, dtype):
    """float32 statistics, output in the input dtype: the exact result (float64 reference on the same
    rounded inputs) rounded once, so within about an ulp of the dtype (tolerances in conftest)."""
    x, p, stats = make_inputs(case, dtype)
    before = {k: v.clone() for k, v in stats.items()}
    out = call_normlab(case, x, p, stats)
    assert out.dtype == dtype
    expected, ref_grads, _ = call_reference(case, x, p, before)
    assert_close(out, expected.to(dtype), dtype=dtype)
    dout = randn(*case.shape, seed=7, dtype=dtype)
    got, want = autograd_grads(out, x, p, dout), ref_grads(np64(dout))
    for name in want:
        assert got[name].dtype == dtype, name
        assert_close(got[name], want[name].to(dtype), dtype=dtype, msg=f"grad {name}")
    for name in stats:
        assert stats[name].dtype == torch.float32  # running statistics stay in their own dtype


def test_low_precision_statistics_are_float32():
    """Teeth for the test above: bfloat16 input with an offset. Statistics kept in bfloat16 (mean rounded
    to 8 significant bits, about 0.5 at 100) would miss by far more than the tolerance; float32 ones don't."""
    x = (100 + randn(2, 4, 8, 8, seed=1)).bfloat16()
    out = NF.group_norm(x, 2)
    exact = TF.group_norm(x.double(), 2)
    assert out.dtype == torch.bfloat16
    assert_close(out, exact.bfloat16(), dtype=torch.bfloat16)
    xv = x.reshape(2, 2, -1)  # statistics computed in bfloat16 arithmetic
    in_bf16 = ((xv - xv.mean(-1, keepdim=True)) * torch.rsqrt(xv.var(-1, unbiased=False, keepdim=True) + EPS))
    err = (in_bf16.reshape(x.shape).double() - exact).abs().max()
    assert err > 3 * TOL[torch.bfloat16]["atol"], f"bfloat16 statistics unexpectedly accurate ({err:.3f})"


@pytest.mark.parametrize("method", ["bn", "in", "sn"])
def test_low_precision_eval_is_computed_in_float32(method):
    """Eval with running statistics near a bfloat16 input's offset: x·scale + shift cancels, so it must
    be computed in float32 (in bfloat16 arithmetic the result is off by ~0.25)."""
    case = Case(method, (2, 3, 4, 4), {"eval": True})
    x = (100 + randn(*case.shape, seed=1)).bfloat16()
    p = {"mean_logits": torch.tensor([-9.0, -9.0, 9.0]), "var_logits": torch.zeros(3)} if method == "sn" else {}
    stats = {"running_mean": torch.full((3,), 100.0), "running_var": torch.full((3,), 0.3)}
    out = call_normlab(case, x, p, stats)
    exact, _, _ = call_reference(case, x, p, stats)
    assert out.dtype == torch.bfloat16
    assert_close(out, exact.bfloat16(), dtype=torch.bfloat16)


# ---------------------------------------------------------------- numerics: large offset, constants

# One representative call per method over x of shape (4, 6, 5, 5), with its statistics sets as dims of
# the (N, G, C/G, L) view, for the naive formula below.
STABILITY = {
    "bn": (Case("bn", (4, 6, 5, 5)), 6, (0, 2, 3)),
    "ln": (Case("ln", (4, 6, 5, 5), {"normalized_ndim": 3}), 1, (2, 3)),
    "in": (Case("in", (4, 6, 5, 5)), 6, (2, 3)),
    "gn": (Case("gn", (4, 6, 5, 5), {"groups": 3}), 3, (2, 3)),
    "sn": (Case("sn", (4, 6, 5, 5)), 6, None),
}


def naive_float32(x, groups, dims):
    """The textbook E[x²] − E[x]² in float32, which cancels catastrophically under a large offset."""
    xv = x.reshape(x.shape[0], groups, x.shape[1] // groups, -1)
    mean = xv.mean(dims, keepdim=True)
    var = (xv * xv).mean(dims, keepdim=True) - mean * mean
    return ((xv - mean) / torch.sqrt(var + EPS)).reshape(x.shape)


def naive_switch_float32(x):
    """SN with the one-pass mixing formulas SPEC §1 writes (σ²_ln = mean_c(σ²_in + μ²_in) − μ²_ln, ...),
    equal softmax weights, in float32 — even with an exact σ²_in it cancels under an offset."""
    xv = x.reshape(*x.shape[:2], -1)
    mean_in, var_in = xv.mean(-1, keepdim=True), xv.var(-1, unbiased=False, keepdim=True)
    temp = var_in + mean_in**2
    mean_ln, mean_bn = mean_in.mean(1, keepdim=True), mean_in.mean(0, keepdim=True)
    var_ln, var_bn = temp.mean(1, keepdim=True) - mean_ln**2, temp.mean(0, keepdim=True) - mean_bn**2
    mean = (mean_in + mean_ln + mean_bn) / 3
    var = (var_in + var_ln + var_bn) / 3
    return ((xv - mean) / torch.sqrt(var + EPS)).reshape(x.shape)


@pytest.mark.parametrize("method", list(STABILITY))
def test_large_offset_matches_float64(method):
    """x = 1e4 + N(0, 1) in float32 matches the float64 computation on the same input within 5e-3."""
    case, groups, dims = STABILITY[method]
    x32 = (1e4 + randn(*case.shape, seed=11)).float()
    p = {"mean_logits": torch.zeros(3), "var_logits": torch.zeros(3)} if method == "sn" else {}
    stats = {}
    if method in ("bn", "in", "sn"):
        stats = {"running_mean": torch.zeros(6), "running_var": torch.ones(6)}
    out = call_normlab(case, x32, p, stats)
    exact, _, _ = call_reference(case, x32, p, {})  # float64 on the very same float32 values
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), exact, rtol=0, atol=5e-3)
    # the running mean saw the offset, in float32 precision
    if "running_mean" in stats:
        assert torch.allclose(stats["running_mean"], torch.full((6,), 1e3), rtol=1e-3)
    # teeth: the naive one-pass formula misses by orders of magnitude on the same input
    naive = naive_switch_float32(x32) if method == "sn" else naive_float32(x32, groups, dims)
    err = (naive.double() - exact).abs().nan_to_num(nan=float("inf")).max()
    assert err > 100 * 5e-3, f"naive formula unexpectedly accurate ({err:.2e}): the test would have no teeth"


@pytest.mark.parametrize("value", [0.0, 3.7, -1e4], ids=["zero", "small", "offset"])
@pytest.mark.parametrize("method", list(STABILITY))
def test_constant_input_is_finite(method, value):
    """Zero variance: x̂ = 0, so the output is the bias and every gradient is finite."""
    case, _, _ = STABILITY[method]
    x = torch.full(case.shape, value, requires_grad=True)
    _, p, stats = make_inputs(case, torch.float32)
    out = call_normlab(case, x, p, stats)
    assert torch.isfinite(out).all()
    bias = p["bias"].detach()
    expected = bias.expand_as(out) if method == "ln" else bias.view(1, -1, 1, 1).expand_as(out)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-2)
    for name, g in autograd_grads(out, x, p, randn(*case.shape, seed=7)).items():
        assert torch.isfinite(g).all(), name
    for name, s in stats.items():
        assert torch.isfinite(s).all(), name


# ---------------------------------------------------------------- properties

# (call with eps = 0, dims of the output that form one statistics set after a reshape) — SPEC §1's table
EPS0_SHAPE = (3, 6, 4, 5)


def _sets(y, method):
    n, c = y.shape[:2]
    return {
        "bn": lambda: y.transpose(0, 1).reshape(c, -1),  # per channel
        "ln": lambda: y.reshape(n, -1),  # per sample
        "in": lambda: y.reshape(n * c, -1),  # per (n, c)
        "gn": lambda: y.reshape(n * 3, -1),  # per (n, group), G = 3
    }[method]()


def single_source_switch_norm(x, source):
    return NF.switch_norm(x, torch.zeros(1), torch.zeros(1), training=True, eps=0.0, sources=(source,))


EPS0_CALLS = {
    "bn": lambda x: NF.batch_norm(x, None, None, training=True, eps=0.0),
    "ln": lambda x: NF.layer_norm(x, x.shape[1:], eps=0.0),
    "in": lambda x: NF.instance_norm(x, eps=0.0),
    "gn": lambda x: NF.group_norm(x, 3, eps=0.0),
    # SN with a single source is that source's method
    "sn-in": lambda x: single_source_switch_norm(x, "in"),
    "sn-ln": lambda x: single_source_switch_norm(x, "ln"),
    "sn-bn": lambda x: single_source_switch_norm(x, "bn"),
}


@pytest.mark.parametrize("channels_last", [False, True], ids=["contiguous", "channels_last"])
@pytest.mark.parametrize("name", list(EPS0_CALLS))
def test_eps0_each_set_has_mean0_var1(name, channels_last):
    x = randn(*EPS0_SHAPE, seed=3, dtype=torch.float64) * 3 + 2
    if channels_last:
        x = to_channels_last(x)
    y = EPS0_CALLS[name](x)
    sets = _sets(y, name.removeprefix("sn-"))
    torch.testing.assert_close(sets.mean(1), torch.zeros(len(sets), dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(sets.var(1, unbiased=False), torch.ones(len(sets), dtype=torch.float64),
                               rtol=0, atol=1e-12)


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 5), (2, 6, 3, 4), (2, 6, 2, 3, 2)])
def test_layer_norm_is_group_norm_1(shape):
    """SPEC's LN over (C, *spatial) = GN(1); a per-channel affine is LN's elementwise one, broadcast."""
    x = randn(*shape, seed=1, dtype=torch.float64).requires_grad_()
    w = randn(6, seed=2, dtype=torch.float64).requires_grad_()
    b = randn(6, seed=3, dtype=torch.float64).requires_grad_()
    view = (6,) + (1,) * (len(shape) - 2)
    y_gn = NF.group_norm(x, 1, w, b)
    y_ln = NF.layer_norm(x, shape[1:], w.view(view).expand(shape[1:]), b.view(view).expand(shape[1:]))
    assert_close(y_gn, y_ln)
    dout = randn(*shape, seed=4, dtype=torch.float64)
    grads_gn = torch.autograd.grad(y_gn, (x, w, b), dout)
    grads_ln = torch.autograd.grad(y_ln, (x, w, b), dout)
    for g_gn, g_ln in zip(grads_gn, grads_ln, strict=True):
        assert_close(g_gn, g_ln)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(2, 5, 7), (2, 5, 3, 4), (2, 5, 2, 3, 2)])
def test_instance_norm_is_group_norm_c(shape, affine):
    x = randn(*shape, seed=1, dtype=torch.float64).requires_grad_()
    params = [None, None]
    if affine:
        params = [randn(5, seed=s, dtype=torch.float64).requires_grad_() for s in (2, 3)]
    y_in = NF.instance_norm(x, None, None, *params)
    y_gn = NF.group_norm(x, 5, *params)
    assert_close(y_in, y_gn)
    dout = randn(*shape, seed=4, dtype=torch.float64)
    inputs = [x, *(p for p in params if p is not None)]
    for g_in, g_gn in zip(torch.autograd.grad(y_in, inputs, dout), torch.autograd.grad(y_gn, inputs, dout),
                          strict=True):
        assert_close(g_in, g_gn)


# ---------------------------------------------------------------- channels_last

LAYOUT_CASES = [
    # every method, 3-d (NLC strides), 4-d (channels_last) and 5-d (channels_last_3d) inputs
    Case("bn", (2, 4, 5)),
    Case("bn", (2, 4, 3, 5)),
    Case("bn", (2, 4, 2, 3, 2)),
    Case("ln", (2, 4, 5), {"normalized_ndim": 2}),  # LN over (C, *spatial) keeps any channels-last strides
    Case("ln", (2, 4, 3, 5), {"normalized_ndim": 3}),
    Case("ln", (2, 4, 2, 3, 2), {"normalized_ndim": 4}),
    Case("in", (2, 4, 5)),
    Case("in", (2, 4, 3, 5)),
    Case("in", (2, 4, 2, 3, 2)),
    Case("gn", (2, 4, 5), {"groups": 2}),
    Case("gn", (2, 4, 3, 5), {"groups": 2}),
    Case("gn", (2, 4, 2, 3, 2), {"groups": 2}),
    Case("sn", (2, 4, 5)),
    Case("sn", (2, 4, 3, 5)),
    Case("sn", (2, 4, 2, 3, 2)),
    Case("sn", (2, 4, 3, 5), {"eval": True}),
]


@pytest.mark.parametrize("case", LAYOUT_CASES, ids=[c.id for c in LAYOUT_CASES])
def test_channels_last_keeps_layout_and_values(case):
    x, p, stats = make_inputs(case, torch.float32)
    x_cl = to_channels_last(x.detach()).requires_grad_()
    assert x_cl.stride() != x.stride()
    out = call_normlab(case, x, p, {k: v.clone() for k, v in stats.items()})
    out_cl = call_normlab(case, x_cl, p, {k: v.clone() for k, v in stats.items()})
    assert out_cl.stride() == x_cl.stride(), "output lost the channels_last layout"
    if x.dim() in (4, 5):
        fmt = torch.channels_last if x.dim() == 4 else torch.channels_last_3d
        assert out_cl.is_contiguous(memory_format=fmt)
    assert_close(out_cl, out)
    dout = randn(*case.shape, seed=7)
    for (name, g), g_cl in zip(autograd_grads(out, x, p, dout).items(),
                               autograd_grads(out_cl, x_cl, p, dout).values(), strict=True):
        assert_close(g_cl, g, msg=f"grad {name}")


def test_non_contiguous_input_works():
    """Strides that are neither contiguous nor channels_last (a slice) are handled, not misread."""
    base = randn(2, 6, 4, 6, seed=1)
    x = base[:, ::2, :, ::2]
    assert not x.is_contiguous()
    assert_close(NF.group_norm(x, 3), TF.group_norm(x.contiguous(), 3))
    expected = TF.batch_norm(x.contiguous(), None, None, training=True)
    assert_close(NF.batch_norm(x, None, None, training=True), expected)


"""Tests for normlab.reference, the float64 oracle of every other test.

Each forward is compared with a naive formula written per statistics set S_i (SPEC §1's table, as
integer labels: elements with the same label share statistics), each gradient with central finite
differences, plus the properties SPEC states (eps = 0 gives mean 0 / variance 1, LN ≡ GN(1), IN ≡ GN(C)).
"""

import itertools

import numpy as np
import pytest

from normlab.reference import batch_norm, group_norm, instance_norm, layer_norm, switch_norm

EPS = 1e-5
FD_STEP = 1e-6  # central differences in float64: error ~ step² + 1e-16/step ≈ 1e-10
GRAD_TOL = {"rtol": 1e-5, "atol": 1e-7}
FWD_TOL = {"rtol": 1e-10, "atol": 1e-10}


def randn(*shape, seed=0):
    return np.random.default_rng(seed).standard_normal(shape)


def channel_view(p, ndim):
    return p.reshape((1, -1) + (1,) * (ndim - 2))


def numeric_grad(loss, arr):
    """Central differences of loss() with respect to every entry of `arr` (perturbed in place, restored)."""
    grad = np.zeros_like(arr)
    for idx in np.ndindex(arr.shape):
        old = arr[idx]
        arr[idx] = old + FD_STEP
        up = loss()
        arr[idx] = old - FD_STEP
        down = loss()
        arr[idx] = old
        grad[idx] = (up - down) / (2 * FD_STEP)
    return grad


def check_grads(module, inputs, **kwargs):
    """inputs: the differentiable arrays by keyword (None = not given); kwargs: everything else."""
    out, cache = module.forward(**inputs, **kwargs)
    dout = randn(*out.shape, seed=1)
    grads = module.backward(dout, cache)
    given = {name: arr for name, arr in inputs.items() if arr is not None}
    assert set(grads) == set(given)

    def loss():
        return float((module.forward(**inputs, **kwargs)[0] * dout).sum())

    for name, arr in given.items():
        assert grads[name].shape == arr.shape, name
        np.testing.assert_allclose(grads[name], numeric_grad(loss, arr), **GRAD_TOL, err_msg=name)


def naive_norm(x, labels, eps=EPS):
    """SPEC §1 literally: each element normalized by the biased statistics of its set S_i."""
    out = np.empty_like(x)
    for label in np.unique(labels):
        s = labels == label
        out[s] = (x[s] - x[s].mean()) / np.sqrt(x[s].var() + eps)
    return out


# ---- BN / IN / GN / LN ------------------------------------------------------------------------------

MODULES = {"bn": batch_norm, "in": instance_norm, "gn": group_norm, "ln": layer_norm}

# (method, shape, kwargs)  — why the case exists
FEATURE_CASES = [
    ("bn", (2, 3), {}),  # no spatial dims: statistics over N only
    ("bn", (2, 3, 5), {}),  # 1d, odd length
    ("bn", (2, 3, 2, 2), {}),  # 2d, the common case
    ("bn", (2, 2, 2, 3, 2), {}),  # 3d
    ("bn", (1, 3, 3, 1), {}),  # a single sample: statistics over spatial positions only
    ("in", (2, 3), {}),  # degenerate: one value per set, x̂ = 0, out = β
    ("in", (2, 3, 5), {}),  # 1d
    ("in", (2, 3, 2, 2), {}),  # 2d
    ("in", (2, 2, 2, 3, 2), {}),  # 3d
    ("gn", (2, 6, 3), {"groups": 3}),  # 2 channels per group: the ⌊c/(C/G)⌋ grouping
    ("gn", (2, 6, 2, 2), {"groups": 1}),  # G = 1 (LN over C, *spatial)
    ("gn", (2, 6, 2, 2), {"groups": 6}),  # G = C (IN)
    ("gn", (2, 4), {"groups": 2}),  # no spatial dims
    ("gn", (2, 4, 1, 2, 3), {"groups": 2}),  # 3d with a singleton spatial dim
    ("ln", (2, 3), {"normalized_ndim": 1}),  # (N, C): over C
    ("ln", (2, 3, 5), {"normalized_ndim": 2}),  # SPEC's LN: over (C, *spatial), elementwise affine
    ("ln", (2, 3, 2, 3), {"normalized_ndim": 1}),  # torch-style over the last dim only
    ("ln", (2, 3, 2, 3), {"normalized_ndim": 3}),  # SPEC's LN in 2d
    ("ln", (2, 2, 2, 3, 2), {"normalized_ndim": 4}),  # SPEC's LN in 3d
]
CASE_IDS = [f"{m}-{'x'.join(map(str, s))}-{'-'.join(f'{k}{v}' for k, v in kw.items())}"
            for m, s, kw in FEATURE_CASES]


def set_labels(method, shape, kwargs):
    """Label of the statistics set S_i of every element (SPEC §1's table)."""
    i = np.indices(shape)
    c = shape[1]
    if method == "bn":
        return i[1]
    if method == "in":
        return i[0] * c + i[1]
    if method == "gn":
        g = kwargs["groups"]
        return i[0] * g + i[1] // (c // g)
    lead = len(shape) - kwargs["normalized_ndim"]
    return np.ravel_multi_index(tuple(i[:lead]), shape[:lead]) if lead else np.zeros(shape, dtype=int)


def param_shape(method, shape, kwargs):
    return shape[len(shape) - kwargs["normalized_ndim"]:] if method == "ln" else (shape[1],)


def make_inputs(method, shape, kwargs, affine):
    pshape = param_shape(method, shape, kwargs)
    gamma, beta = (randn(*pshape, seed=2) + 1, randn(*pshape, seed=3)) if affine else (None, None)
    return {"x": randn(*shape), "gamma": gamma, "beta": beta}


def apply_affine(xhat, method, gamma, beta):
    """Naive affine: elementwise trailing for LN, per channel otherwise."""
    if gamma is None:
        return xhat
    if method != "ln":
        gamma, beta = channel_view(gamma, xhat.ndim), channel_view(beta, xhat.ndim)
    return gamma * xhat + beta


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(("method", "shape", "kwargs"), FEATURE_CASES, ids=CASE_IDS)
def test_feature_forward_matches_naive(method, shape, kwargs, affine):
    inputs = make_inputs(method, shape, kwargs, affine)
    out, cache = MODULES[method].forward(**inputs, **kwargs)
    labels = set_labels(method, shape, kwargs)
    expected = apply_affine(naive_norm(inputs["x"], labels), method, inputs["gamma"], inputs["beta"])
    assert out.dtype == np.float64 and out.shape == shape
    np.testing.assert_allclose(out, expected, **FWD_TOL)
    # cached statistics: flattened in label order
    x = inputs["x"]
    for u in np.unique(labels):
        assert np.isclose(cache["mean"].ravel()[u], x[labels == u].mean())
        assert np.isclose(cache["var"].ravel()[u], x[labels == u].var())


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize(("method", "shape", "kwargs"), FEATURE_CASES, ids=CASE_IDS)
def test_feature_grads_match_finite_differences(method, shape, kwargs, affine):
    check_grads(MODULES[method], make_inputs(method, shape, kwargs, affine), **kwargs)


@pytest.mark.parametrize(("method", "shape", "kwargs"), FEATURE_CASES, ids=CASE_IDS)
def test_eps0_gives_mean0_var1_per_set(method, shape, kwargs):
    labels = set_labels(method, shape, kwargs)
    if np.bincount(labels.ravel()).min() < 2:
        pytest.skip("one value per set: variance 0, nothing to normalize")
    out, _ = MODULES[method].forward(randn(*shape), None, None, eps=0.0, **kwargs)
    for u in np.unique(labels):
        assert abs(out[labels == u].mean()) < 1e-12
        assert abs(out[labels == u].var() - 1) < 1e-12


@pytest.mark.parametrize("shape", [(2, 6), (2, 6, 5), (2, 6, 2, 3), (2, 6, 2, 1, 2)])
def test_group_norm_1_is_layer_norm_with_channel_affine(shape):
    x, gamma, beta = randn(*shape), randn(6, seed=2), randn(6, seed=3)
    g_v, b_v = channel_view(gamma, len(shape)), channel_view(beta, len(shape))
    out_gn, cache_gn = group_norm.forward(x, gamma, beta, groups=1)
    out_ln, cache_ln = layer_norm.forward(x, None, None, normalized_ndim=len(shape) - 1)
    np.testing.assert_allclose(out_gn, g_v * out_ln + b_v, **FWD_TOL)
    dout = randn(*shape, seed=4)
    np.testing.assert_allclose(group_norm.backward(dout, cache_gn)["x"],
                               layer_norm.backward(dout * g_v, cache_ln)["x"], **FWD_TOL)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(2, 3, 5), (2, 3, 2, 3), (2, 3, 2, 1, 2)])
def test_group_norm_c_is_instance_norm(shape, affine):
    x = randn(*shape)
    gamma, beta = (randn(3, seed=2), randn(3, seed=3)) if affine else (None, None)
    out_gn, cache_gn = group_norm.forward(x, gamma, beta, groups=3)
    out_in, cache_in = instance_norm.forward(x, gamma, beta)
    np.testing.assert_allclose(out_gn, out_in, **FWD_TOL)
    dout = randn(*shape, seed=4)
    grads_gn, grads_in = group_norm.backward(dout, cache_gn), instance_norm.backward(dout, cache_in)
    assert set(grads_gn) == set(grads_in)
    for name in grads_gn:
        np.testing.assert_allclose(grads_gn[name], grads_in[name], **FWD_TOL, err_msg=name)


@pytest.mark.parametrize("shape", [(4, 3), (2, 3, 5), (2, 3, 2, 2)])
def test_batch_norm_cache_has_running_stat_inputs(shape):
    x = randn(*shape)
    _, cache = batch_norm.forward(x, None, None)
    axes = (0,) + tuple(range(2, len(shape)))
    np.testing.assert_allclose(cache["mean"], x.mean(axis=axes), **FWD_TOL)
    np.testing.assert_allclose(cache["var"], x.var(axis=axes), **FWD_TOL)
    np.testing.assert_allclose(cache["var_unbiased"], x.var(axis=axes, ddof=1), **FWD_TOL)


class _BatchNormEval:
    """batch_norm.eval_forward under the name `forward`, for check_grads."""

    forward = staticmethod(batch_norm.eval_forward)
    backward = staticmethod(batch_norm.backward)


@pytest.mark.parametrize("affine", [True, False], ids=["affine", "no-affine"])
@pytest.mark.parametrize("shape", [(2, 3), (1, 3, 2, 2), (2, 3, 5), (2, 2, 2, 1, 3)])
def test_batch_norm_eval(shape, affine):
    inputs = make_inputs("bn", shape, {}, affine)
    stats = {"running_mean": randn(shape[1], seed=5), "running_var": np.linspace(0.5, 2.0, shape[1])}
    out, _ = batch_norm.eval_forward(**inputs, **stats)
    xhat = (inputs["x"] - channel_view(stats["running_mean"], len(shape))) / np.sqrt(
        channel_view(stats["running_var"], len(shape)) + EPS)
    np.testing.assert_allclose(out, apply_affine(xhat, "bn", inputs["gamma"], inputs["beta"]), **FWD_TOL)
    check_grads(_BatchNormEval, inputs, **stats)


def test_batch_norm_eval_with_batch_stats_equals_training():
    x, gamma, beta = randn(2, 3, 2, 2), randn(3, seed=2), randn(3, seed=3)
    out, cache = batch_norm.forward(x, gamma, beta)
    out_eval, _ = batch_norm.eval_forward(x, cache["mean"], cache["var"], gamma, beta)
    np.testing.assert_allclose(out_eval, out, **FWD_TOL)


@pytest.mark.parametrize("method", ["bn", "in", "gn", "ln"])
def test_large_common_offset(method):
    kwargs = {"gn": {"groups": 3}, "ln": {"normalized_ndim": 3}}.get(method, {})
    noise = randn(2, 3, 2, 2)
    out_offset, _ = MODULES[method].forward(1e4 + noise, None, None, **kwargs)
    out, _ = MODULES[method].forward(noise, None, None, **kwargs)
    np.testing.assert_allclose(out_offset, out, rtol=1e-8, atol=1e-8)


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="divisible"):
        group_norm.forward(randn(2, 6, 3), None, None, groups=4)
    with pytest.raises(ValueError, match="gamma must have shape"):
        layer_norm.forward(randn(2, 3, 4), randn(3), None, normalized_ndim=1)
    with pytest.raises(ValueError, match="normalized_ndim"):
        layer_norm.forward(randn(2, 3), None, None, normalized_ndim=0)


# ---- Switchable Norm --------------------------------------------------------------------------------

ALL = ("in", "ln", "bn")


def softmax(z):
    e = np.exp(z - z.max())
    return e / e.sum()


def naive_switch_norm(x, gamma, beta, mean_logits, var_logits, sources, unbiased_in_var=False,
                      running_mean=None, running_var=None, eps=EPS):
    """Each source's statistics computed directly over its own set, then mixed (SPEC §1). With
    unbiased_in_var, σ²_in is ×L/(L−1), which adds mean(σ²_in_biased)/(L−1) to the LN/BN variances."""
    n, c = x.shape[:2]
    x3 = x.reshape(n, c, -1)  # (N, C, L)
    length = x3.shape[2]
    if x.ndim == 2:  # the authors' 1d code: x.var over C resp. N, unbiased if asked
        ddof = int(unbiased_in_var)
        stats = {"ln": (x.mean(1)[:, None], x.var(1, ddof=ddof)[:, None]),
                 "bn": (x.mean(0)[None], x.var(0, ddof=ddof)[None])}
    else:
        extra = x3.var(2) / (length - 1) if unbiased_in_var else np.zeros((n, c))  # (N, C)
        stats = {"in": (x3.mean(2), x3.var(2, ddof=int(unbiased_in_var))),
                 "ln": (x3.mean((1, 2))[:, None], (x3.var((1, 2)) + extra.mean(1))[:, None]),
                 "bn": (x3.mean((0, 2))[None], (x3.var((0, 2)) + extra.mean(0))[None])}
    if running_mean is not None:
        stats["bn"] = (running_mean[None], running_var[None])
    w, wv = softmax(mean_logits), softmax(var_logits)
    mean = sum(w[i] * stats[k][0] for i, k in enumerate(sources)) + np.zeros((n, c))  # (N, C)
    var = sum(wv[i] * stats[k][1] for i, k in enumerate(sources)) + np.zeros((n, c))  # (N, C)
    xhat = (x3 - mean[..., None]) / np.sqrt(var[..., None] + eps)
    out = xhat if gamma is None else gamma[:, None] * xhat + beta[:, None]
    return out.reshape(x.shape)


# (shape, sources, unbiased_in_var, eval_mode) — why the case exists
SN_CASES = [
    *[((2, 3, 2, 2), s, False, False)  # every non-empty subset of sources, 2d
      for r in (1, 2, 3) for s in itertools.combinations(ALL, r)],
    ((2, 3, 2, 2), ("bn", "in", "ln"), False, False),  # sources in another order
    ((2, 3, 2, 2), ALL, True, False),  # the authors' unbiased σ²_in feeding LN/BN
    ((2, 3, 2, 2), ("ln", "bn"), True, False),  # unbiased, without the IN source itself
    ((2, 3, 5), ALL, True, False),  # 1d spatial, odd length
    ((2, 2, 2, 3, 2), ALL, False, False),  # 3d
    ((2, 3), ("ln", "bn"), False, False),  # input (N, C): LN over C, BN over N
    ((2, 3), ("ln", "bn"), True, False),  # the authors' SwitchNorm1d: unbiased x.var over C / N
    ((2, 3, 2, 2), ALL, False, True),  # eval: BN source from running stats (constants)
    ((1, 3, 2, 2), ALL, True, True),  # eval with one sample
    ((2, 3), ("ln", "bn"), True, True),  # 1d eval
]
SN_IDS = [f"{'x'.join(map(str, s))}-{'+'.join(src)}{'-unbiased' if u else ''}{'-eval' if e else ''}"
          for s, src, u, e in SN_CASES]


def sn_inputs(shape, sources, affine=True):
    c, k = shape[1], len(sources)
    inputs = {"x": randn(*shape), "gamma": None, "beta": None,
              "mean_logits": randn(k, seed=6), "var_logits": randn(k, seed=7)}
    if affine:
        inputs["gamma"], inputs["beta"] = randn(c, seed=2) + 1, randn(c, seed=3)
    return inputs


def sn_kwargs(shape, sources, unbiased, eval_mode):
    kwargs = {"sources": sources, "unbiased_in_var": unbiased}
    if eval_mode:
        kwargs["running_mean"] = randn(shape[1], seed=8)
        kwargs["running_var"] = np.linspace(0.5, 2.0, shape[1])
    return kwargs


@pytest.mark.parametrize(("shape", "sources", "unbiased", "eval_mode"), SN_CASES, ids=SN_IDS)
def test_switch_norm_forward_matches_naive(shape, sources, unbiased, eval_mode):
    inputs, kwargs = sn_inputs(shape, sources), sn_kwargs(shape, sources, unbiased, eval_mode)
    out, cache = switch_norm.forward(**inputs, **kwargs)
    np.testing.assert_allclose(out, naive_switch_norm(**inputs, **kwargs), **FWD_TOL)
    if "bn" in sources:
        x3 = inputs["x"].reshape(*shape[:2], -1)
        mean_bn = kwargs["running_mean"] if eval_mode else x3.mean((0, 2))
        np.testing.assert_allclose(cache["mean_bn"], mean_bn, **FWD_TOL)
        if not (eval_mode or unbiased):
            np.testing.assert_allclose(cache["var_bn"], x3.var((0, 2)), **FWD_TOL)


@pytest.mark.parametrize(("shape", "sources", "unbiased", "eval_mode"), SN_CASES, ids=SN_IDS)
def test_switch_norm_grads_match_finite_differences(shape, sources, unbiased, eval_mode):
    check_grads(switch_norm, sn_inputs(shape, sources), **sn_kwargs(shape, sources, unbiased, eval_mode))


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 3)])
def test_switch_norm_grads_without_affine(shape):
    sources = ("ln", "bn") if len(shape) == 2 else ALL
    check_grads(switch_norm, sn_inputs(shape, sources, affine=False), sources=sources)


@pytest.mark.parametrize("shape", [(2, 3, 2, 2), (2, 3, 5), (2, 3)])
@pytest.mark.parametrize("pick", ALL)
def test_switch_norm_one_hot_logits_give_the_pure_method(shape, pick):
    sources = ALL if len(shape) > 2 else ("ln", "bn")
    if pick not in sources:
        pytest.skip("'in' is undefined without spatial dims")
    x, gamma, beta = randn(*shape), randn(3, seed=2), randn(3, seed=3)
    logits = np.where(np.array(sources) == pick, 20.0, 0.0)  # softmax weight ≈ 1 − 2e-9 on `pick`
    out, _ = switch_norm.forward(x, gamma, beta, logits, logits, sources=sources)
    pure = {"in": lambda: instance_norm.forward(x, gamma, beta),
            "ln": lambda: group_norm.forward(x, gamma, beta, groups=1),
            "bn": lambda: batch_norm.forward(x, gamma, beta)}[pick]
    np.testing.assert_allclose(out, pure()[0], rtol=1e-6, atol=1e-6)


def test_switch_norm_eval_with_batch_stats_equals_training():
    x, logits = randn(2, 3, 2, 2), randn(3, seed=6)
    out, cache = switch_norm.forward(x, None, None, logits, logits)
    out_eval, _ = switch_norm.forward(x, None, None, logits, logits,
                                      running_mean=cache["mean_bn"], running_var=cache["var_bn"])
    np.testing.assert_allclose(out_eval, out, **FWD_TOL)


def test_switch_norm_bad_arguments_raise():
    logits3, logits2 = np.zeros(3), np.zeros(2)
    with pytest.raises(ValueError, match="no spatial dims"):
        switch_norm.forward(randn(2, 3), None, None, logits3, logits3)
    with pytest.raises(ValueError, match="one per source"):
        switch_norm.forward(randn(2, 3, 4), None, None, logits2, logits3)
    with pytest.raises(ValueError, match="subset"):
        switch_norm.forward(randn(2, 3, 4), None, None, logits2, logits2, sources=("in", "gn"))
    with pytest.raises(ValueError, match="running_mean and running_var"):
        switch_norm.forward(randn(2, 3, 4), None, None, logits3, logits3, running_mean=np.zeros(3))

"""Mean-only batch normalization: y = x − μ_B + β against a float64 formula, its gradient, running means
with PyTorch's momentum convention (checked against torch.nn.BatchNorm), train/eval, dtypes, layouts,
the registry and clear errors."""

import copy
import pickle

import pytest
import torch
from torch import nn

from normlab.nn.mean_only_batch_norm import (
    MeanOnlyBatchNorm1d,
    MeanOnlyBatchNorm2d,
    MeanOnlyBatchNorm3d,
    mean_only_batch_norm,
)
from normlab.registry import create_norm, norm_kind

# Tolerances (rtol = atol):
# - float64 vs the float64 formula: a subtraction and a mean, a few ulps.
# - float32: the mean of O(1) values over ≤ a few hundred elements, a few float32 ulps.
# - float16 / bfloat16 output: x − μ computed in float32, rounded once to 2^-11 / 2^-8 relative of |x| ≲ 4.
TOL = {
    torch.float64: 1e-12,
    torch.float32: 1e-5,
    torch.float16: 4e-3,
    torch.bfloat16: 3e-2,
}


def close(actual, expected, dtype):
    tol = TOL[dtype]
    torch.testing.assert_close(actual, expected, rtol=tol, atol=tol, check_dtype=False)


def randn(*shape, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


def formula(x, bias):
    """y = x − mean over (N, *spatial) + bias, in float64."""
    x = x.double()
    axes = [0] + list(range(2, x.dim()))
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x - x.mean(axes, keepdim=True) + bias.double().reshape(shape)


# (module class, input shape, why)
SHAPE_CASES = [
    (MeanOnlyBatchNorm1d, (8, 5), "(N, C): after a Linear"),
    (MeanOnlyBatchNorm1d, (4, 5, 7), "(N, C, L)"),
    (MeanOnlyBatchNorm2d, (3, 5, 4, 6), "(N, C, H, W)"),
    (MeanOnlyBatchNorm3d, (2, 5, 3, 4, 2), "(N, C, D, H, W)"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("cls,shape,why", SHAPE_CASES, ids=[c[2] for c in SHAPE_CASES])
def test_training_forward_and_gradients(cls, shape, why, dtype):
    m = cls(shape[1], dtype=dtype)
    with torch.no_grad():
        m.bias.copy_(randn(shape[1], seed=1))
    x = randn(*shape, seed=2, dtype=dtype).requires_grad_()
    y = m(x)
    close(y, formula(x.detach(), m.bias.detach()), dtype)
    assert y.dtype == dtype
    dy = randn(*shape, seed=3, dtype=dtype)
    y.backward(dy)
    axes = [0] + list(range(2, len(shape)))
    # ∂l/∂x = dy − mean(dy) per channel (the mean's gradient); ∂l/∂β = Σ dy
    close(x.grad, dy - dy.mean(axes, keepdim=True), dtype)
    close(m.bias.grad, dy.sum(axes), dtype)


def test_output_has_zero_batch_mean_plus_bias_and_can_fail():
    m = MeanOnlyBatchNorm2d(4)
    x = 3.0 + randn(6, 4, 5, 5, dtype=torch.float32)
    y = m(x)
    close(y.mean((0, 2, 3)), torch.zeros(4), torch.float32)
    assert not torch.allclose(x.mean((0, 2, 3)), torch.zeros(4), atol=1)  # the input did have a mean
    # no division: the spread is untouched
    close(y.std((0, 2, 3)), x.std((0, 2, 3)), torch.float32)


def test_gradcheck_float64():
    m = MeanOnlyBatchNorm2d(3, dtype=torch.float64)
    x = randn(2, 3, 3, 2, seed=4).requires_grad_()
    assert torch.autograd.gradcheck(lambda x, b: mean_only_batch_norm(x, None, b, training=True), (x, m.bias))


# (momentum, why)
MOMENTUM_CASES = [
    (0.1, "PyTorch's default"),
    (0.5, "heavier"),
    (None, "cumulative average"),
    (1.0, "last batch only"),
]


@pytest.mark.parametrize("momentum,why", MOMENTUM_CASES, ids=[c[1] for c in MOMENTUM_CASES])
def test_running_mean_matches_torch_batch_norm(momentum, why):
    # torch.nn.BatchNorm2d keeps its running mean with the same convention: compare after three batches.
    ours = MeanOnlyBatchNorm2d(4, momentum=momentum)
    theirs = nn.BatchNorm2d(4, momentum=momentum)
    for seed in range(3):
        x = 2.0 + randn(5, 4, 3, 3, seed=seed, dtype=torch.float32)
        ours(x)
        theirs(x)
    close(ours.running_mean, theirs.running_mean, torch.float32)
    assert ours.num_batches_tracked.item() == 3


def test_momentum_none_is_the_average_of_batch_means():
    m = MeanOnlyBatchNorm1d(3, momentum=None)
    batches = [randn(4, 3, seed=s, dtype=torch.float32) + s for s in range(4)]
    for b in batches:
        m(b)
    close(m.running_mean, torch.stack([b.mean(0) for b in batches]).mean(0), torch.float32)


def test_eval_uses_running_mean_and_serves_one_sample():
    m = MeanOnlyBatchNorm2d(3)
    for seed in range(5):
        m(1.5 + randn(8, 3, 4, 4, seed=seed, dtype=torch.float32))
    m.eval()
    before = m.running_mean.clone()
    x = randn(1, 3, 4, 4, seed=9, dtype=torch.float32)
    close(m(x), x - before.reshape(1, 3, 1, 1) + m.bias.detach().reshape(1, 3, 1, 1), torch.float32)
    assert torch.equal(m.running_mean, before) and m.num_batches_tracked.item() == 5


def test_without_running_stats_uses_batch_mean_in_eval():
    m = MeanOnlyBatchNorm2d(3, track_running_stats=False, affine=False).eval()
    assert m.running_mean is None and m.bias is None and set(m.state_dict()) == set()
    x = randn(4, 3, 2, 2, seed=10, dtype=torch.float32)
    close(m(x), formula(x, torch.zeros(3)), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_input_keeps_dtype_and_accumulates_in_float32(dtype):
    m = MeanOnlyBatchNorm2d(4)  # float32 bias and running mean, as with autocast
    x = (100.0 + randn(16, 4, 8, 8, seed=11)).to(dtype)
    y = m(x)
    assert y.dtype == dtype and m.running_mean.dtype == torch.float32
    close(y.float(), formula(x.float(), torch.zeros(4)).float(), dtype)
    # the running mean is 0.1 × the float32 mean of the (rounded) input
    close(m.running_mean, 0.1 * x.double().mean((0, 2, 3)).float(), torch.float32)


def test_large_offset():
    # x = 1e4 + noise in float32: a mean rounded to float32 would be off by up to ulp(1e4)/2 ≈ 5e-4.
    x = (1e4 + randn(8, 3, 5, 5, seed=12)).float()
    y = MeanOnlyBatchNorm2d(3)(x)
    close(y, formula(x, torch.zeros(3)).float(), torch.float32)


def test_channels_last_keeps_layout():
    m = MeanOnlyBatchNorm2d(3)
    x = randn(2, 3, 4, 5, seed=13, dtype=torch.float32)
    y = m(x.contiguous(memory_format=torch.channels_last))
    assert y.is_contiguous(memory_format=torch.channels_last)
    close(y, MeanOnlyBatchNorm2d(3)(x), torch.float32)


def test_state_repr_and_copies():
    m = MeanOnlyBatchNorm2d(3, momentum=None)
    m(randn(4, 3, 2, 2, dtype=torch.float32))
    assert set(m.state_dict()) == {"bias", "running_mean", "num_batches_tracked"}
    assert repr(m) == "MeanOnlyBatchNorm2d(3, momentum=None, affine=True, track_running_stats=True)"
    for other in (copy.deepcopy(m), pickle.loads(pickle.dumps(m))):
        assert torch.equal(other.running_mean, m.running_mean)
    fresh = MeanOnlyBatchNorm2d(3, momentum=None)
    fresh.load_state_dict(m.state_dict(), strict=True)
    assert fresh.num_batches_tracked.item() == 1
    fresh.reset_parameters()
    assert fresh.num_batches_tracked.item() == 0 and (fresh.running_mean == 0).all()


@pytest.mark.parametrize(
    "dim,cls",
    [(0, MeanOnlyBatchNorm1d), (1, MeanOnlyBatchNorm1d), (2, MeanOnlyBatchNorm2d), (3, MeanOnlyBatchNorm3d)],
)
def test_registry_picks_by_spatial_dims(dim, cls):
    assert norm_kind("mobn") == "feature" and norm_kind("mean_only_bn") == "feature"
    m = create_norm("mean_only_bn", 6, dim=dim, momentum=0.2)
    assert type(m) is cls and m.num_features == 6 and m.momentum == 0.2


@pytest.mark.parametrize(
    "call,error,match",
    [
        (lambda: MeanOnlyBatchNorm2d(3)(torch.zeros(2, 4, 3, 3)), ValueError, "built for 3 channels"),
        (lambda: MeanOnlyBatchNorm2d(3)(torch.zeros(2, 3, 3)), ValueError, r"4D input \(N, C, H, W\)"),
        (lambda: MeanOnlyBatchNorm1d(3)(torch.zeros(1, 3)), ValueError, "more than 1 value per channel"),
        (lambda: MeanOnlyBatchNorm1d(3)(torch.zeros(2, 3, dtype=torch.long)), TypeError, "floating-point"),
        (lambda: MeanOnlyBatchNorm2d(3, momentum=1.5), ValueError, "weight of the new batch"),
        (lambda: MeanOnlyBatchNorm2d(0), ValueError, "positive int"),
        (lambda: create_norm("mobn", 3, dim=4), ValueError, r"must be one of \[0, 1, 2, 3\]"),
    ],
    ids=["channels", "rank", "one value per channel", "integer input", "momentum", "num_features", "dim"],
)
def test_bad_input_raises_clear_errors(call, error, match):
    with pytest.raises(error, match=match):
        call()

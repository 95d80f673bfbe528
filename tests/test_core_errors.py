"""Errors that teach (issue §6): every bad input raises ValueError or TypeError whose message names what
was expected and what was received; and the registry that builds layers by name."""

import functools
import math
import re

import pytest
import torch
from torch import nn

import normlab
import normlab.functional as NF


def x(*shape, dtype=torch.float32):
    return torch.ones(shape, dtype=dtype) if not dtype.is_floating_point else torch.randn(shape, dtype=dtype)


def logits(k):
    return torch.zeros(k)


V, T = ValueError, TypeError

# (id, call, exception, message pattern: expected ... received) — one row per error of §6
ERROR_CASES = [
    # wrong number of dimensions
    ("bn2d-3d", lambda: normlab.BatchNorm2d(3)(x(2, 3, 4)), V,
     r"expects 4D input \(N, C, H, W\), got 3D input of shape \(2, 3, 4\)"),
    ("bn1d-4d", lambda: normlab.BatchNorm1d(3)(x(2, 3, 4, 4)), V, r"expects 2D or 3D .* got 4D"),
    ("bn3d-4d", lambda: normlab.BatchNorm3d(3)(x(2, 3, 4, 4)), V, r"expects 5D .* got 4D"),
    ("in2d-5d", lambda: normlab.InstanceNorm2d(3)(x(2, 3, 2, 2, 2)), V, r"expects 3D or 4D .* got 5D"),
    ("gn-1d", lambda: normlab.GroupNorm(1, 4)(x(4)), V, r"expects 2D or 3D or 4D or 5D .* got 1D"),
    ("sn2d-3d", lambda: normlab.SwitchNorm2d(3)(x(2, 3, 4)), V, r"expects 4D .* got 3D"),
    ("sn1d-4d", lambda: normlab.SwitchNorm1d(3)(x(2, 3, 2, 2)), V, r"expects 2D or 3D .* got 4D"),
    ("F.in-2d", lambda: NF.instance_norm(x(2, 3)), V, r"expects 3D or 4D or 5D .* got 2D"),
    ("F.bn-1d", lambda: NF.batch_norm(x(3), None, None, training=True), V, r"expects 2D .* got 1D"),
    ("ln-shape", lambda: normlab.LayerNorm(4)(x(2, 3, 5)), V,
     r"expected input with shape \(\*, 4\) .* got input of shape \(2, 3, 5\)"),
    # channel count mismatch
    ("bn-channels", lambda: normlab.BatchNorm2d(3)(x(2, 4, 2, 2)), V,
     r"built for 3 channels but got input of shape \(2, 4, 2, 2\) with 4 channels"),
    ("in-channels-no-affine", lambda: normlab.InstanceNorm1d(3)(x(2, 5, 4)), V,
     r"built for 3 channels .* with 5 channels"),  # an error even without affine (torch only warns)
    ("gn-channels", lambda: normlab.GroupNorm(2, 4)(x(2, 6, 3)), V, r"built for 4 channels .* 6 channels"),
    ("sn-channels", lambda: normlab.SwitchNorm2d(3)(x(2, 2, 2, 2)), V, r"built for 3 channels .* 2 channels"),
    ("F.bn-weight", lambda: NF.batch_norm(x(2, 3), None, None, x(4), training=True), V,
     r"weight must have 3 elements.* got shape \(4,\)"),
    ("F.gn-bias", lambda: NF.group_norm(x(2, 4, 3), 2, None, x(3)), V,
     r"bias must have 4 elements.* got shape \(3,\)"),
    ("F.sn-logits", lambda: NF.switch_norm(x(2, 3, 4), logits(2), logits(3)), V,
     r"mean_logits must have 3 elements.* one per source .* got shape \(2,\)"),
    ("F.ln-weight", lambda: NF.layer_norm(x(2, 3, 4), (4,), x(3)), V,
     r"weight must have shape \(4,\), got \(3,\)"),
    # C not divisible by G
    ("gn-divisible", lambda: normlab.GroupNorm(4, 6), V,
     r"divisible by num_groups, got 6 channels and 4 groups; divisors of 6: \[1, 2, 3, 6\]"),
    ("F.gn-divisible", lambda: NF.group_norm(x(2, 6, 3), 4), V, r"divisible.* 6 channels and 4 groups"),
    ("gn-zero-groups", lambda: normlab.GroupNorm(0, 6), V, r"must be positive, got 0 and 6"),
    # one value per channel in training
    ("bn-one-value", lambda: normlab.BatchNorm1d(3)(x(1, 3)), V,
     r"expected more than 1 value per channel when training, got input of shape \(1, 3\)"),
    ("bn2d-one-value", lambda: normlab.BatchNorm2d(3)(x(1, 3, 1, 1)), V,
     r"more than 1 value per channel .* \(1, 3, 1, 1\)"),
    ("sn-one-value", lambda: normlab.SwitchNorm1d(3)(x(1, 3)), V,
     r"more than 1 value per channel .* \(1, 3\).*using_bn=False"),  # points to the fix
    ("F.sn-one-value", lambda: NF.switch_norm(x(1, 3, 1), logits(2), logits(2), training=True,
                                              sources=("ln", "bn")), V, r"more than 1 value.*using_bn=False"),
    ("in-one-position", lambda: NF.instance_norm(x(2, 3, 1)), V,
     r"more than 1 spatial element per instance, got input of shape \(2, 3, 1\)"),
    ("sn-in-one-position", lambda: normlab.SwitchNorm2d(3)(x(2, 3, 1, 1)), V,
     r"more than one position per channel, got input of shape \(2, 3, 1, 1\)"),
    # integer (and other non-floating) tensors, and non-tensors
    ("bn-int64", lambda: normlab.BatchNorm2d(3)(x(2, 3, 2, 2, dtype=torch.int64)), T,
     r"expects a floating-point input \(float16, bfloat16, float32 or float64\), got torch.int64"),
    ("gn-int32", lambda: normlab.GroupNorm(1, 3)(x(2, 3, 2, dtype=torch.int32)), T,
     r"floating-point .* got torch.int32"),
    ("ln-uint8", lambda: normlab.LayerNorm(4)(x(2, 4, dtype=torch.uint8)), T,
     r"floating-point .* got torch.uint8"),
    ("in-bool", lambda: normlab.InstanceNorm1d(3)(x(2, 3, 4, dtype=torch.bool)), T,
     r"floating-point .* got torch.bool"),
    ("sn-int", lambda: normlab.SwitchNorm2d(3)(x(2, 3, 2, 2, dtype=torch.int16)), T,
     r"floating-point .* got torch.int16"),
    ("F.sn-int", lambda: NF.switch_norm(x(2, 3, 2, dtype=torch.int64), logits(3), logits(3)), T,
     r"floating-point .* got torch.int64"),
    ("bn-list", lambda: normlab.BatchNorm1d(3)([[1.0, 2.0, 3.0]]), T,
     r"expects a torch.Tensor input, got list"),
    ("F.gn-array", lambda: NF.group_norm(x(2, 2).numpy(), 1), T, r"torch.Tensor input, got ndarray"),
    # negative or non-finite eps
    ("bn-eps-negative", lambda: normlab.BatchNorm2d(3, eps=-1e-5), V,
     r"eps must be a finite number >= 0, got -1e-05"),
    ("ln-eps-nan", lambda: normlab.LayerNorm(3, eps=math.nan), V,
     r"eps must be a finite number >= 0, got nan"),
    ("gn-eps-inf", lambda: normlab.GroupNorm(1, 3, eps=math.inf), V, r"finite number >= 0, got inf"),
    ("in-eps-negative", lambda: normlab.InstanceNorm2d(3, eps=-1.0), V, r"finite number >= 0, got -1.0"),
    ("sn-eps-nan", lambda: normlab.SwitchNorm2d(3, eps=math.nan), V, r"finite number >= 0, got nan"),
    ("F.bn-eps", lambda: NF.batch_norm(x(2, 3), None, None, training=True, eps=-1.0), V,
     r"eps must be a finite number >= 0, got -1.0"),
    ("F.ln-eps", lambda: NF.layer_norm(x(2, 3), (3,), eps=math.inf), V, r"eps .* got inf"),
    ("F.gn-eps", lambda: NF.group_norm(x(2, 3), 1, eps=-0.1), V, r"eps .* got -0.1"),
    ("F.in-eps", lambda: NF.instance_norm(x(2, 3, 4), eps=math.nan), V, r"eps .* got nan"),
    ("F.sn-eps", lambda: NF.switch_norm(x(2, 3, 4), logits(3), logits(3), eps=-1.0), V, r"eps .* got -1.0"),
    # negative or non-finite momentum (PyTorch's convention: the new batch's weight in [0, 1])
    ("bn-momentum-negative", lambda: normlab.BatchNorm2d(3, momentum=-0.1), V,
     r"momentum must be a finite number in \[0, 1\] .* got -0.1"),
    ("bn-momentum-inf", lambda: normlab.BatchNorm1d(3, momentum=math.inf), V, r"momentum .* got inf"),
    ("in-momentum-nan", lambda: normlab.InstanceNorm2d(3, momentum=math.nan), V, r"momentum .* got nan"),
    ("sn-momentum-big", lambda: normlab.SwitchNorm2d(3, momentum=1.5), V, r"momentum .* \[0, 1\].* got 1.5"),
    ("F.bn-momentum",
     lambda: NF.batch_norm(x(2, 3), torch.zeros(3), torch.ones(3), training=True, momentum=-1.0),
     V, r"momentum .* got -1.0"),
    ("F.in-momentum", lambda: NF.instance_norm(x(2, 3, 4), momentum=math.nan), V, r"momentum .* got nan"),
    ("F.bn-momentum-none",
     lambda: NF.batch_norm(x(2, 3), torch.zeros(3), torch.ones(3), training=True, momentum=None),
     V, r"momentum must be a number in \[0, 1\] or a tensor .* got None"),
    ("F.sn-momentum", lambda: NF.switch_norm(x(2, 3, 4), logits(3), logits(3), momentum=math.inf), V,
     r"momentum .* got inf"),
    ("sn-authors-momentum-none", lambda: normlab.SwitchNorm2d(3, authors_compat=True, momentum=None), V,
     r"momentum=None .* needs num_batches_tracked"),  # the authors' checkpoints have no counter
    # other constructor arguments
    ("bn-num-features", lambda: normlab.BatchNorm2d(0), V, r"num_features must be a positive int, got 0"),
    ("ln-shape-arg", lambda: normlab.LayerNorm(()), V, r"normalized_shape must be .* got \(\)"),
    ("F.sn-sources", lambda: NF.switch_norm(x(2, 3, 4), logits(2), logits(2), sources=("in", "gn")), V,
     r"sources must be distinct names from \('in', 'ln', 'bn'\), got \('in', 'gn'\)"),
    ("F.bn-eval-no-stats", lambda: NF.batch_norm(x(2, 3), None, None, training=False), V,
     r"eval mode .* running_mean and running_var, got None"),
]


@pytest.mark.parametrize(("call", "exc", "pattern"), [c[1:] for c in ERROR_CASES],
                         ids=[c[0] for c in ERROR_CASES])
def test_bad_input_raises_a_teaching_error(call, exc, pattern):
    with pytest.raises(exc, match=pattern):
        call()


def test_module_errors_name_the_module():
    with pytest.raises(ValueError, match=r"^BatchNorm2d"):
        normlab.BatchNorm2d(3)(x(2, 3, 4))
    with pytest.raises(ValueError, match=r"^GroupNorm"):
        normlab.GroupNorm(4, 6)


@pytest.mark.parametrize("module", [normlab.BatchNorm1d(3), normlab.SwitchNorm1d(3)], ids=["bn", "sn"])
def test_one_sample_is_fine_in_eval(module):
    """The error is about training statistics: eval uses running statistics, so one sample is served."""
    module.eval()
    assert torch.isfinite(module(x(1, 3))).all()


def test_zero_eps_and_momentum_bounds_are_accepted():
    for momentum in (0.0, 1.0, None):
        normlab.BatchNorm2d(3, eps=0.0, momentum=momentum)
    normlab.GroupNorm(1, 3, eps=0)


# ---------------------------------------------------------------- registry

def test_create_norm_by_name():
    gn = normlab.create_norm("gn", 64, groups=32)
    assert isinstance(gn, normlab.GroupNorm) and (gn.num_groups, gn.num_channels) == (32, 64)
    assert isinstance(normlab.create_norm("bn", 8), normlab.BatchNorm2d)
    assert isinstance(normlab.create_norm("bn", 8, dim=1), normlab.BatchNorm1d)
    assert isinstance(normlab.create_norm("bn", 8, dim=0), normlab.BatchNorm1d)
    assert isinstance(normlab.create_norm("bn", 8, dim=3), normlab.BatchNorm3d)
    inorm = normlab.create_norm("in", 8)
    assert isinstance(inorm, normlab.InstanceNorm2d) and inorm.affine
    ln = normlab.create_norm("ln", 8)  # SPEC's LN of a feature map: GN(1), per-channel affine
    assert isinstance(ln, normlab.GroupNorm) and ln.num_groups == 1
    sn = normlab.create_norm("sn", 8, dim=3, using_bn=False)
    assert isinstance(sn, normlab.SwitchNorm3d) and sn.sources == ("in", "ln")
    assert isinstance(normlab.create_norm("none", 8), nn.Identity)
    bn = normlab.create_norm("bn", 8, eps=1e-3, momentum=None)  # keyword arguments reach the layer
    assert (bn.eps, bn.momentum) == (1e-3, None)


@pytest.mark.parametrize(("alias", "kwargs", "cls"), [
    ("BatchNorm", {}, normlab.BatchNorm2d),  # case-insensitive
    ("batch_norm", {}, normlab.BatchNorm2d),
    ("GroupNorm", {"groups": 2}, normlab.GroupNorm),
    ("group-norm", {"groups": 2}, normlab.GroupNorm),  # '-' reads as '_'
    ("instance_norm", {}, normlab.InstanceNorm2d),
    ("SwitchNorm", {}, normlab.SwitchNorm2d),
    ("layernorm", {}, normlab.GroupNorm),  # GN(1)
    ("identity", {}, nn.Identity),
])
def test_create_norm_by_alias(alias, kwargs, cls):
    assert type(normlab.create_norm(alias, 4, **kwargs)) is cls


def test_create_norm_from_partial_and_class():
    layer = normlab.create_norm(functools.partial(normlab.GroupNorm, 4), 8)
    assert isinstance(layer, normlab.GroupNorm) and (layer.num_groups, layer.num_channels) == (4, 8)
    torch_layer = normlab.create_norm(functools.partial(nn.GroupNorm, 2), 8)
    assert isinstance(torch_layer, nn.GroupNorm) and torch_layer.num_channels == 8
    assert normlab.create_norm(normlab.BatchNorm2d, 8, eps=1e-3).eps == 1e-3
    seen = {}

    def factory(num_channels, dim, **kwargs):  # a plain callable also gets dim
        seen.update(num_channels=num_channels, dim=dim, **kwargs)
        return nn.Identity()

    normlab.create_norm(factory, 8, dim=1, flag=True)
    assert seen == {"num_channels": 8, "dim": 1, "flag": True}


def test_list_norms():
    names = normlab.list_norms()
    assert names == sorted(names) and len(names) == len(set(names))
    assert {"bn", "ln", "in", "gn", "sn", "none"} <= set(names)
    for name in ("bn", "ln", "in", "gn", "sn"):
        assert normlab.norm_kind(name) == "feature"
        assert isinstance(normlab.create_norm(name, 4, **({"groups": 2} if name == "gn" else {})), nn.Module)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match=r"unknown norm 'batchnrom'; expected one of \[.*'bn'.*'gn'.*\]"):
        normlab.create_norm("batchnrom", 8)
    with pytest.raises(TypeError, match=r"registered name or a callable, got int"):
        normlab.create_norm(3, 8)


def test_registry_argument_errors():
    expected = re.escape("got 10 channels and 4 groups; divisors of 10: [1, 2, 5, 10]")
    with pytest.raises(ValueError, match=expected):
        normlab.create_norm("gn", 10, groups=4)
    with pytest.raises(ValueError, match=r"divisible.* 8 channels and 32 groups"):
        normlab.create_norm("gn", 8)  # the default of 32 groups does not fit 8 channels
    with pytest.raises(ValueError, match=r"dim .* must be one of \[0, 1, 2, 3\], got 4"):
        normlab.create_norm("bn", 8, dim=4)
    with pytest.raises(ValueError, match=r"dim .* must be one of \[1, 2, 3\], got 0"):
        normlab.create_norm("in", 8, dim=0)

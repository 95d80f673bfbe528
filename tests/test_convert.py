"""normlab.convert: swapping norm methods in existing models, BN <-> SyncBN, freezing and folding BN.

Models mix torch.nn's and normlab's layers and nest them; every check is against the model before the
change: which layers were replaced and by what, what carried over (parameters, running statistics, device,
dtype, mode, requires_grad), and the outputs where they must not change (eval-mode BN vs its frozen,
synchronized-in-one-process or folded form: within 1e-4 in float32).
"""

from __future__ import annotations

import copy
import functools
import math

import pytest
import torch
from torch import nn

import normlab
from normlab.convert import (
    FrozenBatchNorm,
    convert,
    convert_sync_batchnorm,
    describe,
    freeze_bn,
    revert_sync_batchnorm,
    unfreeze_bn,
)
from normlab.distributed import SyncBatchNorm, SyncSwitchNorm
from normlab.fold import fold_bn

TOL = {"rtol": 1e-4, "atol": 1e-4}


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial affine parameters and running statistics, so that carrying them over is visible."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in [*model.named_parameters(), *model.named_buffers()]:
            if not t.is_floating_point():
                continue
            noise = torch.randn(t.shape, generator=gen, dtype=torch.float64).to(t.dtype)
            if name.endswith("running_var"):
                t.copy_(noise.abs() + 0.5)
            else:
                t.add_(noise * 0.5)
    return model


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.norm = normlab.SwitchNorm2d(8)

    def forward(self, x):
        return torch.relu(self.norm(self.conv(x)))


def mixed_model() -> nn.Module:
    """Every kind of channels-first norm, from torch.nn and normlab, nested; plus a trailing LayerNorm."""
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        nn.BatchNorm2d(4),  # torch.nn BN
        nn.Sequential(Block(), nn.Conv2d(8, 8, 1), nn.GroupNorm(2, 8)),  # nested: normlab SN, torch GN
        nn.Conv2d(8, 8, 1),
        normlab.BatchNorm2d(8),
        nn.InstanceNorm2d(8, affine=True),
        nn.Flatten(1),
        nn.Linear(8 * 16, 6),
        nn.BatchNorm1d(6),
        nn.LayerNorm(6),  # trailing dims: not a channels-first norm, left alone
    )


def norm_layers(model: nn.Module) -> dict[str, nn.Module]:
    return {name: m for name, m in model.named_modules() if describe(m) is not None}


# ---------------------------------------------------------------- convert


def test_convert_to_gn_replaces_every_norm_and_carries_affine():
    model = randomize(mixed_model())
    before = norm_layers(model)
    out = convert(model, "gn", groups=lambda c: math.gcd(c, 4))
    assert out is model
    after = norm_layers(model)
    assert after.keys() == before.keys()  # same places, nested ones included
    for name, layer in after.items():
        assert type(layer) is normlab.GroupNorm, name
        assert layer.num_groups == math.gcd(layer.num_channels, 4)
        old = before[name]
        torch.testing.assert_close(layer.weight.detach(), old.weight.detach().reshape(-1), rtol=0, atol=0)
        torch.testing.assert_close(layer.bias.detach(), old.bias.detach().reshape(-1), rtol=0, atol=0)
    assert isinstance(model[9], nn.LayerNorm)
    model(torch.randn(2, 3, 4, 4))  # still a working model


@pytest.mark.parametrize("target, cls", [("ln", normlab.GroupNorm), ("none", nn.Identity), ("bn", None)])
def test_convert_to_other_methods(target, cls):
    model = mixed_model()
    convert(model, target, dim=2)  # dim: for the GroupNorm, which does not record its input's dims
    for name, layer in model.named_modules():
        if name in ("1", "2.0.norm", "2.2", "4", "5", "8"):
            if cls is None:  # BN: the class picked by the input's spatial dims
                assert type(layer) is (normlab.BatchNorm1d if name == "8" else normlab.BatchNorm2d), name
            else:
                assert type(layer) is cls, name
    assert model[2][2].num_groups == 1 if target == "ln" else True


def test_convert_needs_dim_only_where_the_class_does_not_record_it():
    with pytest.raises(ValueError, match=r"2\.2 is a GroupNorm.*pass dim="):
        convert(mixed_model(), "sn")
    model = convert(mixed_model(), "sn", only=("bn", "in"))  # their classes say 1d / 2d
    assert type(model[1]) is normlab.SwitchNorm2d and type(model[8]) is normlab.SwitchNorm1d
    assert type(model[2][2]) is nn.GroupNorm


def test_convert_carries_running_stats_where_they_mean_the_same():
    model = randomize(mixed_model())
    bn = copy.deepcopy(model[1])
    convert(model, "sn", only="bn")
    sn = model[1]
    assert type(sn) is normlab.SwitchNorm2d
    for key in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(sn, key), getattr(bn, key), rtol=0, atol=0)
    assert sn.momentum == bn.momentum
    # IN's running statistics average per-instance statistics: not BN's, not carried
    model = convert(nn.Sequential(nn.InstanceNorm2d(4, affine=True, track_running_stats=True)), "bn")
    torch.testing.assert_close(model[0].running_var, torch.ones(4), rtol=0, atol=0)


def test_torch_bn_to_normlab_bn_computes_the_same():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4, momentum=0.3), nn.ReLU()))
    converted = convert(copy.deepcopy(model), "bn")
    assert type(converted[1]) is normlab.BatchNorm2d and converted[1].momentum == 0.3
    x = torch.randn(4, 3, 6, 6)
    for mode in (False, True):  # eval: running statistics; train: batch statistics and the update
        model.train(mode), converted.train(mode)
        torch.testing.assert_close(converted(x), model(x), **TOL)
    torch.testing.assert_close(converted[1].running_var, model[1].running_var, **TOL)


def test_convert_keeps_dtype_device_mode_and_sharing():
    shared = nn.BatchNorm2d(4)
    model = nn.Sequential(shared, nn.Sequential(shared)).double().eval()
    convert(model, "gn", groups=2)
    assert model[0] is model[1][0]  # one layer used twice stays one layer
    assert model[0].weight.dtype == torch.float64 and not model[0].training
    meta = convert(nn.Sequential(nn.BatchNorm2d(4)).to("meta"), "sn")
    assert meta[0].weight.device.type == "meta"


def test_convert_root_factories_and_bad_arguments():
    root = convert(nn.BatchNorm2d(4), "gn", groups=2)  # the model itself is a norm: use the return value
    assert type(root) is normlab.GroupNorm
    made = convert(mixed_model(), functools.partial(nn.GroupNorm, 1), only="bn")
    assert type(made[1]) is nn.GroupNorm and made[1].num_groups == 1
    with pytest.raises(ValueError, match="unknown norm"):
        convert(mixed_model(), "batchnormz")
    with pytest.raises(ValueError, match="only= takes kinds"):
        convert(mixed_model(), "gn", only="layer_norm")
    with pytest.raises(ValueError, match="divisible"):
        convert(mixed_model(), "gn", groups=3)


def test_mean_only_bn_converts_both_ways():
    if "mobn" not in normlab.list_norms():
        pytest.skip("mean-only BN is not registered")
    bn = randomize(nn.Sequential(nn.BatchNorm2d(4, momentum=0.2)))
    mobn = convert(copy.deepcopy(bn), "mobn")[0]
    assert describe(mobn).kind == "mobn" and mobn.momentum == 0.2
    torch.testing.assert_close(mobn.bias.detach(), bn[0].bias.detach(), rtol=0, atol=0)  # β: the same shift
    torch.testing.assert_close(mobn.running_mean, bn[0].running_mean, rtol=0, atol=0)
    back = convert(nn.Sequential(mobn), "bn")[0]
    assert type(back) is normlab.BatchNorm2d
    torch.testing.assert_close(back.weight.detach(), torch.ones(4), rtol=0, atol=0)  # mean-only BN has no γ
    torch.testing.assert_close(back.bias.detach(), bn[0].bias.detach(), rtol=0, atol=0)
    torch.testing.assert_close(back.running_mean, bn[0].running_mean, rtol=0, atol=0)


def test_bias_free_affine_carries():
    model = convert(nn.Sequential(nn.BatchNorm2d(4, bias=False)), "gn", groups=2)
    assert model[0].weight is not None and model[0].bias is None


# ---------------------------------------------------------------- BN <-> SyncBN


def test_sync_round_trip_restores_classes_and_state():
    model = randomize(mixed_model())
    original = copy.deepcopy(model)
    classes = {name: type(m) for name, m in model.named_modules()}
    synced = convert_sync_batchnorm(model)
    for name in ("1", "4", "8"):
        assert type(synced.get_submodule(name)) is SyncBatchNorm, name
    assert type(synced.get_submodule("2.0.norm")) is SyncSwitchNorm
    assert type(synced[2][2]) is nn.GroupNorm and type(synced[5]) is nn.InstanceNorm2d  # not BN: untouched
    assert synced.state_dict().keys() == original.state_dict().keys()

    x = torch.randn(3, 3, 4, 4)
    for mode in (True, False):  # one process: the synchronized layers compute what the local ones do
        original.train(mode), synced.train(mode)
        torch.testing.assert_close(synced(x), original(x), **TOL)

    reverted = revert_sync_batchnorm(synced)
    assert {name: type(m) for name, m in reverted.named_modules()} == classes  # torch.nn's back to torch.nn's
    for key, value in reverted.state_dict().items():
        torch.testing.assert_close(value, original.state_dict()[key], **TOL, msg=key)  # after 1 train step


def test_torch_sync_batch_norm_reverts_with_dim():
    model = nn.Sequential(randomize(nn.SyncBatchNorm(4)))
    with pytest.raises(ValueError, match="pass dim="):
        revert_sync_batchnorm(copy.deepcopy(model))
    reverted = revert_sync_batchnorm(copy.deepcopy(model), dim=2)
    assert type(reverted[0]) is normlab.BatchNorm2d
    torch.testing.assert_close(reverted[0].running_mean, model[0].running_mean, rtol=0, atol=0)
    assert type(convert(model, "sync_bn")[0]) is SyncBatchNorm  # torch's SyncBN -> normlab's


# ---------------------------------------------------------------- freeze


def test_freeze_bn_uses_and_keeps_running_stats():
    model = randomize(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), normlab.BatchNorm2d(4)))
    reference = copy.deepcopy(model).eval()
    frozen = freeze_bn(model)
    assert all(type(frozen[i]) is FrozenBatchNorm for i in (1, 3))
    assert frozen.state_dict().keys() == reference.state_dict().keys()  # checkpoints load both ways
    frozen.train()
    x = torch.randn(4, 3, 6, 6)
    for _ in range(2):
        torch.testing.assert_close(frozen(x), reference(x), **TOL)  # training uses the running statistics
    torch.testing.assert_close(frozen[1].running_mean, reference[1].running_mean, rtol=0, atol=0)
    assert not frozen[1].weight.requires_grad and frozen[0].weight.requires_grad
    frozen(x).sum().backward()
    assert frozen[1].weight.grad is None and frozen[0].weight.grad is not None


def test_freeze_bn_keeping_affine_trainable():
    model = freeze_bn(nn.Sequential(nn.BatchNorm2d(4)), affine=False)
    model.train()(torch.randn(2, 4, 3, 3)).sum().backward()
    assert model[0].weight.grad is not None and model[0].bias.grad is not None
    torch.testing.assert_close(model[0].running_var, torch.ones(4), rtol=0, atol=0)


def test_unfreeze_restores_classes_momentum_and_requires_grad():
    model = nn.Sequential(nn.BatchNorm2d(4, momentum=0.25), normlab.BatchNorm1d(3))
    model[0].bias.requires_grad_(False)
    randomize(model)
    state = copy.deepcopy(model.state_dict())
    restored = unfreeze_bn(freeze_bn(model))
    assert type(restored[0]) is nn.BatchNorm2d and type(restored[1]) is normlab.BatchNorm1d
    assert restored[0].momentum == 0.25
    assert restored[0].weight.requires_grad and not restored[0].bias.requires_grad
    for key, value in restored.state_dict().items():
        torch.testing.assert_close(value, state[key], rtol=0, atol=0)
    with pytest.raises(ValueError, match="pass dim="):
        unfreeze_bn(nn.Sequential(FrozenBatchNorm(4)))
    assert type(unfreeze_bn(nn.Sequential(FrozenBatchNorm(4)), dim=3)[0]) is normlab.BatchNorm3d


def test_freeze_sync_bn_round_trip_keeps_the_chain():
    group = object()  # stands for a process group: carried, never used with one process
    model = convert_sync_batchnorm(nn.Sequential(nn.BatchNorm2d(4)), process_group=group)
    model = unfreeze_bn(freeze_bn(model))
    assert type(model[0]) is SyncBatchNorm and model[0].process_group is group
    assert type(revert_sync_batchnorm(model)[0]) is nn.BatchNorm2d


def test_freeze_bn_without_running_stats_raises():
    with pytest.raises(ValueError, match="no running statistics"):
        freeze_bn(nn.Sequential(nn.BatchNorm2d(4, track_running_stats=False)))


# ---------------------------------------------------------------- fold


class Residual(nn.Module):
    """conv -> bn folds; conv2's output is used twice (by bn2 and the sum): conv2/bn2 must stay."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(4, 4, 3, padding=1), nn.BatchNorm2d(4)
        self.conv2, self.bn2 = nn.Conv2d(4, 4, 1), normlab.BatchNorm2d(4)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv(x)))
        z = self.conv2(h)
        return self.bn2(z) + z


class Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, so the Sequential inside is read instead."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))

    def forward(self, x):
        return self.body(x) if x.sum() > -1e9 else x


FOLD_CASES = {
    # name: (model, input shape, folded BN count)
    "sequential_mixed": (
        lambda: nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(),
            nn.Conv2d(4, 4, 3, bias=False), normlab.BatchNorm2d(4),  # no bias: one is created
            nn.Flatten(1), nn.Linear(4 * 4 * 4, 5), nn.BatchNorm1d(5),
        ),
        (2, 3, 8, 8), 3,
    ),
    "grouped_conv": (lambda: nn.Sequential(nn.Conv2d(4, 6, 3, groups=2), nn.BatchNorm2d(6)), (2, 4, 5, 5), 1),
    "conv_transpose_groups": (
        lambda: nn.Sequential(nn.ConvTranspose2d(4, 6, 3, stride=2, groups=2), nn.BatchNorm2d(6)), (2, 4, 3, 3), 1
    ),
    "conv1d_conv3d": (
        lambda: nn.Sequential(
            nn.Conv3d(2, 3, 2), nn.BatchNorm3d(3), nn.Flatten(2), nn.Conv1d(3, 4, 2), nn.BatchNorm1d(4)
        ),
        (2, 2, 3, 3, 3), 2,
    ),
    "residual_traced": (lambda: Residual(), (2, 4, 5, 5), 1),
    "untraceable": (lambda: Untraceable(), (2, 3, 5, 5), 1),
    "bn_first_and_frozen": (
        lambda: nn.Sequential(nn.BatchNorm2d(3), nn.Conv2d(3, 4, 1), FrozenBatchNorm(4)), (2, 3, 4, 4), 1
    ),
    "bn_without_running_stats": (
        lambda: nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4, track_running_stats=False)), (3, 3, 4, 4), 0
    ),
}


@pytest.mark.parametrize("name", list(FOLD_CASES))
def test_fold_bn_keeps_eval_outputs(name):
    factory, shape, folded = FOLD_CASES[name]
    model = randomize(factory()).eval()
    x = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    want = model(x)
    bns_before = len(norm_layers(model))
    out = fold_bn(model)
    assert out is model
    assert bns_before - len(norm_layers(model)) == folded
    torch.testing.assert_close(model(x), want, **TOL)


def test_fold_bn_skips_weight_normalized_layers():
    if "wn" not in normlab.list_norms():
        pytest.skip("weight normalization is not registered")
    conv = normlab.wrap_layer("wn", nn.Conv2d(3, 4, 3))
    model = randomize(nn.Sequential(conv, nn.BatchNorm2d(4))).eval()
    x = torch.randn(2, 3, 5, 5)
    want = model(x)
    fold_bn(model)
    assert isinstance(model[1], nn.BatchNorm2d)
    torch.testing.assert_close(model(x), want, **TOL)

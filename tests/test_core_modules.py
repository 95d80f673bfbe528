"""normlab.nn modules: one case table (PyTorch's ModuleInfo idea) drives generic checks for every layer —
repr, state_dict round trip, train/eval switch, device and dtype arguments, deepcopy, pickle — and, where
torch.nn has the layer, drop-in agreement: a torch.nn state_dict loads with strict=True, then outputs,
gradients and running statistics agree within 1e-4 over several train steps and in eval.

Documented differences from torch.nn (normlab/nn/instance_norm.py): InstanceNorm counts
num_batches_tracked (torch's never increments it) and implements momentum=None as a cumulative average
(torch's InstanceNorm silently never updates then). Those are checked against their definitions instead.

SwitchNorm has no torch.nn counterpart; its checks are below the table, and its authors_compat option is
checked against the authors' public implementation in test_core_switch_norm_authors.py.
"""

import copy
import io
import pickle
from dataclasses import dataclass, field

import pytest
import torch
from torch import nn

import normlab
from conftest import assert_close, randn
from normlab import reference


@dataclass(frozen=True)
class ModuleCase:
    cls: type
    args: tuple
    shape: tuple  # input shape
    kwargs: dict = field(default_factory=dict)
    torch_cls: type | None = None  # the torch.nn counterpart, built with the same arguments

    @property
    def id(self):
        args = ",".join(map(str, self.args))
        kw = ",".join(f"{k}={v}" for k, v in self.kwargs.items())
        return f"{self.cls.__name__}({args}{',' if kw else ''}{kw})-{'x'.join(map(str, self.shape))}"

    def make(self, **overrides):
        return self.cls(*self.args, **{**self.kwargs, **overrides})


MODULE_CASES = [
    ModuleCase(normlab.BatchNorm1d, (3,), (4, 3), {}, nn.BatchNorm1d),  # (N, C) input
    ModuleCase(normlab.BatchNorm1d, (3,), (2, 3, 5), {"momentum": None},
               nn.BatchNorm1d),  # (N, C, L), momentum=None: a cumulative average
    ModuleCase(normlab.BatchNorm2d, (5,), (2, 5, 3, 3), {}, nn.BatchNorm2d),  # common case, odd C
    ModuleCase(normlab.BatchNorm2d, (3,), (3, 3, 2, 2), {"affine": False, "momentum": 0.3},
               nn.BatchNorm2d),  # no parameters, other momentum
    ModuleCase(normlab.BatchNorm2d, (3,), (2, 3, 2, 3), {"track_running_stats": False},
               nn.BatchNorm2d),  # no buffers: eval uses the batch's statistics
    ModuleCase(normlab.BatchNorm3d, (2,), (2, 2, 3, 2, 2), {"eps": 1e-3}, nn.BatchNorm3d),  # 3d, other eps
    ModuleCase(normlab.BatchNorm2d, (3,), (2, 3, 2, 2), {"bias": False}, nn.BatchNorm2d),  # weight, no bias
    ModuleCase(normlab.LayerNorm, ((3, 4),), (2, 5, 3, 4), {}, nn.LayerNorm),  # over the last two dims
    ModuleCase(normlab.LayerNorm, (6,), (2, 3, 6), {"bias": False}, nn.LayerNorm),  # weight without bias
    ModuleCase(normlab.LayerNorm, ((3, 2, 2),), (2, 3, 2, 2), {"elementwise_affine": False},
               nn.LayerNorm),  # no parameters
    ModuleCase(normlab.InstanceNorm1d, (3,), (2, 3, 7), {}, nn.InstanceNorm1d),  # torch defaults: stateless
    ModuleCase(normlab.InstanceNorm2d, (3,), (2, 3, 4, 4), {"affine": True, "track_running_stats": True},
               nn.InstanceNorm2d),  # affine + running statistics used in eval
    ModuleCase(normlab.InstanceNorm3d, (2,), (2, 2, 3, 2, 2),
               {"affine": True, "track_running_stats": True, "momentum": None},
               nn.InstanceNorm3d),  # documented difference: momentum=None is a cumulative average here
    ModuleCase(normlab.InstanceNorm2d, (3,), (2, 3, 3, 2), {"affine": True, "bias": False},
               nn.InstanceNorm2d),  # weight without bias
    ModuleCase(normlab.GroupNorm, (2, 6), (2, 6, 3, 3), {}, nn.GroupNorm),  # 3 channels per group
    ModuleCase(normlab.GroupNorm, (1, 4), (3, 4, 5), {"eps": 1e-3}, nn.GroupNorm),  # G = 1 (LN), 1d
    ModuleCase(normlab.GroupNorm, (3, 3), (2, 3, 2, 2, 2), {"affine": False}, nn.GroupNorm),  # G = C (IN), 3d
    ModuleCase(normlab.GroupNorm, (2, 4), (2, 4, 3), {"bias": False}, nn.GroupNorm),  # weight without bias
    ModuleCase(normlab.SwitchNorm1d, (3,), (4, 3)),  # (N, C): mixes LN and BN
    ModuleCase(normlab.SwitchNorm2d, (3,), (2, 3, 4, 4)),  # IN, LN and BN
    ModuleCase(normlab.SwitchNorm2d, (3,), (2, 3, 2, 3), {"using_bn": False}),  # IN and LN, no buffers
    ModuleCase(normlab.SwitchNorm3d, (2,), (2, 2, 2, 3, 2), {"momentum": None}),  # 3d, cumulative average
    ModuleCase(normlab.SwitchNorm2d, (3,), (2, 3, 2, 2), {"authors_compat": True}),  # authors' layout
    ModuleCase(normlab.SwitchNorm1d, (3,), (4, 3), {"authors_compat": True}),  # authors' 1d: (1, C) shapes
]
IDS = [c.id for c in MODULE_CASES]
TORCH_CASES = [c for c in MODULE_CASES if c.torch_cls is not None]


def randomize(module, seed=0):
    """Non-default parameters and running statistics, so that no check passes on defaults."""
    with torch.no_grad():
        for i, (name, t) in enumerate(sorted(module.state_dict(keep_vars=True).items())):
            if not t.is_floating_point():
                t.fill_(3)  # num_batches_tracked: momentum=None then weighs the next batch 1/4
            elif name.endswith("running_var"):
                t.copy_(torch.rand(t.shape, generator=torch.Generator().manual_seed(seed + i)) + 0.5)
            else:
                scale = 0.5 if name.endswith("weight") else 0.2
                t.copy_(randn(*t.shape, seed=seed + i, dtype=t.dtype) * scale + (name == "weight"))
    return module


def tracks(module):
    return getattr(module, "running_mean", None) is not None


def batch(case, seed, dtype=torch.float32):
    return (randn(*case.shape, seed=seed, dtype=dtype) * 2 + 0.5).requires_grad_()


def buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


# ---------------------------------------------------------------- generic checks, one per concern

@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_repr(case):
    module = case.make()
    text = repr(module)
    assert text.startswith(f"{case.cls.__name__}(") and "eps=" in text
    if case.torch_cls is not None:
        assert text == repr(case.torch_cls(*case.args, **case.kwargs))  # a drop-in prints the same
    else:
        assert f"({case.args[0]}, " in text and f"sources={module.sources}" in text
        assert ("authors_compat=True" in text) == case.kwargs.get("authors_compat", False)


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_state_dict_round_trip(case):
    source = randomize(case.make(), seed=1)
    source(batch(case, seed=2))  # one training step: the buffers move too
    state = source.state_dict()
    target = case.make()
    target.load_state_dict(state, strict=True)
    assert list(target.state_dict()) == list(state)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key
    for mode in ("eval", "train"):
        getattr(source, mode)(), getattr(target, mode)()
        x = batch(case, seed=3)
        assert torch.equal(target(x), source(x)), mode
    # through a file, as checkpoints travel
    buf = io.BytesIO()
    torch.save(source.state_dict(), buf)
    buf.seek(0)
    reloaded = case.make()
    reloaded.load_state_dict(torch.load(buf), strict=True)
    assert all(torch.equal(a, b) for a, b in zip(reloaded.state_dict().values(), source.state_dict().values(),
                                                     strict=True))


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_train_eval_switch(case):
    module = randomize(case.make(), seed=1)
    assert module.training
    assert module.eval() is module and not module.training
    assert module.train() is module and module.training
    x = batch(case, seed=2)
    if tracks(module):
        before = buffers(module)
        module(x)
        moved = [k for k in before if not torch.equal(before[k], dict(module.named_buffers())[k])]
        assert "running_mean" in moved and "running_var" in moved, "training did not update running stats"
        module.eval()
        before = buffers(module)
        out = module(x)
        after = buffers(module)
        assert all(torch.equal(before[k], after[k]) for k in before), "eval changed a buffer"
        # eval normalizes with the running statistics: sample 0 does not depend on its companions
        other = batch(case, seed=4)
        mixed = torch.cat([x[:1], other[1:]])
        assert_close(module(mixed)[:1], out[:1])
        if case.shape[0] > 1 and case.cls not in (normlab.InstanceNorm1d, normlab.InstanceNorm2d,
                                                  normlab.InstanceNorm3d):
            module.train()  # ...while in training it does (batch statistics)
            assert not torch.allclose(module(mixed)[:1], module(x)[:1], atol=1e-3)
    else:  # no running statistics: train and eval compute the same thing
        out_train = module(x)
        module.eval()
        assert_close(module(x), out_train)


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_inplace_activation_after_the_layer(case):
    """conv → norm → ReLU(inplace=True) is the most common pattern: the output must accept in-place changes
    (autograd forbids them on views made inside a custom Function) and keep the same gradients."""
    module = randomize(case.make(), seed=5)
    grads = []
    for relu in (nn.ReLU(inplace=True), nn.ReLU()):
        x = batch(case, seed=6)
        relu(module(x)).square().sum().backward()
        grads.append(x.grad)
    assert_close(grads[0], grads[1])


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_dtype_argument(case):
    m64 = randomize(case.make(dtype=torch.float64), seed=1)
    m32 = case.make()
    m32.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in m64.state_dict().items()})
    for name, t in m64.state_dict().items():
        assert t.dtype == (torch.float64 if t.is_floating_point() else torch.long), name
    x = batch(case, seed=2, dtype=torch.float64)
    out = m64(x)
    assert out.dtype == torch.float64
    assert_close(out, m32(x.float()), dtype=torch.float32)


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_device_argument(case):
    """device= places every parameter and buffer (the meta device needs no memory and no GPU)."""
    module = case.make(device="meta")
    for name, t in module.state_dict().items():
        assert t.device.type == "meta", name
    out = module(torch.empty(case.shape, device="meta"))
    assert out.device.type == "meta" and out.shape == case.shape
    cpu = case.make(device="cpu")
    assert all(t.device.type == "cpu" for t in cpu.state_dict().values())
    if tracks(cpu) and hasattr(cpu, "num_batches_tracked"):
        assert cpu.num_batches_tracked.dtype == torch.long


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_deepcopy(case):
    module = randomize(case.make(), seed=1)
    clone = copy.deepcopy(module)
    for (name, a), b in zip(module.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b) and a.data_ptr() != b.data_ptr(), name
    x = batch(case, seed=2)
    assert torch.equal(clone(x), module(x))  # both took the same training step
    assert all(torch.equal(a, b) for a, b in zip(module.state_dict().values(), clone.state_dict().values(),
                                                  strict=True))
    if module.state_dict():  # independent storage
        with torch.no_grad():
            next(iter(clone.state_dict(keep_vars=True).values())).add_(1)
        first = next(iter(module.state_dict()))
        assert not torch.equal(clone.state_dict()[first], module.state_dict()[first])


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_pickle(case):
    module = randomize(case.make(), seed=1).eval()
    restored = pickle.loads(pickle.dumps(module))
    assert type(restored) is type(module) and repr(restored) == repr(module)
    assert not restored.training
    x = batch(case, seed=2)
    assert torch.equal(restored(x), module(x))


@pytest.mark.parametrize("case", MODULE_CASES, ids=IDS)
def test_initial_state(case):
    """Fresh modules start like torch.nn's: weight 1, bias 0, running mean 0 and variance 1 (SN's authors'
    layout: zero-initialised buffers), counter 0, SN logits 1."""
    module = case.make()
    if case.torch_cls is not None:
        expected = case.torch_cls(*case.args, **case.kwargs).state_dict()
        assert list(module.state_dict()) == list(expected)
        for key, value in module.state_dict().items():
            assert torch.equal(value, expected[key]), key
        return
    authors = case.kwargs.get("authors_compat", False)
    init = {"weight": 1.0, "bias": 0.0, "mean_weight": 1.0, "var_weight": 1.0, "running_mean": 0.0,
            "running_var": 0.0 if authors else 1.0, "num_batches_tracked": 0}
    for key, value in module.state_dict().items():
        assert torch.all(value == init[key]), key


# ---------------------------------------------------------------- drop-in agreement with torch.nn

def torch_running_differs(case):
    """InstanceNorm with momentum=None: torch's never updates its running statistics (documented)."""
    return case.torch_cls.__name__.startswith("InstanceNorm") and case.kwargs.get("momentum", 0.1) is None


def step_and_compare(ours, theirs, case, seed, compare_output=True):
    x = batch(case, seed=seed)
    x_t = x.detach().clone().requires_grad_()
    out, out_t = ours(x), theirs(x_t)
    dout = randn(*case.shape, seed=seed + 100)
    out.backward(dout)
    out_t.backward(dout)
    if compare_output:
        assert_close(out, out_t, msg="output")
        assert_close(x.grad, x_t.grad, msg="grad input")
        for (name, p), p_t in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, p_t.grad, msg=f"grad {name}")
    ours.zero_grad(), theirs.zero_grad()


@pytest.mark.parametrize("case", TORCH_CASES, ids=[c.id for c in TORCH_CASES])
def test_torch_state_dict_loads_and_agrees(case):
    theirs = randomize(case.torch_cls(*case.args, **case.kwargs), seed=5)
    ours = case.make()
    ours.load_state_dict(theirs.state_dict(), strict=True)
    skip_running = torch_running_differs(case)
    is_instance = case.torch_cls.__name__.startswith("InstanceNorm")
    for step in range(3):  # training: batch statistics, running statistics updated each step
        step_and_compare(ours, theirs, case, seed=10 + step)
        for name, buf in theirs.named_buffers():
            if name == "num_batches_tracked" and is_instance:
                assert dict(ours.named_buffers())[name] == 3 + step + 1  # normlab counts, torch doesn't
            elif not (skip_running and name.startswith("running")):
                assert_close(dict(ours.named_buffers())[name], buf, msg=name)
    ours.eval(), theirs.eval()
    if skip_running:  # torch's buffers are stale by design here: normlab's eval uses its own averages
        ours.load_state_dict(theirs.state_dict(), strict=True)
    for step in range(2):  # eval: running statistics (or batch statistics without them), nothing updated
        step_and_compare(ours, theirs, case, seed=20 + step)
        for name, buf in theirs.named_buffers():
            if not (is_instance and name == "num_batches_tracked"):
                assert_close(dict(ours.named_buffers())[name], buf, msg=name)
    # and back: normlab's state_dict loads into torch.nn strictly
    theirs.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("cls", [normlab.BatchNorm2d, normlab.InstanceNorm2d, normlab.SwitchNorm2d])
def test_momentum_none_is_cumulative_average(cls):
    """momentum=None: after k batches the running mean is the plain average of the k batch means
    (for InstanceNorm too, unlike torch.nn; SN's BN source like BN)."""
    kwargs = {"track_running_stats": True} if cls is normlab.InstanceNorm2d else {}
    module = cls(3, momentum=None, **kwargs)
    means, variances = [], []
    for k in range(4):
        x = randn(2, 3, 3, 3, seed=k) * (k + 1) + k
        module(x)
        means.append(x.mean((0, 2, 3)))
        per = x.var((2, 3), keepdim=True) if cls is normlab.InstanceNorm2d else x.var((0, 2, 3))
        variances.append(per.mean(0).flatten() if cls is normlab.InstanceNorm2d else per)
    assert module.num_batches_tracked == 4
    assert_close(module.running_mean, torch.stack(means).mean(0))
    assert_close(module.running_var, torch.stack(variances).mean(0))


def test_instance_norm_unbatched_input():
    """(C, *) inputs are treated as one sample, like torch.nn."""
    module = normlab.InstanceNorm2d(3, affine=True)
    theirs = nn.InstanceNorm2d(3, affine=True)
    randomize(theirs, seed=1)
    module.load_state_dict(theirs.state_dict())
    x = randn(3, 4, 5, seed=2)
    assert_close(module(x), theirs(x))


# ---------------------------------------------------------------- SwitchNorm

@pytest.mark.parametrize(("cls", "kwargs", "sources"), [
    (normlab.SwitchNorm1d, {}, ("ln", "bn")),
    (normlab.SwitchNorm2d, {}, ("in", "ln", "bn")),
    (normlab.SwitchNorm3d, {"using_bn": False}, ("in", "ln")),
])
def test_switch_norm_importance_is_a_distribution(cls, kwargs, sources):
    module = cls(4, **kwargs)
    uniform = module.importance()
    assert uniform["mean"] == pytest.approx(dict.fromkeys(sources, 1 / len(sources)))
    randomize(module, seed=3)
    imp = module.importance()
    assert list(imp) == ["mean", "var"]
    for kind, logits in (("mean", module.mean_weight), ("var", module.var_weight)):
        assert tuple(imp[kind]) == sources  # keys in logit order
        assert sum(imp[kind].values()) == pytest.approx(1.0, abs=1e-6)
        assert all(0 < p < 1 for p in imp[kind].values())
        assert list(imp[kind].values()) == pytest.approx(torch.softmax(logits.detach(), 0).tolist())
    assert imp["mean"] != imp["var"]  # the two mixes are separate


def sn_reference(module, x, eval_mode):
    """normlab.reference.switch_norm with the module's parameters (running stats as constants in eval)."""
    def a(t):
        return None if t is None else t.detach().double().reshape(-1).numpy()
    out, cache = reference.switch_norm.forward(
        a(x).reshape(x.shape), a(module.weight), a(module.bias), a(module.mean_weight), a(module.var_weight),
        module.sources, module.eps, module.authors_compat,
        a(module.running_mean) if eval_mode else None, a(module.running_var) if eval_mode else None)
    return torch.from_numpy(out), cache


@pytest.mark.parametrize("authors_compat", [False, True], ids=["normlab", "authors"])
def test_switch_norm_eval_uses_running_statistics(authors_compat):
    module = randomize(normlab.SwitchNorm2d(3, authors_compat=authors_compat), seed=1)
    module.running_mean.zero_(), module.running_var.fill_(0.0 if authors_compat else 1.0)
    momentum = module.momentum
    expected_mean = module.running_mean.clone().reshape(-1).double()
    expected_var = module.running_var.clone().reshape(-1).double()
    for k in range(3):  # batches with different statistics per channel, so the running ones matter
        x = randn(4, 3, 3, 3, seed=k) * torch.tensor([1.0, 2.0, 0.5]).view(1, 3, 1, 1) + k
        out = module(x)
        ref, cache = sn_reference(module, x, eval_mode=False)
        assert_close(out, ref, dtype=torch.float32)
        count = 4 * 9
        var_bn = cache["var_bn"] * (1.0 if authors_compat else count / (count - 1))
        expected_mean = (1 - momentum) * expected_mean + momentum * torch.from_numpy(cache["mean_bn"])
        expected_var = (1 - momentum) * expected_var + momentum * torch.from_numpy(var_bn)
    assert_close(module.running_mean.reshape(-1), expected_mean, dtype=torch.float32)
    assert_close(module.running_var.reshape(-1), expected_var, dtype=torch.float32)

    module.eval()
    x = randn(4, 3, 3, 3, seed=7) * 3 - 1  # statistics unlike the running ones
    out = module(x)
    assert_close(out, sn_reference(module, x, eval_mode=True)[0], dtype=torch.float32)
    # IN and LN are per sample and BN is the running statistics: a sample's output ignores its batch
    alone = module(x[2:3])
    assert_close(alone, out[2:3])
    module.train()
    twice = x[2:3].expand(2, -1, -1, -1).contiguous()
    assert not torch.allclose(module(twice)[:1], module(x)[2:3], atol=1e-3)
    module.eval()
    with torch.no_grad():  # and the running statistics are what eval reads
        module.running_mean.add_(0.5)
    assert not torch.allclose(module(x[2:3]), alone, atol=1e-3)


def test_switch_norm_without_tracking_uses_batch_statistics():
    module = randomize(normlab.SwitchNorm2d(3, track_running_stats=False), seed=1).eval()
    assert module.running_mean is None
    x = randn(4, 3, 3, 3, seed=2)
    assert_close(module(x), sn_reference(module, x, eval_mode=False)[0], dtype=torch.float32)


def test_switch_norm_learns_its_mix():
    """The logits receive gradients in training (they are what SN learns)."""
    module = randomize(normlab.SwitchNorm2d(3), seed=1)
    (module(randn(4, 3, 3, 3, seed=2)) * randn(4, 3, 3, 3, seed=3)).sum().backward()
    assert module.mean_weight.grad.abs().sum() > 0 and module.var_weight.grad.abs().sum() > 0


AFFINE_CASES = [c for c in TORCH_CASES if c.kwargs.get("affine", c.kwargs.get("elementwise_affine", True))
                and (c.cls is not normlab.InstanceNorm1d)]


@pytest.mark.parametrize("case", AFFINE_CASES, ids=[c.id for c in AFFINE_CASES])
def test_weight_seen_through_a_parametrization_and_functional_call(case):
    """Modules read their affine parameters from the parameter dict (normlab.nn._affine): a parametrized
    weight and torch.func.functional_call's swapped tensors must still be the ones used."""
    module, reference_module = case.make(), case.torch_cls(*case.args, **case.kwargs)
    x = batch(case, seed=1).detach()
    scale = torch.linspace(0.5, 2.0, module.weight.numel()).reshape(module.weight.shape)
    nn.utils.parametrize.register_parametrization(module, "weight", _Scaled(scale))
    with torch.no_grad():
        reference_module.weight.copy_(scale)
    assert_close(module(x), reference_module(x))
    weight = torch.full_like(scale, 3.0)
    bias = torch.full_like(scale, -1.0) if case.kwargs.get("bias", True) else None
    plain = case.make()
    params = {"weight": weight} if bias is None else {"weight": weight, "bias": bias}
    with torch.no_grad():
        reference_module.weight.copy_(weight)
        if bias is not None:
            reference_module.bias.copy_(bias)
    assert_close(torch.func.functional_call(plain, params, (x,)), reference_module(x))


class _Scaled(nn.Module):
    def __init__(self, scale):
        super().__init__()
        self.scale = scale

    def forward(self, weight):
        return weight * self.scale


@pytest.mark.parametrize("cls", [normlab.BatchNorm2d, normlab.InstanceNorm2d])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64], ids=["bf16", "f64"])
def test_running_statistics_of_every_buffer_dtype(cls, dtype):
    """Running estimates in float32/float64 are updated by one native loop on the CPU, others by tensor ops
    (normlab.functional._normalize.update_running_stats): each agrees with torch.nn's."""
    kwargs = {"track_running_stats": True} if cls is normlab.InstanceNorm2d else {}
    module = cls(4, **kwargs).to(dtype)
    reference_module = getattr(nn, cls.__name__)(4, **kwargs).to(dtype)
    for seed in range(3):
        x = randn(2, 4, 3, 3, seed=seed, dtype=dtype) * 2 + 1
        module(x), reference_module(x)
    assert_close(module.running_mean, reference_module.running_mean)  # (the table's tolerance for the dtype)
    assert_close(module.running_var, reference_module.running_var)

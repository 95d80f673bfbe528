"""SwitchNorm*d(authors_compat=True) against a faithful re-implementation of the authors' public
SwitchNorm1d/2d/3d (SPEC §1): their checkpoints load strictly and outputs, gradients and running statistics
agree over several training steps and in eval."""

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from conftest import assert_close, randn
from test_core_modules import randomize


class AuthorsSwitchNorm1d(nn.Module):
    """The authors' public SwitchNorm1d (switchablenorms/Switchable-Normalization), plain torch ops."""

    def __init__(self, num_features, eps=1e-5, momentum=0.997):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(1, num_features))
        self.bias = nn.Parameter(torch.zeros(1, num_features))
        self.mean_weight = nn.Parameter(torch.ones(2))
        self.var_weight = nn.Parameter(torch.ones(2))
        self.register_buffer("running_mean", torch.zeros(1, num_features))
        self.register_buffer("running_var", torch.zeros(1, num_features))

    def forward(self, x):
        mean_ln = x.mean(1, keepdim=True)
        var_ln = x.var(1, keepdim=True)
        if self.training:
            mean_bn = x.mean(0, keepdim=True)
            var_bn = x.var(0, keepdim=True)
            self.running_mean.mul_(self.momentum)
            self.running_mean.add_((1 - self.momentum) * mean_bn.data)
            self.running_var.mul_(self.momentum)
            self.running_var.add_((1 - self.momentum) * var_bn.data)
        else:
            mean_bn = self.running_mean
            var_bn = self.running_var
        mean_weight = torch.softmax(self.mean_weight, 0)
        var_weight = torch.softmax(self.var_weight, 0)
        mean = mean_weight[0] * mean_ln + mean_weight[1] * mean_bn
        var = var_weight[0] * var_ln + var_weight[1] * var_bn
        x = (x - mean) / (var + self.eps).sqrt()
        return x * self.weight + self.bias


class AuthorsSwitchNorm2d(nn.Module):
    """The authors' public SwitchNorm2d; SwitchNorm3d is the same on 5-d input with momentum 0.997."""

    spatial = 2

    def __init__(self, num_features, eps=1e-5, momentum=0.9, using_bn=True):
        super().__init__()
        self.eps, self.momentum, self.using_bn = eps, momentum, using_bn
        shape = (1, num_features) + (1,) * self.spatial
        self.weight = nn.Parameter(torch.ones(shape))
        self.bias = nn.Parameter(torch.zeros(shape))
        k = 3 if using_bn else 2
        self.mean_weight = nn.Parameter(torch.ones(k))
        self.var_weight = nn.Parameter(torch.ones(k))
        if using_bn:
            self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
            self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x):
        size = x.size()
        n, c = size[:2]
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)
        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in**2
        var_ln = temp.mean(1, keepdim=True) - mean_ln**2
        if self.using_bn:
            if self.training:
                mean_bn = mean_in.mean(0, keepdim=True)
                var_bn = temp.mean(0, keepdim=True) - mean_bn**2
                self.running_mean.mul_(self.momentum)
                self.running_mean.add_((1 - self.momentum) * mean_bn.data)
                self.running_var.mul_(self.momentum)
                self.running_var.add_((1 - self.momentum) * var_bn.data)
            else:
                mean_bn = self.running_mean
                var_bn = self.running_var
        mean_weight = torch.softmax(self.mean_weight, 0)
        var_weight = torch.softmax(self.var_weight, 0)
        if self.using_bn:
            mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
            var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn
        else:
            mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln
            var = var_weight[0] * var_in + var_weight[1] * var_ln
        x = (x - mean) / (var + self.eps).sqrt()
        return x.view(size) * self.weight + self.bias


class AuthorsSwitchNorm3d(AuthorsSwitchNorm2d):
    spatial = 3

    def __init__(self, num_features, eps=1e-5, momentum=0.997, using_bn=True):
        super().__init__(num_features, eps, momentum, using_bn)


# (authors' class, normlab class, kwargs, input shape) — why the case exists
AUTHORS_CASES = [
    (AuthorsSwitchNorm1d, normlab.SwitchNorm1d, {}, (6, 5)),  # LN + BN over (N, C), unbiased, decay 0.997
    (AuthorsSwitchNorm2d, normlab.SwitchNorm2d, {}, (3, 4, 3, 5)),  # IN + LN + BN, decay 0.9
    (AuthorsSwitchNorm2d, normlab.SwitchNorm2d, {"using_bn": False}, (3, 4, 3, 5)),  # 2 logits, no buffers
    (AuthorsSwitchNorm3d, normlab.SwitchNorm3d, {}, (2, 3, 2, 3, 2)),  # 5-d, decay 0.997
    (AuthorsSwitchNorm3d, normlab.SwitchNorm3d, {"using_bn": False}, (2, 3, 2, 3, 2)),
]
AUTHORS_IDS = [f"{a.__name__}-{'x'.join(map(str, s))}{'-no_bn' if kw else ''}"
               for a, _, kw, s in AUTHORS_CASES]


@pytest.mark.parametrize(("authors_cls", "cls", "kwargs", "shape"), AUTHORS_CASES, ids=AUTHORS_IDS)
def test_authors_fresh_state_matches(authors_cls, cls, kwargs, shape):
    """Same keys, shapes and initial values as the authors' modules (zero buffers, logits 1)."""
    theirs, ours = authors_cls(shape[1], **kwargs), cls(shape[1], authors_compat=True, **kwargs)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    for key, value in theirs.state_dict().items():
        assert ours.state_dict()[key].shape == value.shape, key
        assert torch.equal(ours.state_dict()[key], value), key


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize(("authors_cls", "cls", "kwargs", "shape"), AUTHORS_CASES, ids=AUTHORS_IDS)
def test_authors_checkpoint_loads_and_agrees(authors_cls, cls, kwargs, shape, dtype):
    theirs = randomize(authors_cls(shape[1], **kwargs).to(dtype), seed=2)
    if "running_var" in theirs.state_dict():  # a checkpoint after training: stats near the data's
        theirs.running_var.fill_(4.0), theirs.running_mean.fill_(0.5)
    ours = cls(shape[1], authors_compat=True, dtype=dtype, **kwargs)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    tol = {"dtype": torch.float32} if dtype == torch.float32 else {}

    def step(seed):
        x = (randn(*shape, seed=seed, dtype=dtype) * 2 + 0.5).requires_grad_()
        x_a = x.detach().clone().requires_grad_()
        out, out_a = ours(x), theirs(x_a)
        assert_close(out, out_a, msg="output", **tol)
        dout = randn(*shape, seed=seed + 100, dtype=dtype)
        out.backward(dout), out_a.backward(dout)
        assert_close(x.grad, x_a.grad, msg="grad input", **tol)
        for (name, p), p_a in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, p_a.grad, msg=f"grad {name}", **tol)
        ours.zero_grad(), theirs.zero_grad()
        for (name, b), b_a in zip(ours.named_buffers(), theirs.buffers(), strict=True):
            assert_close(b, b_a, msg=name, **tol)

    for seed in range(4):  # training steps: batch statistics and the authors' decay-momentum update
        step(seed)
    ours.eval(), theirs.eval()
    for seed in range(10, 12):
        step(seed)
    # and back: what normlab saves, the authors' code loads
    theirs.load_state_dict(ours.state_dict(), strict=True)


def test_authors_default_momentum_is_their_decay():
    """PyTorch's momentum convention: the authors' decay 0.9 / 0.997 is momentum 0.1 / 0.003 here."""
    assert normlab.SwitchNorm2d(3, authors_compat=True).momentum == pytest.approx(0.1)
    assert normlab.SwitchNorm1d(3, authors_compat=True).momentum == pytest.approx(0.003)
    assert normlab.SwitchNorm3d(3, authors_compat=True).momentum == pytest.approx(0.003)
    assert normlab.SwitchNorm3d(3).momentum == pytest.approx(0.1)
    ours = normlab.SwitchNorm3d(3, authors_compat=True)
    assert np.isclose(1 - AuthorsSwitchNorm3d(3).momentum, ours.momentum)

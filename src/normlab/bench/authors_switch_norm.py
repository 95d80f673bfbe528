"""Switchable Norm written the way the authors' public implementation computes it: the benchmark's baseline.

A plain-PyTorch composite (switchablenorms/Switchable-Normalization, ``SwitchNorm2d``, training mode with a
moving average): per-(n, c) mean and unbiased variance with ``x.mean``/``x.var``, LN and BN statistics
derived from them, a softmax mix, and ``(x − μ)/sqrt(σ² + ε)·γ + β`` — every step a separate tensor that
autograd keeps. It exists to be timed against normlab's SwitchNorm2d; it is not part of the library's API.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class AuthorsSwitchNorm2d(nn.Module):
    """The authors' SwitchNorm2d forward, unchanged in what it computes (decay momentum 0.9, as theirs)."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.9) -> None:
        super().__init__()
        self.eps = eps
        self.momentum = momentum
        self.weight = nn.Parameter(torch.ones(1, num_features, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, num_features, 1, 1))
        self.mean_weight = nn.Parameter(torch.ones(3))
        self.var_weight = nn.Parameter(torch.ones(3))
        self.register_buffer("running_mean", torch.zeros(1, num_features, 1))
        self.register_buffer("running_var", torch.zeros(1, num_features, 1))

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.size()
        x = x.view(n, c, -1)
        mean_in = x.mean(-1, keepdim=True)
        var_in = x.var(-1, keepdim=True)

        mean_ln = mean_in.mean(1, keepdim=True)
        temp = var_in + mean_in**2
        var_ln = temp.mean(1, keepdim=True) - mean_ln**2

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
        mean = mean_weight[0] * mean_in + mean_weight[1] * mean_ln + mean_weight[2] * mean_bn
        var = var_weight[0] * var_in + var_weight[1] * var_ln + var_weight[2] * var_bn

        x = (x - mean) / (var + self.eps).sqrt()
        x = x.view(n, c, h, w)
        return x * self.weight + self.bias

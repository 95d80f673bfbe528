"""LayerNorm: drop-in for torch.nn's, computed by normlab.functional.layer_norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_eps
from normlab.functional.layer_norm import normalized_shape_tuple
from normlab.nn._affine import affine_parameters


class LayerNorm(nn.Module):
    """Layer Normalization (Ba et al., 2016) over the last ``len(normalized_shape)`` dims.

    y = (x − E[x]) / sqrt(Var[x] + eps) · weight + bias with biased variance; weight and bias are
    elementwise over ``normalized_shape`` (torch.nn's convention). Same in train and eval.

    Args as torch.nn.LayerNorm: normalized_shape, eps, elementwise_affine, bias, device, dtype;
    ``backend`` picks the kernel ("auto" by default).
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: str = "auto") -> None:
        super().__init__()
        who = type(self).__name__
        self.normalized_shape = normalized_shape_tuple(normalized_shape, who)
        check_eps(eps, who)
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = nn.Parameter(torch.empty(self.normalized_shape, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, input: Tensor) -> Tensor:
        weight, bias = affine_parameters(self)
        return F.layer_norm(input, self.normalized_shape, weight, bias, self.eps, backend=self.backend)

    def extra_repr(self) -> str:
        text = (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"

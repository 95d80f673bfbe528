"""SwitchNorm1d/2d/3d: Switchable Normalization, computed by normlab.functional.switch_norm."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from normlab import functional as F
from normlab._checks import check_channels, check_dims, check_eps, check_momentum
from normlab.nn._running_stats import check_num_features, exponential_average_factor
from normlab.nn.batch_norm import pick_by_dim
from normlab.registry import register_norm

AUTO = "auto"


class _SwitchNorm(nn.Module):
    """Switchable Normalization (Luo et al., ICLR 2019): learns how to mix IN, LN and BN statistics.

        μ = Σ_k w_k μ_k,  σ² = Σ_k w'_k σ²_k,  w = softmax(mean_weight), w' = softmax(var_weight)
        y = weight · (x − μ) / sqrt(σ² + eps) + bias

    Mixed sources: IN, LN and BN for 2d/3d (IN and LN with ``using_bn=False``); LN and BN for 1d, as in the
    authors' code. ``importance()`` reads the learned mix as probabilities. The BN source keeps running
    statistics; eval mode uses them (with ``track_running_stats=True``).

    ``momentum`` is PyTorch's convention (weight of the new batch, None = cumulative average). The default
    "auto" is 0.1, or under ``authors_compat`` 1 − the authors' decay: 0.1 (their 0.9) for 2d and 0.003
    (their 0.997) for 1d and 3d.

    ``authors_compat=True`` reproduces the authors' public implementation so their checkpoints load
    (strict) and give the same outputs: unbiased IN variance with LN/BN variances derived from it (unbiased
    LN/BN variances for 1d), running statistics stored as computed and zero-initialised, parameters shaped
    like theirs — weight/bias (1, C, 1, 1) (2d), (1, C) (1d), (1, C, 1, 1, 1) (3d), running statistics
    (1, C, 1) ((1, C) for 1d) — and no num_batches_tracked buffer (so momentum=None is not available).
    Otherwise: biased variances, unbiased running variance, running_var starting at one, (C,) shapes.

    ``last_gamma`` initialises weight to zero (the authors' option for the last norm of a residual block).
    """

    _spatial: int = 0
    _layout: str = ""
    _authors_decay: float = 0.9

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None | str = AUTO,
        affine: bool = True,
        track_running_stats: bool = True,
        using_bn: bool = True,
        authors_compat: bool = False,
        last_gamma: bool = False,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        who = type(self).__name__
        check_num_features(num_features, who)
        check_eps(eps, who)
        if momentum == AUTO:
            momentum = round(1.0 - self._authors_decay, 6) if authors_compat else 0.1
        check_momentum(momentum, who)
        if authors_compat and momentum is None:
            raise ValueError(f"{who}: momentum=None (cumulative average) needs num_batches_tracked, "
                             "which the authors' checkpoints lack; pass a float momentum with authors_compat")
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats and using_bn
        self.using_bn = using_bn
        self.authors_compat = authors_compat
        self.last_gamma = last_gamma
        self.backend = backend
        base = ("ln",) if self._spatial == 0 else ("in", "ln")
        self.sources = base + ("bn",) if using_bn else base

        factory = {"device": device, "dtype": dtype}
        param_shape, stat_shape = (num_features,), (num_features,)
        if authors_compat:  # the authors' shapes: weight (1, C, 1, 1), running (1, C, 1); 1d: (1, C)
            param_shape = (1, num_features) + (1,) * self._spatial
            stat_shape = (1, num_features) if self._spatial == 0 else (1, num_features, 1)
        if affine:
            self.weight = nn.Parameter(torch.empty(param_shape, **factory))
            self.bias = nn.Parameter(torch.empty(param_shape, **factory))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        self.mean_weight = nn.Parameter(torch.ones(len(self.sources), **factory))
        self.var_weight = nn.Parameter(torch.ones(len(self.sources), **factory))
        if self.track_running_stats:
            self.register_buffer("running_mean", torch.zeros(stat_shape, **factory))
            self.register_buffer("running_var", torch.zeros(stat_shape, **factory))
            if not authors_compat:
                self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(0.0 if self.authors_compat else 1.0)
            if not self.authors_compat:
                self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.constant_(self.weight, 0.0 if self.last_gamma else 1.0)
            nn.init.zeros_(self.bias)
        nn.init.ones_(self.mean_weight)
        nn.init.ones_(self.var_weight)

    def forward(self, input: Tensor) -> Tensor:
        who = type(self).__name__
        check_dims(input, self._input_dims, who, self._layout)
        check_channels(input, self.num_features, who)
        factor = exponential_average_factor(self)
        batch_stats = self.training or not self.track_running_stats
        return F.switch_norm(
            input,
            self.mean_weight,
            self.var_weight,
            self.weight,
            self.bias,
            self.running_mean,
            self.running_var,
            batch_stats,
            factor,
            self.eps,
            sources=self.sources,
            authors_compat=self.authors_compat,
            backend=self.backend,
        )

    @torch.no_grad()
    def importance(self) -> dict[str, dict[str, float]]:
        """The learned mix as probabilities: {"mean": {"in": p, "ln": p, "bn": p}, "var": {...}}."""
        return {
            kind: dict(zip(self.sources, torch.softmax(logits.float(), 0).tolist(), strict=True))
            for kind, logits in (("mean", self.mean_weight), ("var", self.var_weight))
        }

    def extra_repr(self) -> str:
        text = (
            f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
            f"track_running_stats={self.track_running_stats}, sources={self.sources}"
        )
        if self.authors_compat:
            text += ", authors_compat=True"
        return text if self.backend == "auto" else f"{text}, backend={self.backend!r}"

    @property
    def _input_dims(self) -> tuple[int, ...]:
        return (2, 3) if self._spatial == 0 else (self._spatial + 2,)


class SwitchNorm1d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__ + "\n    Input (N, C) or (N, C, L); mixes LN and BN.\n"
    _spatial, _layout, _authors_decay = 0, "(N, C) or (N, C, L)", 0.997


class SwitchNorm2d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__ + "\n    Input (N, C, H, W).\n"
    _spatial, _layout, _authors_decay = 2, "(N, C, H, W)", 0.9


class SwitchNorm3d(_SwitchNorm):
    __doc__ = _SwitchNorm.__doc__ + "\n    Input (N, C, D, H, W).\n"
    _spatial, _layout, _authors_decay = 3, "(N, C, D, H, W)", 0.997


SWITCH_NORMS = {0: SwitchNorm1d, 1: SwitchNorm1d, 2: SwitchNorm2d, 3: SwitchNorm3d}


@register_norm("sn", "switchnorm", "switch_norm")
def _make_switch_norm(num_channels: int, dim: int = 2, **kwargs) -> _SwitchNorm:
    return pick_by_dim(SWITCH_NORMS, dim, "sn")(num_channels, **kwargs)

"""The functional core: one pure function per method. Every module's forward is one call into here.

Conventions (SPEC §2): inputs are channels-first (N, C, *); statistics are accumulated in float32 or better
and the output has the input's dtype and memory format; the variance that normalizes is biased (÷m), the
running variance unbiased (÷(m − 1)); momentum weighs the new batch (PyTorch's convention).
"""

from normlab.functional.batch_norm import batch_norm
from normlab.functional.cosine import cosine_conv, cosine_linear
from normlab.functional.group_norm import group_norm
from normlab.functional.instance_norm import instance_norm
from normlab.functional.layer_norm import layer_norm
from normlab.functional.mean_only_batch_norm import mean_only_batch_norm
from normlab.functional.switch_norm import switch_norm
from normlab.functional.weight_norm import weight_normalized

__all__ = [
    "batch_norm",
    "cosine_conv",
    "cosine_linear",
    "group_norm",
    "instance_norm",
    "layer_norm",
    "mean_only_batch_norm",
    "switch_norm",
    "weight_normalized",
]

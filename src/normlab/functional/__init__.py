"""The functional core: one pure function per method. Every module's forward is one call into here.

Conventions (SPEC §2): inputs are channels-first (N, C, *); statistics are accumulated in float32 or better
and the output has the input's dtype and memory format; the variance that normalizes is biased (÷m), the
running variance unbiased (÷(m − 1)); momentum weighs the new batch (PyTorch's convention).
"""

from normlab.functional.batch_norm import batch_norm
from normlab.functional.group_norm import group_norm
from normlab.functional.instance_norm import instance_norm
from normlab.functional.layer_norm import layer_norm
from normlab.functional.switch_norm import switch_norm

__all__ = ["batch_norm", "group_norm", "instance_norm", "layer_norm", "switch_norm"]

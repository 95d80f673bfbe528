"""NumPy float64 reference implementations: the oracle every other normlab test compares against.

Written straight from SPEC §1, independent of torch. Every module follows one contract:

    out, cache = <method>.forward(x, ...)      # float64 in, float64 out
    grads = <method>.backward(dout, cache)      # dict: "x" plus one key per differentiable input

Inputs are channels-first (N, C, *spatial) with 0 to 3 spatial dims; the variance that normalizes is
biased (÷m); gamma/beta may be None (no affine: no "gamma"/"beta" gradient keys).
Each submodule is re-exported below, one per line.
"""

from normlab.reference import batch_norm as batch_norm
from normlab.reference import cosine_norm as cosine_norm
from normlab.reference import group_norm as group_norm
from normlab.reference import instance_norm as instance_norm
from normlab.reference import layer_norm as layer_norm
from normlab.reference import switch_norm as switch_norm
from normlab.reference import weight_norm as weight_norm

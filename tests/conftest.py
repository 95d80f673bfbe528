"""Shared test helpers: one tolerance table and seeded random tensors.

Tolerances (``rtol`` and ``atol`` both, as torch.testing.assert_close applies them):

- float32 vs torch.nn: 1e-4, the agreement the issue promises.
- float64 vs normlab.reference: 1e-10; both compute the same closed forms in double precision.
- float16 / bfloat16 vs the float32 result of the same input: the output is that result rounded to the
  input dtype, so the error is half a unit in the last place — 2^-11 relative for float16 (10 mantissa
  bits), 2^-8 for bfloat16 (7) — plus rounding of weight/bias; the tolerances allow about two ulps for
  outputs of magnitude up to ~4.
"""

import os

import pytest
import torch

# Without a GPU the Triton kernels run on CPU tensors through Triton's interpreter; it must be switched on
# before anything imports Triton (its standard library, e.g. tl.sum, is decorated at import time).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

TOL = {
    torch.float32: {"rtol": 1e-4, "atol": 1e-4},
    torch.float64: {"rtol": 1e-10, "atol": 1e-10},
    torch.float16: {"rtol": 2e-3, "atol": 4e-3},
    torch.bfloat16: {"rtol": 1.6e-2, "atol": 3.2e-2},
}


def randn(*shape, seed=0, dtype=torch.float32, **kwargs):
    """A reproducible standard-normal tensor (independent of the global RNG state)."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype, **kwargs)


def assert_close(actual, expected, dtype=None, msg=None):
    """torch.testing.assert_close with the table's tolerance for ``dtype`` (default: expected's dtype)."""
    dtype = dtype or expected.dtype
    tol = TOL[dtype] if dtype.is_floating_point else {"rtol": 0, "atol": 0}  # counters: exact
    torch.testing.assert_close(actual, expected, check_dtype=False, msg=msg, **tol)


@pytest.fixture(autouse=True)
def _seed_global_rng():
    """Anything that draws from the global RNG stays reproducible test by test."""
    torch.manual_seed(0)
    yield

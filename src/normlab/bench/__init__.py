"""Benchmarks: each method in training mode against torch's own layer (the authors' composite for SN,
torch's weight_norm for WN), with a clone of the same tensor timed in the same run as the yardstick.

    report = normlab.bench.run(methods=["bn", "gn"], shapes=[(32, 64, 56, 56)], dtypes=["float32"])
    print(normlab.bench.table(report))         # or normlab.bench.to_json(report)

From the shell: ``normlab bench`` (``--json`` for JSON, ``--markdown`` for a README table).
"""

from normlab.bench.harness import PASSES, measure, saved_bytes
from normlab.bench.providers import BASELINE, METHODS, Case, setup
from normlab.bench.report import markdown, table, to_json
from normlab.bench.runner import DEFAULT_DTYPES, DEFAULT_SHAPES, machine, parse_shape, run

__all__ = [
    "BASELINE",
    "DEFAULT_DTYPES",
    "DEFAULT_SHAPES",
    "METHODS",
    "PASSES",
    "Case",
    "machine",
    "markdown",
    "measure",
    "parse_shape",
    "run",
    "saved_bytes",
    "setup",
    "table",
    "to_json",
]

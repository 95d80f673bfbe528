"""Cross-process statistics over torch.distributed: one packed collective per pass.

`SyncBatchNorm` and `SyncSwitchNorm` compute their batch statistics over every process of a group (gloo on
the CPU, NCCL on GPUs), exactly — also when processes hold different batch sizes or an empty one. Convert a
model's BN layers with `normlab.convert_sync_batchnorm` and back with `normlab.revert_sync_batchnorm`.
"""

from normlab.distributed.sync_batch_norm import SyncBatchNorm, SyncBatchNormFunction, sync_batch_norm
from normlab.distributed.sync_switch_norm import SyncSwitchNorm, SyncSwitchNormFunction, sync_switch_norm

__all__ = [
    "SyncBatchNorm",
    "SyncBatchNormFunction",
    "SyncSwitchNorm",
    "SyncSwitchNormFunction",
    "sync_batch_norm",
    "sync_switch_norm",
]

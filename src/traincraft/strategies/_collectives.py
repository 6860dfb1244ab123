"""The one in-place all-reduce that per-step callback code uses, over a process group the strategy names.

Why not ``trainer.strategy.reduce(tensor, group=..., reduce_op=...)``: Lightning's ``DDPStrategy``,
``FSDPStrategy`` and ``ModelParallelStrategy`` all reduce through ``_sync_ddp``, which calls
``torch.distributed.barrier(group)`` before every all-reduce. Under NCCL a barrier blocks the host until the
device has caught up: one host-device synchronization per optimizer step where ``GradientClipping`` reduces its
norm powers (every step), which the package promises not to do outside logging steps. The collective here is the
same all-reduce without the barrier; ``SingleDeviceStrategy`` would do nothing, and neither does this without a
group or an initialized process group.
"""

from __future__ import annotations

from typing import Any, Literal, Optional

import torch.distributed as dist
from torch import Tensor


def all_reduce_(tensor: Tensor, reduce_op: Literal["sum", "max"], group: Optional[Any]) -> Tensor:
    """All-reduce ``tensor`` in place with ``SUM`` or ``MAX`` over ``group`` (no barrier, no host sync); a no-op
    when ``group`` is None or no process group is initialized. Returns ``tensor``."""
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return tensor
    op = dist.ReduceOp.MAX if reduce_op == "max" else dist.ReduceOp.SUM
    dist.all_reduce(tensor, op=op, group=group)
    return tensor

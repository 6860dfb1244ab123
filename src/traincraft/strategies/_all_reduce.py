"""An all-reduce (sum) that autograd can differentiate, recording both of its collectives in the byte ledger."""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist

from traincraft.strategies.communication import CommunicationLedger


class AllReduceSum(torch.autograd.Function):
    """Sum over the ranks of ``group`` whose backward sums the incoming gradients over them too: each rank's loss
    depends on every rank's contribution. ``group_size`` is the size of ``group`` (``None``: the whole world)."""

    @staticmethod
    def forward(ctx: Any, tensor: torch.Tensor, ledger: CommunicationLedger, group_size: int, axis: str,
                group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
        ctx.ledger, ctx.group_size, ctx.axis, ctx.group = ledger, group_size, axis, group
        out = tensor.clone()
        ledger.record("all_reduce", out, group_size, axis=axis)
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[Optional[torch.Tensor], ...]:
        grad = grad.clone()
        ctx.ledger.record("all_reduce", grad, ctx.group_size, axis=ctx.axis)
        dist.all_reduce(grad, group=ctx.group)
        return grad, None, None, None, None

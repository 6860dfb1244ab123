"""The cross-column connections of a column-parallel TwoColumnAlexNet: autograd-aware gathers over the column group.

Why two backward rules. At ``conv3``, ``fc6``, ``fc7`` and ``fc8`` each rank feeds the gathered tensor into its *own*
column's layer, so the gradient a rank computes for the gathered tensor is only its column's share; the true
gradient of one column's activations is the sum over ranks, i.e. a reduce-scatter ("sum"). At ``logits`` everything
downstream (loss, metrics) is computed identically on every column rank, so each rank already holds the full
gradient: summing would make every gradient ``column_size`` times too large, so the backward keeps only the local
slice ("slice") and sends nothing.
"""

from __future__ import annotations

from typing import Literal, Optional

import torch
import torch.distributed as dist
import torch.nn.functional as F

from traincraft.strategies.communication import CommunicationLedger

__all__ = ["ColumnExchange", "gather_columns"]

Backward = Literal["sum", "slice"]
# Points after which every column rank computes the same thing (see the module docstring).
REPLICATED_POINTS = frozenset({"logits"})


def _pad_dim1(x: torch.Tensor, width: int) -> torch.Tensor:
    """Zero-pad dim 1 to `width`: collectives need equal sizes, the logits of an odd class count are not."""
    missing = width - x.shape[1]
    if missing == 0:
        return x.contiguous()
    pad = [0, 0] * (x.ndim - 2) + [0, missing]  # F.pad lists the last dimension first
    return F.pad(x, pad)


class _GatherColumns(torch.autograd.Function):
    @staticmethod
    def forward(ctx, local, group, index, widths, backward, ledger, axis):  # type: ignore[override]
        n, width = len(widths), max(widths)
        padded = _pad_dim1(local, width)
        chunks = [torch.empty_like(padded) for _ in range(n)]
        dist.all_gather(chunks, padded, group=group)
        if ledger is not None:
            ledger.record("all_gather", padded, n, axis=axis)
        ctx.group, ctx.index, ctx.widths, ctx.backward, ctx.ledger, ctx.axis = group, index, widths, backward, ledger, axis
        return torch.cat([chunk[:, :w] for chunk, w in zip(chunks, widths, strict=True)], dim=1)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        widths, index = ctx.widths, ctx.index
        start = sum(widths[:index])
        if ctx.backward == "slice":
            return grad[:, start : start + widths[index]], None, None, None, None, None, None
        width, n = max(widths), len(widths)
        parts = [_pad_dim1(part, width) for part in grad.split(widths, dim=1)]
        mine = torch.empty_like(parts[0])
        dist.reduce_scatter(mine, parts, group=ctx.group)
        if ctx.ledger is not None:
            ctx.ledger.record("reduce_scatter", n * mine.numel() * mine.element_size(), n, axis=ctx.axis)
        return mine[:, : widths[index]], None, None, None, None, None, None


def gather_columns(
    local: torch.Tensor,
    group: Optional[dist.ProcessGroup],
    index: int,
    widths: list[int],
    backward: Backward = "sum",
    ledger: Optional[CommunicationLedger] = None,
    axis: str = "column",
) -> torch.Tensor:
    """Concatenate along dim 1, in group-rank order, every rank's `local` tensor (rank ``i`` holds ``widths[i]``).

    Differentiable: ``backward="sum"`` reduce-scatters the gradient (the gathered tensor feeds different layers on
    different ranks), ``"slice"`` returns the local slice (everything downstream is replicated). Bytes are
    recorded in `ledger` (if given) under `axis`; sizes come from tensor metadata, so there is no host sync.
    """
    if local.ndim < 2 or local.shape[1] != widths[index]:
        raise ValueError(
            f"gather_columns: rank {index} must contribute a tensor of width {widths[index]} along dim 1 (widths "
            f"{widths}), got shape {tuple(local.shape)}."
        )
    if backward not in ("sum", "slice"):
        raise ValueError(f"gather_columns: backward must be 'sum' or 'slice', got {backward!r}.")
    return _GatherColumns.apply(local, group, index, list(widths), backward, ledger, axis)


class ColumnExchange:
    """Stands in for ``TwoColumnAlexNet.exchange`` on a rank that holds one column.

    Args:
        group: the column process group; its group rank ``i`` holds column ``i``.
        column: the column (and group rank) of this process.
        column_classes: the logits per column (``TwoColumnAlexNet.column_classes``); unequal for an odd count.
        ledger: where the bytes of training forwards and backwards are recorded (evaluation is not counted).
    """

    def __init__(
        self,
        group: Optional[dist.ProcessGroup],
        column: int,
        column_classes: tuple[int, ...],
        ledger: Optional[CommunicationLedger] = None,
    ) -> None:
        self.group, self.column, self.column_classes, self.ledger = group, column, tuple(column_classes), ledger

    def __call__(self, point: str, parts: list[torch.Tensor]) -> torch.Tensor:
        if len(parts) != 1:
            raise RuntimeError(
                f"ColumnExchange at {point!r} expects the activations of exactly one local column, got {len(parts)}."
            )
        n = len(self.column_classes)
        widths = list(self.column_classes) if point == "logits" else [parts[0].shape[1]] * n
        # Only training steps are accounted: the ledger's figures are per optimizer step.
        ledger = self.ledger if torch.is_grad_enabled() else None
        backward: Backward = "slice" if point in REPLICATED_POINTS else "sum"
        return gather_columns(parts[0], self.group, self.column, widths, backward, ledger)

    def __deepcopy__(self, memo: dict) -> ColumnExchange:
        # A copied model (EMA, SWA) talks over the same process group; groups cannot be copied anyway.
        return self

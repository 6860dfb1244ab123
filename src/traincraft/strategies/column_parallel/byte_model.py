"""The byte model: what column parallelism communicates against data parallelism (see docs/column-parallel.md).

Per optimizer step, per rank, with ``B`` samples per column pair, ``e`` bytes per element, ``n`` columns and ``D``
data-parallel replicas, and ``w_p`` the elements per sample and column exchanged at point ``p``:

- forward all-gathers: payload ``B e sum_p w_p``, wire ``(n - 1)`` times that;
- backward reduce-scatters at every point but ``logits``: payload ``n B e sum_{p != logits} w_p``, wire
  ``(n - 1) / n`` times that;
- hybrid (``D > 1``): all-reduce of the column's gradients over its replicas, payload ``P_column e``, wire
  ``2 (D - 1) / D`` times that. DDP over ``W`` ranks: payload ``P e``, wire ``2 (W - 1) / W`` times that.
"""

from __future__ import annotations

from torch import nn

from traincraft.models.two_column import TwoColumnAlexNet

__all__ = ["break_even_batch", "column_parallel_bytes", "ddp_bytes", "exchange_widths", "parameter_count"]


def _out(size: int, kernel: int, stride: int, padding: int = 0) -> int:
    return (size + 2 * padding - kernel) // stride + 1


def exchange_widths(model: TwoColumnAlexNet) -> dict[str, int]:
    """Elements per sample that one column contributes at each exchange point (the logits padded to the wider
    column, as the gather sends them), read from the layer shapes; works for partial models.

    Example:
        >>> import torch
        >>> with torch.device("meta"):  # shapes only: nothing is allocated
        ...     full_size = TwoColumnAlexNet(num_classes=1000, input_size=227)
        >>> exchange_widths(full_size)
        {'conv3': 21632, 'fc6': 4608, 'fc7': 2048, 'fc8': 2048, 'logits': 500}
    """
    col = next(iter(model.columns.values()))
    n = len(model.column_classes)
    conv1 = col.conv1
    side = _out(model.input_size, conv1.kernel_size[0], conv1.stride[0], conv1.padding[0])
    side = _out(_out(side, 3, 2), 3, 2)  # pool1; conv2 keeps the size; pool2
    return {
        "conv3": col.conv3.in_channels // n * side * side,
        "fc6": col.fc6.in_features // n,
        "fc7": col.fc7.in_features // n,
        "fc8": col.fc8.in_features // n,
        "logits": max(model.column_classes),
    }


def parameter_count(module: nn.Module) -> int:
    """Elements of every parameter of ``module`` (of one column, for a partial ``TwoColumnAlexNet``)."""
    return sum(p.numel() for p in module.parameters())


def column_parallel_bytes(
    widths: dict[str, int], batch: int, element_size: int = 4, column_params: int = 0, data_parallel_size: int = 1,
    columns: int = 2,
) -> dict[tuple[str, str], dict[str, int]]:
    """Analytic ``{(axis, collective): {"bytes", "wire_bytes"}}`` per rank and step, in the ledger's layout.

    Args:
        widths: :func:`exchange_widths` of the model.
        batch: samples per column pair (the per-replica batch).
        element_size: bytes per exchanged element (4 for float32, 2 under bf16 autocast).
        column_params: parameters of one column (for the data-axis all-reduce of the hybrid).
        data_parallel_size: replicas of each column.
        columns: columns per replica.

    Example:
        >>> w = {"conv3": 10, "fc6": 4, "fc7": 2, "fc8": 2, "logits": 1}
        >>> column_parallel_bytes(w, batch=3)[("column", "reduce_scatter")]
        {'bytes': 432, 'wire_bytes': 216}
    """
    n = columns
    forward = batch * element_size * sum(widths.values())
    backward = n * batch * element_size * sum(w for p, w in widths.items() if p != "logits")
    out = {
        ("column", "all_gather"): {"bytes": forward, "wire_bytes": (n - 1) * forward},
        ("column", "reduce_scatter"): {"bytes": backward, "wire_bytes": (n - 1) * backward // n},
    }
    if data_parallel_size > 1:
        payload = column_params * element_size
        out[("data", "all_reduce")] = {
            "bytes": payload, "wire_bytes": 2 * (data_parallel_size - 1) * payload // data_parallel_size
        }
    return out


def ddp_bytes(params: int, world_size: int, element_size: int = 4) -> dict[str, int]:
    """Analytic bytes per rank and step of DDP's gradient all-reduce (ring) over ``world_size`` ranks.

    Example:
        >>> ddp_bytes(1000, world_size=2)
        {'bytes': 4000, 'wire_bytes': 4000}
    """
    payload = params * element_size
    return {"bytes": payload, "wire_bytes": 2 * (world_size - 1) * payload // world_size}


def break_even_batch(widths: dict[str, int], params: int, columns: int = 2) -> float:
    """The batch below which two columns send fewer wire bytes per rank than DDP over the same two ranks.

    Setting ``(n - 1) B (sum_p w_p + sum_{p != logits} w_p) = 2 (n - 1) / n P`` gives
    ``B* = 2 P / (n (sum_p w_p + sum_{p != logits} w_p))``; about 997 samples for the full AlexNet.

    Example:
        >>> import torch
        >>> with torch.device("meta"):
        ...     full_size = TwoColumnAlexNet(num_classes=1000, input_size=227)
        >>> round(break_even_batch(exchange_widths(full_size), parameter_count(full_size)))
        997
    """
    per_sample = sum(widths.values()) + sum(w for p, w in widths.items() if p != "logits")
    return 2 * params / (columns * per_sample)

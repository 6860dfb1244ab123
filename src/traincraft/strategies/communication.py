"""Communication accounting shared by traincraft's strategies: what each rank sends, per collective and mesh axis.

Sizes come from tensor metadata (``numel() * element_size()``), so recording costs no host-device
synchronization. Two figures are kept for every call:

- **payload**: the bytes this rank contributes (an all-reduce of a 4 MB gradient bucket: 4 MB; an all-gather:
  the local shard). This is the figure the analytic counts in the docs use (parameters × element size, or the
  compressed size).
- **wire**: the bytes this rank sends under the bandwidth-optimal ring algorithms, for a group of n ranks:
  all-reduce 2(n-1)/n × payload, all-gather and reduce-scatter (n-1)/n × the full tensor, i.e. (n-1) × payload
  for an all-gather, broadcast payload from the source (0 elsewhere), all-to-all (n-1)/n × payload.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Literal, Union

import torch

Collective = Literal["all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all"]
COLLECTIVES: tuple[str, ...] = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "all_to_all")


def payload_bytes(tensor_or_bytes: Union[torch.Tensor, int]) -> int:
    """Bytes of a tensor (from metadata only) or an explicit byte count."""
    if isinstance(tensor_or_bytes, torch.Tensor):
        return tensor_or_bytes.numel() * tensor_or_bytes.element_size()
    return int(tensor_or_bytes)


def wire_bytes(kind: str, payload: int, group_size: int, is_source: bool = True) -> int:
    """Bytes one rank sends for a collective of ``payload`` bytes under the ring algorithm (see module doc).

    Example:
        >>> wire_bytes("all_reduce", 1000, 4), wire_bytes("all_gather", 1000, 4), wire_bytes("all_reduce", 1000, 1)
        (1500, 3000, 0)
    """
    if kind not in COLLECTIVES:
        raise ValueError(f"unknown collective {kind!r}; expected one of {COLLECTIVES}")
    if group_size < 1:
        raise ValueError(f"group_size must be >= 1; got {group_size}")
    n = group_size
    if n == 1:
        return 0
    if kind == "all_reduce":
        return 2 * (n - 1) * payload // n
    if kind == "all_gather":
        return (n - 1) * payload
    if kind in ("reduce_scatter", "all_to_all"):
        return (n - 1) * payload // n
    return payload if is_source else 0  # broadcast


class CommunicationLedger:
    """Accumulates the bytes a rank communicates, per mesh axis and collective, per step and in total.

    Strategies call :meth:`record` where they launch a collective, and :meth:`end_step` once per optimizer step;
    :meth:`metrics` returns the last step's figures under stable keys, ready for ``pl_module.log``/loggers:

    =================================  =========================================================
    key                                meaning
    =================================  =========================================================
    ``comm/{axis}/{kind}_bytes``       payload bytes of that collective on that mesh axis, last step
    ``comm/{axis}/{kind}_wire_bytes``  ring-algorithm bytes sent, last step
    ``comm/bytes``                     payload bytes of all collectives, last step
    ``comm/wire_bytes``                ring-algorithm bytes sent, last step
    =================================  =========================================================

    Example:
        >>> ledger = CommunicationLedger()
        >>> ledger.record("all_reduce", torch.zeros(250), group_size=2, axis="data")
        >>> ledger.end_step()
        >>> ledger.metrics()["comm/data/all_reduce_bytes"], ledger.metrics()["comm/wire_bytes"]
        (1000, 1000)
    """

    def __init__(self) -> None:
        self._current: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
        self._last: dict[tuple[str, str], list[int]] = {}
        self.total_payload = 0
        self.total_wire = 0
        self.steps = 0

    def record(
        self,
        kind: str,
        tensor_or_bytes: Union[torch.Tensor, int],
        group_size: int,
        axis: str = "data",
        is_source: bool = True,
    ) -> None:
        """Count one collective (``kind``) of this rank's ``tensor_or_bytes`` over a group of ``group_size``."""
        payload = payload_bytes(tensor_or_bytes)
        wire = wire_bytes(kind, payload, group_size, is_source)
        entry = self._current[(axis, kind)]
        entry[0] += payload
        entry[1] += wire
        entry[2] += 1

    def end_step(self) -> None:
        """Close the current optimizer step: its figures become :meth:`metrics` and join the totals."""
        self._last = {key: list(value) for key, value in self._current.items()}
        for payload, wire, _ in self._last.values():
            self.total_payload += payload
            self.total_wire += wire
        self._current.clear()
        self.steps += 1

    def last_step(self) -> dict[tuple[str, str], dict[str, int]]:
        """``{(axis, kind): {"bytes", "wire_bytes", "calls"}}`` of the last closed step."""
        return {key: {"bytes": p, "wire_bytes": w, "calls": c} for key, (p, w, c) in self._last.items()}

    def metrics(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for (axis, kind), (payload, wire, _) in sorted(self._last.items()):
            out[f"comm/{axis}/{kind}_bytes"] = payload
            out[f"comm/{axis}/{kind}_wire_bytes"] = wire
        out["comm/bytes"] = sum(v[0] for v in self._last.values())
        out["comm/wire_bytes"] = sum(v[1] for v in self._last.values())
        return out

    def state_dict(self) -> dict[str, int]:
        return {"total_payload": self.total_payload, "total_wire": self.total_wire, "steps": self.steps}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.total_payload = int(state["total_payload"])
        self.total_wire = int(state["total_wire"])
        self.steps = int(state["steps"])

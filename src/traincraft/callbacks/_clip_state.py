"""GradientClipping's per-optimizer state, and the norms of sharded gradients.

A ``Slot`` holds what the callback keeps for one optimizer: its parameters and their names, the statistics of the
clip modes on the device (checkpointed), the counters the host knows, and what the step-skipping machinery
(``_step_skipping.py``) needs from it. ``shard_groups`` and ``global_tensor_norms`` turn the norms of DTensor
shards into norms of whole parameters.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from traincraft._guard import Flag, StepUndo
from traincraft._sharded import is_sharded
from traincraft.strategies._collectives import all_reduce_


class Slot:
    """Everything GradientClipping keeps for one optimizer: statistics on the device, counters on the host, and
    how its steps are skipped."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.steps = 0  # this optimizer's steps: host-known, so step-count decisions need no sync
        self.state: dict[str, Tensor] = {}
        self.loaded: Optional[dict[str, Tensor]] = None  # checkpointed tensors, moved to the device on first use
        self.since_log = 0
        self.index_cache: dict[tuple, Tensor] = {}
        self.weights: list[int] = []  # indices of weight tensors (ndim >= 2), output layer first
        self.agc_skip: set[int] = set()  # indices AGC leaves alone
        # set by the step-skipping machinery
        self.method, self.scaler, self.fused = "sync", None, False
        self.undo: Optional[StepUndo] = None  # the post-step undo (found_inf or snapshot methods)
        self.host_streak = 0
        self.healthy: Optional[dict[str, Any]] = None
        self.restored_from_current = False
        self.batch_skip: Optional[Flag] = None  # OR of this batch's skip flags; None: no step in this batch

    def bind(self, optimizer: Any, names: dict[int, str], suffix: str, groups: Optional[list]) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = [names.get(id(p), f"param{i}") for i, p in enumerate(self.params)]
        self.sharded = [is_sharded(p) for p in self.params]
        self.suffix, self.groups = suffix, groups
        self.index_cache = {}
        self.weights = [i for i, p in enumerate(self.params) if p.ndim >= 2][::-1]  # output to input
        self.since_log = 0

    def present_index(self, present: list[int], device: torch.device) -> Tensor:
        key = tuple(present)
        if key not in self.index_cache:  # built once: a host list copied to the device every step would cost
            self.index_cache[key] = torch.tensor(present, device=device)
        return self.index_cache[key]

    def note_skip(self, skip: Flag) -> None:
        self.batch_skip = skip if self.batch_skip is None else self.batch_skip | skip

    # ------------------------------------------------------------ statistics and their checkpoint
    def init_state(self, device: torch.device, groups: int, history: int) -> None:
        """The statistics on ``device``: zeros, or a checkpoint's (or this slot's, from another device)."""
        zeros = lambda: torch.zeros(groups, device=device)  # noqa: E731
        count = lambda: torch.zeros((), dtype=torch.int64, device=device)  # noqa: E731
        state = {
            "history": torch.full((history, groups), math.nan, device=device),
            "mean": zeros(), "var": zeros(), "warm_sum": zeros(), "warm_sq": zeros(), "warm_n": zeros(),
            "skipped": count(), "streak": count(), "max_streak": count(), "clipped": count(),
        }
        loaded = self.loaded or (self.state if self.state else None)  # a checkpoint, or statistics on another device
        if loaded is not None:
            if loaded["history"].shape != state["history"].shape:
                raise ValueError(f"the checkpointed GradientClipping history of optimizer {self.index} has shape "
                                 f"{tuple(loaded['history'].shape)} but this run needs {tuple(state['history'].shape)}:"
                                 " resume with the same history_size and parameters, or start without the "
                                 "callback's state.")
            state.update({k: v.to(device) for k, v in loaded.items()})
            self.loaded = None
        self.state = state

    def entry(self) -> dict[str, Any]:
        """This optimizer's part of the callback's checkpoint."""
        tensors = {k: v.detach().cpu() for k, v in self.state.items()} if self.state else (self.loaded or {})
        return {"steps": self.steps, "tensors": tensors}


# ---------------------------------------------------------------- sharded parameters
def shard_groups(params: list[Tensor], owner: str) -> Optional[list]:
    """The process groups over which the gradient shards of ``params`` are spread; None when nothing is sharded.

    Every sharded parameter must live on one device mesh with the same placements (as under ``fully_shard`` and
    HSDP); a ``Partial`` placement (an unreduced gradient) has no norm to compute yet.
    """
    sharded = [p for p in params if is_sharded(p)]
    if not sharded:
        return None
    mesh, placements = sharded[0].device_mesh, tuple(sharded[0].placements)
    odd = [p for p in sharded if p.device_mesh != mesh or tuple(p.placements) != placements]
    if odd:
        raise ValueError(f"{owner} needs every sharded parameter on one device mesh with one placement, got "
                         f"{placements} on {mesh} and {tuple(odd[0].placements)} on {odd[0].device_mesh}: shard the "
                         "whole model with one fully_shard/HSDP mesh, or remove the callback for this run.")
    if any(pl.is_partial() for pl in placements):
        raise ValueError(f"{owner} cannot compute norms of parameters with a Partial placement {placements}: "
                         "their gradients are not reduced yet. Use Shard or Replicate placements (fully_shard).")
    return [mesh.get_group(d) for d, pl in enumerate(placements) if pl.is_shard()]


def global_tensor_norms(norms: Tensor, mask: Tensor, groups: list, norm_type: float) -> Tensor:
    """Per-tensor norms of whole parameters from the norms of their local shards (``mask``: which are sharded).

    Shards add their p-th powers (``MAX`` for ``inf``) over the groups that shard them; unsharded tensors are
    whole on every rank and are left as they are. One all-reduce of a vector per group, no host sync.
    """
    if norm_type == math.inf:
        out = norms.clone()
        for group in groups:  # unsharded entries are equal on every rank: the max leaves them unchanged
            all_reduce_(out, "max", group)
        return out
    power = norms.pow(norm_type)
    shared = torch.where(mask, power, torch.zeros_like(power))
    for group in groups:
        all_reduce_(shared, "sum", group)
    return torch.where(mask, shared, power).pow(1.0 / norm_type)

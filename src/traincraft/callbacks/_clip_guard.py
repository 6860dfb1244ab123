"""GradientClipping's per-optimizer state, its undo of skipped steps, and the norms of sharded gradients.

Kept apart from the callback so that the callback file reads as "clip, log, decide" and this one as "how a skip
is undone without asking the host": parameters and optimizer state (``Slot``), module buffers such as BatchNorm's
running statistics (``BufferGuard``), and the reduction that turns per-shard norms into global ones
(``shard_groups``, ``global_tensor_norms``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from traincraft._sharded import is_sharded

Flag = Union[Tensor, bool]  # a skip flag: on the device (no sync), or on the host (skip_method="sync")


def local(t: Tensor) -> Tensor:
    """The tensor to compute on: a DTensor's local shard (a view, so in-place writes reach the DTensor)."""
    return t.to_local() if is_sharded(t) else t


class Slot:
    """Everything GradientClipping keeps for one optimizer: statistics on the device, counters on the host, and
    what its step post-hook must undo when the step is skipped."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.steps = 0  # this optimizer's steps: host-known, so step-count decisions need no sync
        self.state: dict[str, Tensor] = {}
        self.loaded: Optional[dict[str, Tensor]] = None  # checkpointed tensors, moved to the device on first use
        self.since_log = 0
        self.host_streak = 0
        self.pending: Optional[dict[str, Any]] = None
        self.hook: Any = None
        self.snapshot_key: tuple[int, ...] = ()
        self.snapshot: list[Tensor] = []
        self.healthy: Optional[dict[str, Any]] = None
        self.restored_from_current = False
        self.batch_skip: Optional[Flag] = None  # OR of this batch's skip flags; None: no step in this batch
        self.index_cache: dict[tuple, Tensor] = {}
        self.weights: list[int] = []  # indices of weight tensors (ndim >= 2), output layer first
        self.agc_skip: set[int] = set()  # indices AGC leaves alone

    def bind(self, optimizer: Any, names: dict[int, str], method: str, scaler: Any, fused: bool, suffix: str,
             groups: Optional[list]) -> None:
        self.optimizer = optimizer
        self.params = [p for g in optimizer.param_groups for p in g["params"]]
        self.names = [names.get(id(p), f"param{i}") for i, p in enumerate(self.params)]
        self.sharded = [is_sharded(p) for p in self.params]
        self.method, self.scaler, self.fused, self.suffix, self.groups = method, scaler, fused, suffix, groups
        self.index_cache = {}
        self.unbind()
        self.hook = optimizer.register_step_post_hook(self.after_step)  # runs right after every step()

    def unbind(self) -> None:
        if self.hook is not None:
            self.hook.remove()
            self.hook = None
        self.pending = None

    def present_index(self, present: list[int], device: torch.device) -> Tensor:
        key = tuple(present)
        if key not in self.index_cache:  # built once: a host list copied to the device every step would cost
            self.index_cache[key] = torch.tensor(present, device=device)
        return self.index_cache[key]

    def note_skip(self, skip: Flag) -> None:
        self.batch_skip = skip if self.batch_skip is None else self.batch_skip | skip

    # ------------------------------------------------------------ undoing the optimizer step
    def prepare_skip(self, present: list[int], skip: Tensor) -> None:
        """Before the optimizer step: arrange for it to leave parameters and optimizer state alone if ``skip``."""
        optimizer = self.optimizer
        if self.method == "sync":
            skipped = bool(skip.item())  # sync point: every step, chosen by skip_method="sync"
            self.host_streak = self.host_streak + 1 if skipped else 0
            self.note_skip(skipped)
            if skipped:
                for i in present:
                    self.params[i].grad = None  # torch optimizers leave gradient-less parameters untouched
            return
        self.note_skip(skip)
        params = [self.params[i] for i in present]
        pending: dict[str, Any] = {"skip": skip, "params": params,
                                   "had_state": [bool(optimizer.state.get(p)) for p in params]}
        if self.method == "found_inf":
            optimizer.found_inf = skip.float()  # fused kernels skip the whole update when this is nonzero
        else:
            live = [local(t.detach()) for t in params] + [
                local(t) for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
            pending["live"], pending["saved"] = live, self._buffers(live)
            torch._foreach_copy_(pending["saved"], live)
        self.pending = pending

    def _buffers(self, live: list[Tensor]) -> list[Tensor]:
        """Snapshot storage, allocated once per set of tensors (the optimizer creates its state once)."""
        key = tuple(id(t) for t in live)
        if self.snapshot_key != key:
            self.snapshot_key, self.snapshot = key, [torch.empty_like(t) for t in live]
        return self.snapshot

    def after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        skip = pending["skip"]
        if self.method == "found_inf":
            del optimizer.found_inf
        else:
            flags = {skip.device: skip}
            with torch.no_grad():
                for t, saved in zip(pending["live"], pending["saved"], strict=True):
                    if t.device not in flags:
                        # sync point: host-side state (the step counts of non-fused, non-capturable Adam on a GPU)
                        # can only be restored with the flag on the host; fused=True or capturable=True avoid it
                        flags[t.device] = skip.to(t.device)
                    torch.where(flags[t.device], saved, t, out=t)
        # A skipped step must not leave state behind that it created: fused SGD even leaves an uninitialized
        # momentum buffer (torch.empty_like) when found_inf is set on its first step.
        created = [p for p, had in zip(pending["params"], pending["had_state"], strict=True)
                   if not had and optimizer.state.get(p)]
        if created and skip.item():  # sync point: only the step at which the optimizer creates its state
            for p in created:
                del optimizer.state[p]


class _Group(NamedTuple):
    """Buffers of one owner, device and dtype, with their flat snapshot and scratch storage."""

    owner: int
    tensors: list[Tensor]
    saved: Tensor
    saved_views: list[Tensor]
    current: Tensor
    current_views: list[Tensor]


class BufferGuard:
    """Undoes what the forward pass of a skipped step wrote into module buffers (BatchNorm's running mean and
    variance, ``num_batches_tracked``, any persistent buffer).

    ``snapshot`` copies the buffers at the start of an accumulation window into preallocated flat storage (one
    fused ``torch._foreach_copy_`` per owner, device and dtype); ``restore`` puts them back where the owner's skip
    flag is set, with one ``torch.where`` over each flat group: no host sync for a flag on the device. Each buffer belongs to the
    optimizer that holds the parameters of its nearest module (itself or an ancestor) with optimized parameters,
    so a GAN's skipped discriminator step restores the discriminator's statistics only; a buffer with no single
    such owner is restored when any optimizer skipped. Non-persistent buffers are caches, not state: left alone.
    """

    SHARED = -1

    def __init__(self, module: nn.Module, slots: list[Slot]) -> None:
        slot_of = {id(p): s.index for s in slots for p in s.params}
        owners: dict[str, set[int]] = {}
        for name, m in module.named_modules():
            owners[name] = {slot_of[id(p)] for p in m.parameters() if id(p) in slot_of}
        groups: dict[tuple, list[Tensor]] = {}
        seen: set[int] = set()
        for name, m in module.named_modules():
            for key, buf in m._buffers.items():
                if buf is None or key in m._non_persistent_buffers_set or id(buf) in seen:
                    continue
                seen.add(id(buf))
                owner = self.SHARED
                path = name.split(".") if name else []
                for depth in range(len(path), -1, -1):  # the module itself, then its ancestors
                    found = owners.get(".".join(path[:depth]), set())
                    if found:
                        owner = next(iter(found)) if len(found) == 1 else self.SHARED
                        break
                t = local(buf)
                groups.setdefault((owner, t.device, t.dtype), []).append(t)
        self.groups = [_Group(owner, tensors, *_flat(tensors, dtype, device), *_flat(tensors, dtype, device))
                       for (owner, device, dtype), tensors in groups.items()]

    def __bool__(self) -> bool:
        return bool(self.groups)

    def snapshot(self) -> None:
        with torch.no_grad():
            for group in self.groups:
                torch._foreach_copy_(group.saved_views, group.tensors)

    def restore(self, flags: dict[int, Flag]) -> None:
        """Put back the buffers of each owner whose flag is set; ``flags`` maps slot index to its batch flag."""
        if not flags:
            return
        host = [f for f in flags.values() if isinstance(f, bool)]
        device = [f for f in flags.values() if not isinstance(f, bool)]
        shared: Optional[Flag] = True if any(host) else (None if not device else _any(device))
        with torch.no_grad():
            for owner, tensors, saved, saved_views, current, current_views in self.groups:
                flag = shared if owner == self.SHARED else flags.get(owner)
                if flag is None or flag is False:
                    continue
                if flag is True:  # the host knows: copy back only when skipped
                    torch._foreach_copy_(tensors, saved_views)
                    continue
                # three fused ops whatever the number of buffers: gather, select by the device flag, scatter back
                torch._foreach_copy_(current_views, tensors)
                torch.where(flag.to(current.device), saved, current, out=current)
                torch._foreach_copy_(tensors, current_views)


def _flat(tensors: list[Tensor], dtype: torch.dtype, device: torch.device) -> tuple[Tensor, list[Tensor]]:
    """One flat tensor for a group of buffers, and its pieces shaped like them (allocated once)."""
    flat = torch.empty(sum(t.numel() for t in tensors), dtype=dtype, device=device)
    return flat, [v.view_as(t) for v, t in zip(flat.split([t.numel() for t in tensors]), tensors, strict=True)]


def _any(flags: list[Tensor]) -> Tensor:
    out = flags[0]
    for f in flags[1:]:
        out = out | f
    return out


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
            dist.all_reduce(out, op=dist.ReduceOp.MAX, group=group)
        return out
    power = norms.pow(norm_type)
    shared = torch.where(mask, power, torch.zeros_like(power))
    for group in groups:
        dist.all_reduce(shared, op=dist.ReduceOp.SUM, group=group)
    return torch.where(mask, shared, power).pow(1.0 / norm_type)

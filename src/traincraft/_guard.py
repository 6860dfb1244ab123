"""Undoing a skipped optimizer step by a flag on the device: one implementation for both guards.

``GradientClipping`` (callbacks) and ``ImageClassifier``'s non-finite guard (modules) both skip a step without
asking the host whether to: the optimizer's step is made a no-op where the flag is set (``StepUndo``), and so is
what the forward passes of the step's batches wrote into module buffers, such as BatchNorm's running statistics
(``BufferGuard``). It sits below both packages because modules may not import callbacks.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, NamedTuple, Optional, Union

import torch
from torch import Tensor, nn

from traincraft._sharded import is_sharded

Flag = Union[Tensor, bool]  # a skip flag: on the device (no sync), or already on the host


def local(t: Tensor) -> Tensor:
    """The tensor to compute on: a DTensor's local shard (a view, so in-place writes reach the DTensor)."""
    return t.to_local() if is_sharded(t) else t


def zeros_are_fresh(optimizer: Any) -> bool:
    """Whether all-zero state (step counts included) acts exactly as no state: true for the optimizers that create
    zeros (Adam, AdamW, Adamax, RAdam, RMSprop, Adadelta) and for SGD without dampening (a zero momentum buffer gives
    ``0·momentum + grad``, the first step's ``clone(grad)``); not for NAdam (``mu_product`` starts at 1) or ASGD."""
    optim = torch.optim
    if type(optimizer) in (optim.Adam, optim.AdamW, optim.Adamax, optim.RAdam, optim.RMSprop, optim.Adadelta):
        return True
    return type(optimizer) is optim.SGD and all(g.get("dampening", 0) == 0 for g in optimizer.param_groups)


class StepUndo:
    """Makes one optimizer's next ``step()`` leave parameters and optimizer state alone where a device flag is set.

    ``arm`` runs before the step: a fused optimizer gets the flag as ``found_inf`` (its kernel then skips the whole
    update: no copy); otherwise parameters and optimizer state are copied into storage allocated once, and the
    step post-hook puts them back with ``torch.where``: no host sync for a flag on the device.

    State that a skipped step created must go too (fused SGD even leaves an uninitialized momentum buffer when
    ``found_inf`` is set on its first step). With ``zero_fresh_state`` it is zeroed where the optimizer would create
    zeros (see :func:`zeros_are_fresh`), without reading the flag; otherwise that one step reads the flag to delete it.
    ``on_host_state`` is called (with the optimizer) when part of the state lives on another device than the flag.
    """

    def __init__(self, optimizer: Any, zero_fresh_state: bool,
                 on_host_state: Optional[Callable[[Any], None]] = None) -> None:
        self.optimizer = optimizer
        self.zero_fresh_state = zero_fresh_state
        self.on_host_state = on_host_state
        self.pending: Optional[dict[str, Any]] = None
        self._key: tuple[int, ...] = ()
        self._saved: list[Tensor] = []
        self._hook = optimizer.register_step_post_hook(self._after_step)  # runs right after every step()

    def remove(self) -> None:
        self._hook.remove()
        self.pending = None

    def cancel(self) -> None:
        """Forget an armed step (its weights were just replaced): the next ``step()`` is not undone."""
        self.pending = None
        if hasattr(self.optimizer, "found_inf"):
            del self.optimizer.found_inf

    def arm(self, params: list[Tensor], skip: Tensor, fused: bool) -> None:
        optimizer = self.optimizer
        pending: dict[str, Any] = {"skip": skip, "params": params,
                                   "had_state": [bool(optimizer.state.get(p)) for p in params]}
        if fused:
            optimizer.found_inf = skip.float()  # fused kernels skip the whole update when this is nonzero
        else:
            live = [local(t.detach()) for t in params] + [
                local(t) for p in params for t in optimizer.state.get(p, {}).values() if isinstance(t, Tensor)]
            key = tuple(id(t) for t in live)
            if self._key != key:  # allocated once per set of tensors (the optimizer creates its state once)
                self._key, self._saved = key, [torch.empty_like(t) for t in live]
            torch._foreach_copy_(self._saved, live)
            pending["live"] = live
        self.pending = pending

    def _after_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        pending, self.pending = self.pending, None
        if pending is None:
            return
        skip = pending["skip"]
        if "live" not in pending:
            del optimizer.found_inf
        else:
            flags = {skip.device: skip}
            with torch.no_grad():
                for t, saved in zip(pending["live"], self._saved, strict=True):
                    if t.device not in flags:
                        if self.on_host_state is not None:
                            self.on_host_state(optimizer)
                        # sync point: state kept on the host (the step counts of non-fused, non-capturable Adam on
                        # an accelerator) can only be restored with the flag on the host; fused=True or
                        # capturable=True keep it on the device
                        flags[t.device] = skip.to(t.device)
                    torch.where(flags[t.device], saved, t, out=t)
        created = [p for p, had in zip(pending["params"], pending["had_state"], strict=True)
                   if not had and optimizer.state.get(p)]
        if not created:
            return
        if self.zero_fresh_state and zeros_are_fresh(optimizer):  # what the optimizer would create: no flag read
            with torch.no_grad():
                for p in created:
                    for t in optimizer.state[p].values():
                        if isinstance(t, Tensor):
                            t.masked_fill_(skip.to(t.device) if t.device != skip.device else skip, 0)
        elif skip.item():  # sync point: only the step at which the optimizer creates its state
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
    """Undoes what the forward passes of a skipped step wrote into module buffers (BatchNorm's running mean and
    variance, ``num_batches_tracked``, any persistent buffer).

    ``snapshot`` copies the buffers at the start of an accumulation window into preallocated flat storage (one
    fused ``torch._foreach_copy_`` per owner, device and dtype); ``restore`` puts them back where the owner's skip
    flag is set, with one ``torch.where`` over each flat group: no host sync for a flag on the device.

    ``owner_of`` maps ``id(parameter)`` to the index of the optimizer that holds it. Each buffer belongs to the
    optimizer that holds the parameters of its nearest module (itself or an ancestor) with optimized parameters,
    so a GAN's skipped discriminator step restores the discriminator's statistics only; a buffer with no single
    such owner (all of them, without ``owner_of``) is restored when any optimizer skipped. With ``persistent_only``
    non-persistent buffers (caches, not state) are left alone; ``device`` keeps only the buffers on that device.
    """

    SHARED = -1

    def __init__(self, module: nn.Module, owner_of: Optional[Mapping[int, int]] = None, persistent_only: bool = True,
                 device: Optional[torch.device] = None) -> None:
        owner_of = owner_of or {}
        owners = {name: {owner_of[id(p)] for p in m.parameters() if id(p) in owner_of}
                  for name, m in module.named_modules()}
        groups: dict[tuple, list[Tensor]] = {}
        seen: set[int] = set()
        for name, m in module.named_modules():
            for key, buf in m._buffers.items():
                if buf is None or id(buf) in seen or (persistent_only and key in m._non_persistent_buffers_set):
                    continue
                seen.add(id(buf))
                t = local(buf)
                if device is not None and t.device != device:
                    continue
                groups.setdefault((self._owner(owners, name), t.device, t.dtype), []).append(t)
        self.groups = [_Group(owner, tensors, *_flat(tensors, dtype, device), *_flat(tensors, dtype, device))
                       for (owner, device, dtype), tensors in groups.items()]

    def _owner(self, owners: dict[str, set[int]], name: str) -> int:
        path = name.split(".") if name else []
        for depth in range(len(path), -1, -1):  # the module itself, then its ancestors
            found = owners.get(".".join(path[:depth]), set())
            if found:
                return next(iter(found)) if len(found) == 1 else self.SHARED
        return self.SHARED

    def __bool__(self) -> bool:
        return bool(self.groups)

    def snapshot(self) -> None:
        with torch.no_grad():
            for group in self.groups:
                torch._foreach_copy_(group.saved_views, group.tensors)

    def restore(self, flags: dict[int, Flag]) -> None:
        """Put back the buffers of each owner whose flag is set; ``flags`` maps an owner to its flag."""
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

"""How GradientClipping skips an optimizer step, and what it does after too many skips in a row.

The callback decides *whether* a step is skipped (a device flag); this class makes the skip happen without
asking the host where it can: per optimizer by ``found_inf``, a snapshot or a host read (``skip_method``), the
module's buffers over each accumulation window (``restore_buffers``), and the ladder of ``max_consecutive_skips``
(raise, or restore the last healthy in-memory snapshot).
"""

from __future__ import annotations

import copy
from typing import Optional

import lightning.pytorch as pl
import torch
from torch import Tensor

from traincraft._guard import BufferGuard, StepUndo, local
from traincraft._steps import batch_steps
from traincraft.callbacks._clip_state import Slot

SKIP_METHODS = ("auto", "found_inf", "snapshot", "sync")


class StepSkipping:
    """The skip methods, the buffer guard and the consecutive-skip ladder of one GradientClipping callback."""

    def __init__(self, skip_method: str, restore_buffers: bool, max_consecutive_skips: Optional[int],
                 on_consecutive_skips: str, skip_spikes: bool) -> None:
        self.skip_method, self.restore_buffers = skip_method, restore_buffers
        self.max_consecutive_skips, self.on_consecutive_skips = max_consecutive_skips, on_consecutive_skips
        self.skip_spikes = skip_spikes
        self.slots: list[Slot] = []
        self.buffers: Optional[BufferGuard] = None
        self._window_open = False  # an accumulation window's buffer snapshot is taken

    # ---------------------------------------------------------------- set-up
    def bind(self, trainer: pl.Trainer, pl_module: pl.LightningModule, slots: list[Slot]) -> None:
        """Pick each optimizer's method (refusing impossible ones), hook its steps, and guard the buffers."""
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        for slot in slots:
            optimizer = slot.optimizer
            fused = all(g.get("fused") for g in optimizer.param_groups)
            method = self.skip_method
            if method == "auto":
                on_cpu = all(p.device.type == "cpu" for g in optimizer.param_groups for p in g["params"])
                # reading a CPU scalar is a memory load, not a device sync: cheaper than copying every parameter
                method = "found_inf" if fused and scaler is None else ("sync" if on_cpu else "snapshot")
            which = f"optimizer {slot.index} ({type(optimizer).__name__})"
            if method == "found_inf" and not fused:
                raise ValueError(f"skip_method='found_inf' needs a fused optimizer, and {which} is not "
                                 f"({type(optimizer).__name__}(..., fused=True)); use skip_method='auto', "
                                 "'snapshot' or 'sync'.")
            if method == "found_inf" and scaler is not None:
                raise ValueError("skip_method='found_inf' cannot be used under fp16 AMP, whose GradScaler sets the "
                                 "optimizer's found_inf itself; use skip_method='snapshot' or 'sync'.")
            slot.method, slot.scaler, slot.fused = method, scaler, fused
            self._unhook(slot)
            if method != "sync":
                slot.undo = StepUndo(optimizer, zero_fresh_state=False)
        self.slots = slots
        owner_of = {id(p): s.index for s in slots for p in s.params}
        self.buffers = BufferGuard(pl_module, owner_of) if self.restore_buffers else None
        self._window_open = False

    def unbind(self) -> None:
        for slot in self.slots:
            self._unhook(slot)

    @staticmethod
    def _unhook(slot: Slot) -> None:
        if slot.undo is not None:
            slot.undo.remove()
            slot.undo = None

    # ---------------------------------------------------------------- per batch and per step
    def batch_start(self) -> None:
        for slot in self.slots:
            slot.batch_skip = None
        if self.buffers and not self._window_open:  # the first micro-batch of an accumulation window
            self.buffers.snapshot()
            self._window_open = True

    def batch_end(self, trainer: pl.Trainer) -> None:
        if not batch_steps(trainer):
            return  # the window goes on: its forward passes are undone together if its step is skipped
        self._window_open = False
        if self.buffers:
            self.buffers.restore({s.index: s.batch_skip for s in self.slots if s.batch_skip is not None})
        for slot in self.slots:
            slot.batch_skip = None

    def prepare(self, slot: Slot, present: list[int], skip: Tensor) -> None:
        """Before the optimizer step: arrange for it to leave parameters and optimizer state alone if ``skip``."""
        if slot.method == "sync":
            skipped = bool(skip.item())  # sync point: every step, chosen by skip_method="sync"
            slot.host_streak = slot.host_streak + 1 if skipped else 0
            slot.note_skip(skipped)
            if skipped:
                for i in present:
                    slot.params[i].grad = None  # torch optimizers leave gradient-less parameters untouched
            return
        slot.note_skip(skip)
        slot.undo.arm([slot.params[i] for i in present], skip, fused=slot.method == "found_inf")

    # ---------------------------------------------------------------- the ladder
    def ladder(self, trainer: pl.Trainer, pl_module: pl.LightningModule, slot: Slot, streak: int,
               healthy: bool = False) -> None:
        """At a host-known streak: keep a healthy snapshot, or act on ``max_consecutive_skips`` skips in a row."""
        limit = self.max_consecutive_skips
        optimizer = slot.optimizer
        if limit is None or streak < limit:
            if healthy and self.on_consecutive_skips == "restore":
                slot.healthy = {"params": [p.detach().clone() for p in slot.params],
                                "buffers": self._owned_buffers(pl_module, slot),
                                "optimizer": copy.deepcopy(optimizer.state_dict())}
                slot.restored_from_current = False
            return
        which = "" if len(self.slots) == 1 else f"optimizer {slot.index} ({type(optimizer).__name__}) "
        what = (f"GradientClipping skipped {streak} {which}optimizer steps in a row (limit "
                f"max_consecutive_skips={limit}) at global step {trainer.global_step}: the gradient norm was not "
                "finite" + (" or above the threshold (skip_spikes=True)" if self.skip_spikes else "") + ". ")
        if self.on_consecutive_skips == "raise" or slot.healthy is None or slot.restored_from_current:
            why = "" if self.on_consecutive_skips == "raise" else (
                "No healthy snapshot is left to restore. " if slot.restored_from_current or slot.healthy
                else "No healthy logging step has been seen yet to restore from. ")
            raise RuntimeError(what + why + "Lower the learning rate, check the data for NaN/inf and the loss for "
                               "log(0) or division by zero, or use a bf16/fp32 precision.")
        with torch.no_grad():
            for p, saved in zip(slot.params, slot.healthy["params"], strict=True):
                p.copy_(saved)
            for name, saved in slot.healthy["buffers"].items():
                pl_module.get_buffer(name).copy_(saved)
        optimizer.load_state_dict(slot.healthy["optimizer"])
        slot.restored_from_current = True
        for p in slot.params:  # this step's gradients belong to the weights we just threw away
            p.grad = None
        if slot.undo is not None:
            slot.undo.cancel()
        elif hasattr(optimizer, "found_inf"):
            del optimizer.found_inf
        slot.batch_skip = None  # the snapshot holds the buffers too: the batch-end restore must not undo it
        slot.state["streak"].zero_()
        slot.state["max_streak"].zero_()
        slot.host_streak = 0

    def _owned_buffers(self, pl_module: pl.LightningModule, slot: Slot) -> dict[str, Tensor]:
        """Copies of the persistent buffers a healthy snapshot restores with this optimizer's parameters."""
        owned = {id(t) for group in (self.buffers.groups if self.buffers else [])
                 for t in group.tensors if group.owner in (slot.index, BufferGuard.SHARED)}
        if len(self.slots) == 1:
            owned = None  # one optimizer owns every buffer
        return {n: b.detach().clone() for n, b in pl_module.named_buffers()
                if owned is None or id(local(b)) in owned}

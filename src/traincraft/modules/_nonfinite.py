"""Device-side guard against non-finite updates: detect on every step, skip exactly, report at logging steps.

Every optimizer step computes one flag on the device (a non-finite loss or out-of-range labels in the
accumulation window, or a non-finite gradient) and undoes that step's update by it, without reading the flag on
the host: the parameters and optimizer state are copied before ``step()`` and put back with ``torch.where`` after
it (for ``fused=True`` optimizers the flag goes to the kernel as ``found_inf``, which leaves everything untouched).
The first bad step of the interval and the counts stay on the device until :meth:`NonFiniteGuard.read`, which the
module calls on logging steps and at the end of the fit: the one place that copies them to the host.

When something else already skips non-finite steps (the GradientClipping callback, or fp16 AMP's GradScaler) the
guard does not copy or restore anything: the module multiplies a bad batch's loss by NaN, so its gradients are not
finite and that skipper drops the step (under DDP the NaN also travels through the gradient all-reduce, so every
rank skips the same step).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any, Optional

import torch
from torch import Tensor

from traincraft._guard import BufferGuard, StepUndo
from traincraft.modules._labels import label_message

LOSS, LABELS, GRADS = 1, 2, 4  # bits of what was wrong in a step
# slots of the int64 record
_TOTAL, _SINCE, _STEP, _EPOCH, _BATCH, _BITS, _ALL_BITS, _LO, _HI = range(9)
_NO_LABEL = 2**62


@dataclass(frozen=True)
class NonFiniteReport:
    """What the device record says, copied to the host once."""

    total: int  # bad optimizer steps since the start of the fit
    since: int  # bad optimizer steps since the last read
    step: int  # global step (optimizer steps before it) of the first bad step since the last read
    epoch: int
    batch: int
    bits: int  # what was wrong in that first step (LOSS | LABELS | GRADS)
    all_bits: int  # what was wrong in any bad step since the last read
    loss: float  # the first non-finite loss since the last read (0 if the loss stayed finite)
    label_low: int  # smallest and largest label of the training batches seen so far
    label_high: int


class NonFiniteGuard:
    """State and hooks of the guard; the LightningModule calls it (see ImageClassifier)."""

    def __init__(self) -> None:
        self.owns_skip = True  # False: GradientClipping or a GradScaler skips, this only records
        self._rec: Optional[Tensor] = None
        self._loss: Optional[Tensor] = None
        self._window: Optional[Tensor] = None  # LOSS/LABELS bits of the accumulation window
        self._window_loss: Optional[Tensor] = None
        self._undo: dict[int, StepUndo] = {}  # by id(optimizer), when this guard skips
        self._warned_host_state = False
        self._module_buffers: Optional[BufferGuard] = None
        self._window_open = False

    # ---------------------------------------------------------------- set-up
    def attach(self, optimizers: list[Any], module: torch.nn.Module, owns_skip: bool, buffers: bool = True) -> None:
        self.detach()
        device = module.device
        self.owns_skip = owns_skip
        # BatchNorm's running statistics change in the forward pass, before any skip: saved at each window's start
        self._module_buffers = BufferGuard(module, persistent_only=False, device=device) if buffers else None
        self._window_open = False
        self._rec = torch.zeros(9, dtype=torch.int64, device=device)
        self._rec[_STEP:_BITS].fill_(-1)
        self._rec[_LO], self._rec[_HI] = _NO_LABEL, -_NO_LABEL
        self._loss = torch.zeros((), device=device)
        self._window = torch.zeros((), dtype=torch.int64, device=device)
        self._window_loss = torch.zeros((), device=device)
        if owns_skip:
            self._undo = {id(opt): StepUndo(opt, zero_fresh_state=True, on_host_state=self._warn_host_state)
                          for opt in optimizers}

    def detach(self) -> None:
        for undo in self._undo.values():
            undo.remove()
        self._undo = {}

    @property
    def attached(self) -> bool:
        return self._rec is not None

    # ---------------------------------------------------------------- per batch (no host sync)
    def start_batch(self) -> None:
        """In ``on_train_batch_start``: save the buffers when the batch opens an accumulation window."""
        if not self._window_open and self._module_buffers:
            self._module_buffers.snapshot()
        self._window_open = True

    def note_batch(self, loss: Tensor, labels_bad: Optional[Tensor], labels: Optional[Tensor]) -> Tensor:
        """Record a training batch's loss and labels; returns the flag of this batch (a device bool)."""
        finite = torch.isfinite(loss.detach())
        bad = ~finite if labels_bad is None else ~finite | labels_bad
        bits = (~finite).long() * LOSS + (0 if labels_bad is None else labels_bad.long() * LABELS)
        self._window.bitwise_or_(bits)
        torch.where(finite, self._window_loss, loss.detach().float(), out=self._window_loss)
        if labels is not None and labels.numel():
            low, high = torch.aminmax(labels)
            torch.minimum(self._rec[_LO], low, out=self._rec[_LO])
            torch.maximum(self._rec[_HI], high, out=self._rec[_HI])
        return bad

    def before_step(self, optimizer: Any, global_step: int, epoch: int, batch: int) -> None:
        """In ``on_before_optimizer_step``: the step's flag, the record, and (when this guard skips) the snapshot."""
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        bits = self._window.clone()
        self._window.zero_()
        if self.owns_skip and params:
            # the inf-norm of every gradient in one fused call: NaN and inf both propagate to the sum
            peak = torch.stack(torch._foreach_norm([p.grad for p in params], float("inf"))).float().sum()
            bits.bitwise_or_((~torch.isfinite(peak)).long() * GRADS)
        bad = bits != 0
        rec = self._rec
        first = bad & (rec[_SINCE] == 0)
        rec[_TOTAL] += bad
        rec[_SINCE] += bad
        for slot, value in ((_STEP, global_step), (_EPOCH, epoch), (_BATCH, batch)):
            rec[slot] = torch.where(first, value, rec[slot])
        rec[_BITS] = torch.where(first, bits, rec[_BITS])
        rec[_ALL_BITS] |= bits
        torch.where(first, self._window_loss, self._loss, out=self._loss)
        self._window_loss.zero_()
        if self._window_open and self._module_buffers:
            self._module_buffers.restore({0: bad})
        self._window_open = False
        undo = self._undo.get(id(optimizer))
        if undo is not None and params:
            undo.arm(params, bad, fused=all(group.get("fused") for group in optimizer.param_groups))

    def _warn_host_state(self, optimizer: Any) -> None:
        if not self._warned_host_state:
            self._warned_host_state = True
            warnings.warn(
                f"{type(optimizer).__name__} keeps part of its state (step counts) on the host: to undo a non-finite "
                "step exactly, ImageClassifier's guard reads one flag from the device every step. Create the "
                "optimizer with fused=True (or capturable=True) to keep it on the device.",
                stacklevel=2,
            )

    # ---------------------------------------------------------------- the host copy
    def read(self) -> NonFiniteReport:
        """Copy the record to the host and start a new interval. Call on logging steps and at the end only."""
        values = torch.cat([self._rec.double(), self._loss.double().reshape(1)]).tolist()  # sync point: logging step only
        self._rec[_SINCE] = 0
        self._rec[_STEP:_BITS].fill_(-1)
        self._rec[_ALL_BITS] = 0
        ints = [int(v) for v in values[:9]]
        return NonFiniteReport(
            total=ints[_TOTAL], since=ints[_SINCE], step=ints[_STEP], epoch=ints[_EPOCH], batch=ints[_BATCH],
            bits=ints[_BITS], all_bits=ints[_ALL_BITS], loss=values[9], label_low=ints[_LO], label_high=ints[_HI],
        )


def act_on_report(report: NonFiniteReport, on_nonfinite: str, num_classes: Optional[int], when: str) -> None:
    """What ImageClassifier does with a read record: out-of-range labels always raise; non-finite steps raise a
    ``FloatingPointError``, warn or pass, as ``on_nonfinite`` says."""
    if not report.since:
        return
    where = (f"optimizer step {report.step} (epoch {report.epoch}, batch {report.batch}){when}")
    if report.all_bits & LABELS:
        raise ValueError(
            label_message(num_classes, report.label_low, report.label_high, "the training batches so far")
            + f" {report.since} step(s) with bad labels or non-finite values were skipped since the last check, "
            f"the first at {where}."
        )
    what = []
    if report.bits & LOSS:
        what.append(f"the training loss was {report.loss}")
    if report.bits & GRADS:
        what.append("a gradient was not finite (inf or nan)")
    message = (
        f"ImageClassifier skipped the update of {where}: {' and '.join(what) or 'it was not finite'}. "
        f"{report.since} step(s) were skipped since the last check, {report.total} in this fit; the weights and "
        "optimizer state are those of before each skipped step. Lower the learning rate, add traincraft's "
        "GradientClipping callback, check the inputs for non-finite values, or set on_nonfinite='warn' or "
        "'skip' to train on past such steps."
    )
    if on_nonfinite == "raise":
        raise FloatingPointError(message)
    if on_nonfinite == "warn":
        warnings.warn(message, stacklevel=3)

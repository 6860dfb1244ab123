"""Device-side tracking of one optimizer's updates Δθ, per parameter group, for oscillation and update ratios.

One tracker per optimizer, shared: ``LearningRateMonitor`` and ``LearningRateGovernor`` both attach to the tracker
of an optimizer (:func:`attach`), so the weights are copied once per step however many callbacks read the updates.
Each attached callback keeps its own EMAs (:class:`Oscillation`), with its own smoothing and checkpoint state.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from traincraft.metrics.updates import update_agreement, update_weight_ratio


class Oscillation:
    """One reader's EMAs of the update cosine and of the sign-flip fraction, per parameter group."""

    def __init__(self, groups: int, device: torch.device, ema: float) -> None:
        self.ema = ema
        self.cosine_ema = torch.zeros(groups, device=device)
        self.flip_ema = torch.zeros(groups, device=device)
        self.comparisons = 0  # host counter: bias correction of the EMAs without reading the device

    def add(self, cosine: Tensor, flips: Tensor) -> None:
        self.cosine_ema.mul_(self.ema).add_(cosine, alpha=1 - self.ema)
        self.flip_ema.mul_(self.ema).add_(flips, alpha=1 - self.ema)
        self.comparisons += 1

    def value(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected EMAs of the update cosine and of the sign-flip fraction, per group (0 before any)."""
        correction = 1 - self.ema**self.comparisons if self.comparisons else 1.0
        return self.cosine_ema / correction, self.flip_ema / correction

    def state_dict(self) -> dict[str, Any]:
        return {"cosine_ema": self.cosine_ema.cpu(), "flip_ema": self.flip_ema.cpu(), "comparisons": self.comparisons}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["cosine_ema"].shape == self.cosine_ema.shape:
            self.cosine_ema.copy_(state["cosine_ema"])
            self.flip_ema.copy_(state["flip_ema"])
            self.comparisons = int(state["comparisons"])


class _Reader:
    def __init__(self, wants_step: Callable[[], bool], oscillation: Optional[Oscillation]) -> None:
        self.wants_step, self.oscillation = wants_step, oscillation


class UpdateTracker:
    """Holds the last two updates of each parameter group as flat fp32 buffers.

    ``before_step`` copies the weights into the current buffer; ``after_step`` subtracts the new weights, which
    leaves -Δθ there (the sign does not matter for norms, cosines or flips), then, when some reader follows the
    oscillation, compares it with the previous update and feeds each reader's EMAs. Everything stays on the device:
    a few fused passes over the parameters per step.
    """

    def __init__(self, optimizer: Optimizer) -> None:
        self.optimizer = optimizer
        self.params = [[p for p in group["params"]] for group in optimizer.param_groups]
        # detached aliases made once: they share storage with the weights, which the optimizer updates in place
        self.detached = [[p.detach() for p in params] for params in self.params]
        self.device = self.params[0][0].device if self.params and self.params[0] else torch.device("cpu")
        self.current = [self._buffer(ps) for ps in self.params]
        self.previous = [self._buffer(ps) for ps in self.params]
        self.squares = [torch.zeros((), device=self.device) for _ in self.params]  # ‖previous update‖² per group
        self.has_update = False
        self.armed = False
        self.readers: dict[int, _Reader] = {}
        self._handles: list[Any] = []

    @staticmethod
    def _buffer(params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        device = params[0].device if params else torch.device("cpu")
        flat = torch.zeros(sum(p.numel() for p in params), device=device)
        return flat, [view.view_as(p) for view, p in zip(flat.split([p.numel() for p in params]), params, strict=False)]

    def follow(self, ema: float) -> Oscillation:
        """A fresh set of EMAs for one reader, fed by :meth:`after_step` when it compares."""
        return Oscillation(len(self.params), self.device, ema)

    def before_step(self) -> None:
        for (_, views), params in zip(self.current, self.detached, strict=True):
            if params:
                torch._foreach_copy_(views, params)
        self.armed = True

    def after_step(self, compare: bool, oscillations: tuple[Oscillation, ...] = ()) -> None:
        if not self.armed:
            return
        self.armed = False
        for (_, views), params in zip(self.current, self.detached, strict=True):
            if params:
                torch._foreach_sub_(views, params)
        if compare:
            # the previous update is not needed after this comparison: it holds the product (no allocation)
            results = [update_agreement(c, p, sq, workspace=p)
                       for (c, _), (p, _), sq in zip(self.current, self.previous, self.squares, strict=True)]
            self.squares = [square for _, _, square in results]
            if self.has_update and oscillations:
                cosine = torch.stack([cosine for cosine, _, _ in results])
                flips = torch.stack([flips for _, flips, _ in results])
                for oscillation in oscillations:
                    oscillation.add(cosine, flips)
        self.current, self.previous = self.previous, self.current
        self.has_update = True

    def ratios(self) -> Tensor:
        """‖Δθ‖/‖θ‖ of the latest update, per group."""
        return torch.stack([
            update_weight_ratio(flat, params) if params else torch.zeros((), device=flat.device)
            for (flat, _), params in zip(self.previous, self.params, strict=False)
        ])

    def state_dict(self) -> dict[str, Any]:
        """The latest update per group (one fp32 copy of the weights) and its squared norms: what the first
        comparison after a resume needs to give the cosine an uninterrupted run gives."""
        return {"previous": [flat.to("cpu", copy=True) for flat, _ in self.previous],  # sync point: checkpoints only
                "squares": [square.to("cpu", copy=True) for square in self.squares], "has_update": self.has_update}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        shapes = [tuple(flat.shape) for flat, _ in self.previous]
        if [tuple(t.shape) for t in state["previous"]] != shapes:
            raise ValueError(f"the checkpoint's last update has group sizes {[tuple(t.shape) for t in state['previous']]}"
                             f" but this optimizer's groups have {shapes}: it was saved for another model or grouping.")
        for (flat, _), saved in zip(self.previous, state["previous"], strict=True):
            flat.copy_(saved)
        self.squares = [saved.to(self.device, copy=True) for saved in state["squares"]]
        self.has_update = bool(state["has_update"])

    # ------------------------------------------------------------------------------- shared use through hooks
    def _pre_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        if any(reader.wants_step() for reader in self.readers.values()):
            self.before_step()

    def _post_hook(self, optimizer: Optimizer, args: Any, kwargs: Any) -> None:
        oscillations = tuple(r.oscillation for r in self.readers.values() if r.oscillation is not None)
        self.after_step(compare=bool(oscillations), oscillations=oscillations)


# weak: an optimizer of a finished fit takes its tracker (and the two weight copies) with it
_TRACKERS: weakref.WeakKeyDictionary[Optimizer, UpdateTracker] = weakref.WeakKeyDictionary()


def attach(reader: object, optimizer: Optimizer, wants_step: Callable[[], bool],
           ema: Optional[float] = None) -> tuple[UpdateTracker, Optional[Oscillation]]:
    """The shared tracker of ``optimizer``, made (with its step hooks) by the first reader to ask.

    ``wants_step`` says before each step whether ``reader`` needs this step's update (the weights are copied when
    any reader does); with ``ema`` the reader also follows the oscillation and gets its own :class:`Oscillation`.
    """
    tracker = _TRACKERS.get(optimizer)
    if tracker is None:
        tracker = _TRACKERS[optimizer] = UpdateTracker(optimizer)
        tracker._handles = [optimizer.register_step_pre_hook(tracker._pre_hook),
                            optimizer.register_step_post_hook(tracker._post_hook)]
    oscillation = tracker.follow(ema) if ema is not None else None
    tracker.readers[id(reader)] = _Reader(wants_step, oscillation)
    return tracker, oscillation


def detach(reader: object, tracker: UpdateTracker) -> None:
    """``reader`` stops reading ``tracker``; the last one to go removes its hooks (the next fit starts afresh)."""
    tracker.readers.pop(id(reader), None)
    if not tracker.readers:
        for handle in tracker._handles:
            handle.remove()
        tracker._handles = []
        if _TRACKERS.get(tracker.optimizer) is tracker:
            del _TRACKERS[tracker.optimizer]


def release(reader: object, trackers: dict[int, UpdateTracker]) -> None:
    """:func:`detach` ``reader`` from each of ``trackers`` and forget them (at the end of a fit, or before the next)."""
    for tracker in trackers.values():
        detach(reader, tracker)
    trackers.clear()

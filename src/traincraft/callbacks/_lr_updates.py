"""Device-side tracking of one optimizer's updates Δθ, per parameter group, for oscillation and update ratios."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.optim import Optimizer

from traincraft.metrics.updates import update_agreement, update_weight_ratio


class UpdateTracker:
    """Holds the last two updates of each parameter group as flat fp32 buffers, and EMAs of their agreement.

    ``before_step`` copies the weights into the current buffer; ``after_step`` subtracts the new weights, which
    leaves -Δθ there (the sign does not matter for norms, cosines or flips), then compares it with the previous
    update. Everything stays on the device: a few fused passes over the parameters per step.
    """

    def __init__(self, optimizer: Optimizer, ema: float) -> None:
        self.optimizer = optimizer
        self.ema = ema
        self.params = [[p for p in group["params"]] for group in optimizer.param_groups]
        # detached aliases made once: they share storage with the weights, which the optimizer updates in place
        self.detached = [[p.detach() for p in params] for params in self.params]
        device = self.params[0][0].device if self.params and self.params[0] else torch.device("cpu")
        self.current = [self._buffer(ps) for ps in self.params]
        self.previous = [self._buffer(ps) for ps in self.params]
        groups = len(self.params)
        self.squares = [torch.zeros((), device=device) for _ in range(groups)]  # ‖previous update‖² per group
        self.cosine_ema = torch.zeros(groups, device=device)
        self.flip_ema = torch.zeros(groups, device=device)
        self.comparisons = 0  # host counter: bias correction of the EMAs without reading the device
        self.has_update = False
        self.armed = False

    @staticmethod
    def _buffer(params: list[Tensor]) -> tuple[Tensor, list[Tensor]]:
        device = params[0].device if params else torch.device("cpu")
        flat = torch.zeros(sum(p.numel() for p in params), device=device)
        return flat, [view.view_as(p) for view, p in zip(flat.split([p.numel() for p in params]), params, strict=False)]

    def before_step(self) -> None:
        for (_, views), params in zip(self.current, self.detached, strict=True):
            if params:
                torch._foreach_copy_(views, params)
        self.armed = True

    def after_step(self, compare: bool) -> None:
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
            if self.has_update:
                cos = torch.stack([cosine for cosine, _, _ in results])
                flip = torch.stack([flips for _, flips, _ in results])
                self.cosine_ema.mul_(self.ema).add_(cos, alpha=1 - self.ema)
                self.flip_ema.mul_(self.ema).add_(flip, alpha=1 - self.ema)
                self.comparisons += 1
        self.current, self.previous = self.previous, self.current
        self.has_update = True

    def oscillation(self) -> tuple[Tensor, Tensor]:
        """Bias-corrected EMAs of the update cosine and of the sign-flip fraction, per group (0 before any)."""
        correction = 1 - self.ema**self.comparisons if self.comparisons else 1.0
        return self.cosine_ema / correction, self.flip_ema / correction

    def ratios(self) -> Tensor:
        """‖Δθ‖/‖θ‖ of the latest update, per group."""
        return torch.stack([
            update_weight_ratio(flat, params) if params else torch.zeros((), device=flat.device)
            for (flat, _), params in zip(self.previous, self.params, strict=False)
        ])

    def state_dict(self) -> dict[str, Any]:
        return {"cosine_ema": self.cosine_ema.cpu(), "flip_ema": self.flip_ema.cpu(), "comparisons": self.comparisons}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["cosine_ema"].shape == self.cosine_ema.shape:
            self.cosine_ema.copy_(state["cosine_ema"])
            self.flip_ema.copy_(state["flip_ema"])
            self.comparisons = int(state["comparisons"])

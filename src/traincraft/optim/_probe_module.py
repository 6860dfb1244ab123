"""The module's side of the learning-rate suggestion: its one optimizer, the batches a training step would see,
and a snapshot that puts back everything a warm-up and a probe change."""

from __future__ import annotations

import copy
import random
from collections.abc import Iterable, Iterator
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch import Tensor
from torch.optim import Optimizer


class _Snapshot:
    """Everything a warm-up and a probe may change on a module, and puts it back."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.state = copy.deepcopy(module.state_dict(keep_vars=False))
        self.grads = [(p, None if p.grad is None else p.grad.detach().clone()) for p in module.parameters()]
        self.modes = [(m, m.training) for m in module.modules()]
        self.python, self.numpy = random.getstate(), np.random.get_state()

    def restore(self) -> None:
        with torch.no_grad():
            self.module.load_state_dict(self.state)
        for param, grad in self.grads:
            param.grad = grad
        for submodule, training in self.modes:
            submodule.training = training
        random.setstate(self.python)
        np.random.set_state(self.numpy)


def _single_optimizer(module: pl.LightningModule) -> Optimizer:
    config = module.configure_optimizers()
    found: list[Any] = []

    def collect(item: Any) -> None:
        if isinstance(item, Optimizer):
            found.append(item)
        elif isinstance(item, dict):
            collect(item.get("optimizer"))
        elif isinstance(item, (list, tuple)):
            # Lightning also accepts ([optimizers], [schedulers]): schedulers are not optimizers, skip them
            for entry in item:
                collect(entry)

    collect(config)
    name = type(module).__name__
    if not found:
        raise TypeError(f"{name}.configure_optimizers() returned no torch optimizer ({type(config).__name__}); "
                        "suggest_learning_rate suggests a rate for the optimizer the module configures: return one.")
    if len(found) > 1:
        raise TypeError(f"{name} configures {len(found)} optimizers; which loss and which rate to suggest is not "
                        "defined (a GAN's generator and discriminator minimize different losses). Call "
                        "suggest_learning_rate on a module with one optimizer, e.g. a wrapper whose "
                        "configure_optimizers returns the one to tune and whose probe_loss(batch) is its loss.")
    return found[0]



def _cycle(loader: Iterable[Any]) -> Iterator[Any]:
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            raise ValueError("the training loader yielded no batch; give suggest_learning_rate a non-empty one.")


def _prepare(module: pl.LightningModule, datamodule: Optional[pl.LightningDataModule], batch: Any,
             device: torch.device) -> Any:
    """The batch as a training step sees it: the transfer hooks Lightning would run (the module's if it overrides
    them, else the datamodule's), around the move to the module's device."""
    owner = module if is_overridden("on_before_batch_transfer", module) or datamodule is None else datamodule
    batch = owner.on_before_batch_transfer(batch, 0)
    batch = module.transfer_batch_to_device(batch, device, 0)
    owner = module if is_overridden("on_after_batch_transfer", module) or datamodule is None else datamodule
    return owner.on_after_batch_transfer(batch, 0)


def _concatenate(batches: list[Any]) -> Any:
    first = batches[0]
    if isinstance(first, Tensor):
        return torch.cat(batches) if first.ndim else first
    if isinstance(first, (tuple, list)):
        return type(first)(_concatenate([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, dict):
        return {key: _concatenate([b[key] for b in batches]) for key in first}
    return first

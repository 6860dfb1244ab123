"""The models of the compatibility matrix, none of them traincraft's own design except the CNN.

- ``cnn``: traincraft's ``ImageClassifier`` around its small BatchNorm convnet, on scikit-learn's digits (8x8).
- ``transformer``: Lightning's demo language model (``lightning.pytorch.demos.Transformer``), tiny, on random tokens.
- ``mlp``: Lightning's ``BoringModel`` with a hidden ReLU layer, on its own ``RandomDataset``.
- ``gan``: a two-optimizer GAN under manual optimization (``trainer.global_step`` moves by 2 per batch).

Each model defines ``probe_loss(batch)`` where traincraft's ``CurvatureMonitor`` cannot know the loss on its own
(it is the documented way to tell it), and ``feature_batch(batch)``-free forwards: ``pl_module(x)`` maps a batch's
inputs to outputs for the models whose batch is ``(x, y)`` or ``x``.
"""

from __future__ import annotations

import functools

import torch
from lightning.pytorch import LightningModule
from lightning.pytorch.demos import LightningTransformer, Transformer
from lightning.pytorch.demos.boring_classes import BoringModel, RandomDataset
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from traincraft.data import DigitsDataModule
from traincraft.modules import ImageClassifier

MODELS = ("cnn", "transformer", "mlp", "gan")


class TinyLM(LightningTransformer):
    """Lightning's demo transformer LM (encoder-decoder, batch first), small, on random tokens: no download."""

    def __init__(self) -> None:
        super().__init__(vocab_size=12)
        self.model = Transformer(vocab_size=12, ninp=4, nhead=2, nhid=4, nlayers=1, dropout=0.0)

    def probe_loss(self, batch):
        inputs, target = batch
        return nn.functional.nll_loss(self(inputs, target), target.view(-1))

    def validation_step(self, batch, batch_idx):
        inputs, target = batch
        self.log("val/loss", nn.functional.nll_loss(self(inputs, target), target.view(-1)))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def prepare_data(self) -> None:
        pass

    def _tokens(self, seed: int) -> DataLoader:
        tokens = torch.randint(0, 12, (48, 2, 6), generator=torch.Generator().manual_seed(seed))
        return DataLoader([(t[0], t[1]) for t in tokens], batch_size=4)

    def train_dataloader(self) -> DataLoader:
        return self._tokens(0)

    def val_dataloader(self) -> DataLoader:
        return self._tokens(1)


class HiddenBoring(BoringModel):
    """Lightning's BoringModel (MSE towards ones, SGD with StepLR) with a hidden ReLU layer and batches of 8."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Sequential(nn.Linear(32, 12), nn.ReLU(), nn.Linear(12, 2))
        # drawn once: BoringModel's loaders draw a new RandomDataset at every call
        self.train_set, self.val_set = RandomDataset(32, 64), RandomDataset(32, 32)

    def probe_loss(self, batch):
        return self.step(batch)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=8)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=8)


class GAN(LightningModule):
    """Generator and discriminator, two SGD optimizers, manual optimization. ``forward`` is the discriminator (what
    the model "sees" of the data); ``probe_loss`` is the discriminator's loss on a fixed noise batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 6))
        self.discriminator = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
        self.register_buffer("noise", torch.randn(16, 4, generator=torch.Generator().manual_seed(0)))

    def forward(self, x):
        return self.discriminator(x)

    def _d_loss(self, real, fake):
        logits = self(torch.cat([real, fake]))
        labels = torch.cat([torch.ones(len(real), 1), torch.zeros(len(fake), 1)]).to(logits)
        return nn.functional.binary_cross_entropy_with_logits(logits, labels)

    def training_step(self, batch, batch_idx):
        (real,) = batch
        g_opt, d_opt = self.optimizers()
        fake = self.generator(torch.randn(len(real), 4, device=real.device))
        d_opt.zero_grad()
        self.manual_backward(self._d_loss(real, fake.detach()))
        d_opt.step()
        g_opt.zero_grad()
        logits = self(self.generator(torch.randn(len(real), 4, device=real.device)))
        self.manual_backward(nn.functional.binary_cross_entropy_with_logits(logits, torch.ones_like(logits)))
        g_opt.step()

    def validation_step(self, batch, batch_idx):
        self.log("val/d_real", self(batch[0]).mean())

    def probe_loss(self, batch):
        return self._d_loss(batch[0], self.generator(self.noise))

    def configure_optimizers(self):
        return [torch.optim.SGD(self.generator.parameters(), lr=0.05),
                torch.optim.SGD(self.discriminator.parameters(), lr=0.1, momentum=0.5)]

    def _data(self, seed: int) -> DataLoader:
        data = torch.randn(128, 6, generator=torch.Generator().manual_seed(seed)) * 0.5 + 1.0
        return DataLoader(TensorDataset(data), batch_size=16)

    def train_dataloader(self) -> DataLoader:
        return self._data(1)

    def val_dataloader(self) -> DataLoader:
        return self._data(2)


#: The inner networks that the ``compile`` setting wraps in ``torch.compile`` (the LightningModule stays eager:
#: compiling the whole module, as ``trainer.fit(torch.compile(module))`` does, also compiles ``training_step`` and
#: its ``self.log`` calls, which dynamo cannot trace in torch 2.13 with lightning 2.6).
INNER = {"cnn": ("model",), "transformer": ("model",), "mlp": ("layer",), "gan": ("generator", "discriminator")}


def compile_inner(name: str, module: LightningModule, backend: str = "eager") -> LightningModule:
    """Wrap the zoo model's inner networks in ``torch.compile`` (parameter names gain ``_orig_mod.``)."""
    for attribute in INNER[name]:
        setattr(module, attribute, torch.compile(getattr(module, attribute), backend=backend))
    return module


def build(name: str) -> tuple[LightningModule, DigitsDataModule | None]:
    """A fresh model of the zoo and its DataModule (``None``: the module brings its own loaders)."""
    if name == "cnn":
        model = ImageClassifier("convnet", num_classes=10, in_channels=1, input_size=8,
                                model_kwargs={"channels": [2, 3], "hidden": 6, "norm": "batch"},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.05, momentum=0.9))
        return model, DigitsDataModule(image_size=8, batch_size=16, augment="none")
    if name == "transformer":
        return TinyLM(), None
    if name == "mlp":
        return HiddenBoring(), None
    if name == "gan":
        return GAN(), None
    raise ValueError(f"unknown zoo model {name!r}; one of {MODELS}.")

"""traincraft: PyTorch Lightning parts for optimizing the training of deep models.

Subpackages: :mod:`traincraft.models` (plain ``nn.Module`` networks), :mod:`traincraft.modules`
(LightningModules), :mod:`traincraft.data` (DataModules with on-device augmentation), :mod:`traincraft.augment`,
:mod:`traincraft.callbacks`, :mod:`traincraft.strategies` and :mod:`traincraft.optim`.
Importing ``traincraft`` registers its strategies' names with Lightning (``Trainer(strategy="traincraft_ddp")``).
"""

import traincraft.strategies  # noqa: F401  (registers the strategy names)

__version__ = "0.1.0"

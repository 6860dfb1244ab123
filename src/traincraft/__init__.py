"""traincraft: PyTorch Lightning parts for optimizing the training of deep models.

Subpackages: :mod:`traincraft.models` (plain ``nn.Module`` networks), :mod:`traincraft.modules`
(LightningModules), :mod:`traincraft.data` (DataModules with on-device augmentation), :mod:`traincraft.augment`,
:mod:`traincraft.callbacks`, :mod:`traincraft.strategies` and :mod:`traincraft.optim`; crash-safe, verified
checkpoint files: :class:`traincraft.checkpoint.SafeCheckpointIO` (``Trainer(plugins=[SafeCheckpointIO()])``).
Importing ``traincraft`` registers its strategies' names with Lightning (``Trainer(strategy="traincraft_ddp")``).
"""

import traincraft.strategies  # noqa: F401  (registers the strategy names)
from traincraft.checkpoint import CheckpointError, SafeCheckpointIO, verify_checkpoint

__all__ = ["CheckpointError", "SafeCheckpointIO", "verify_checkpoint"]

__version__ = "0.3.0"

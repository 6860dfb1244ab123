"""traincraft: PyTorch Lightning parts for optimizing the training of deep models.

Subpackages: :mod:`traincraft.models` (plain ``nn.Module`` networks), :mod:`traincraft.modules`
(LightningModules), :mod:`traincraft.data` (DataModules with on-device augmentation), :mod:`traincraft.augment`,
:mod:`traincraft.callbacks` and :mod:`traincraft.strategies`.
"""

__version__ = "0.1.0"

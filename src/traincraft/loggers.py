"""The one module that knows logger specifics: W&B offline-by-default, and the run directories."""

from __future__ import annotations

import netrc
import os
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger

_WANDB_HOST = "api.wandb.ai"


def wandb_credentials_configured() -> bool:
    """True when W&B can authenticate: ``WANDB_API_KEY`` is set or ``~/.netrc`` has an entry for W&B."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        hosts = netrc.netrc(str(path)).hosts
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False
    return any(host == _WANDB_HOST or host.endswith("." + _WANDB_HOST) for host in hosts)


def wandb_should_be_offline(offline: Optional[bool] = None) -> bool:
    """Offline unless asked otherwise and credentials exist; ``WANDB_MODE=offline``/``disabled`` always wins."""
    if os.environ.get("WANDB_MODE", "").lower() in ("offline", "dryrun", "disabled"):
        return True
    if offline is not None:
        return offline
    return not wandb_credentials_configured()


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes online only when W&B credentials are configured.

    Without credentials (no ``WANDB_API_KEY``, no ``~/.netrc`` entry) the run is recorded offline under
    ``save_dir/wandb/offline-run-*``; upload it later with ``wandb sync <that directory>``.
    ``WANDB_MODE=offline`` forces offline mode everywhere.

    Args:
        name: display name of the run.
        save_dir: directory that receives the ``wandb/`` run directories.
        project: W&B project.
        offline: ``None`` decides from the credentials; ``True``/``False`` forces the mode.
        log_model: upload checkpoints as artifacts: ``False``, ``True`` (at the end) or ``"all"`` (each save).
        **kwargs: passed to ``lightning.pytorch.loggers.WandbLogger`` (``entity``, ``tags``, ``group``, ...).
    """

    def __init__(
        self,
        name: Optional[str] = None,
        save_dir: str = "runs",
        project: str = "traincraft",
        offline: Optional[bool] = None,
        log_model: Union[Literal["all"], bool] = False,
        **kwargs: Any,
    ) -> None:
        Path(save_dir).mkdir(parents=True, exist_ok=True)
        self.offline_mode = wandb_should_be_offline(offline)
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=self.offline_mode,
            log_model=log_model,
            **kwargs,
        )

    @property
    def run_dir(self) -> str:
        """The local directory of this run (``.../wandb/offline-run-*`` or ``.../wandb/run-*``)."""
        return str(Path(self.experiment.dir).parent)


# ----------------------------------------------------------------------------------------------- rich media
# Callbacks call these with whatever loggers the trainer has; only W&B and TensorBoard receive images and
# histograms (other loggers take scalars only), and nothing here depends on which ones are present.


def _image_hwc_uint8(image: Any) -> Any:
    """An image as an (H, W, C) uint8 numpy array, from (C, H, W)/(H, W, C) tensors or arrays in [0, 1] or uint8."""
    import numpy as np
    import torch

    array = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim == 2:
        array = array[..., None]
    if array.ndim != 3:
        raise ValueError(f"an image must have 2 or 3 dimensions; got shape {array.shape}")
    if array.shape[0] in (1, 3, 4) and array.shape[-1] not in (1, 3, 4):
        array = array.transpose(1, 2, 0)
    if array.dtype != np.uint8:
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    return array


def log_image(trainer: Any, key: str, image: Any, step: Optional[int] = None, caption: Optional[str] = None) -> list[str]:
    """Send one image (tensor/array ``(C, H, W)`` or ``(H, W, C)``, uint8 or float in [0, 1]) to every W&B and
    TensorBoard logger of ``trainer``. Returns the names of the loggers that received it (empty: none can show
    images; the caller may then save a PNG)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    step = trainer.global_step if step is None else step
    hwc = _image_hwc_uint8(image)
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            extra = {"caption": [caption]} if caption else {}
            logger.log_image(key=key, images=[hwc], step=step, **extra)
            sent.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_image(key, hwc, global_step=step, dataformats="HWC")
            sent.append("tensorboard")
    return sent


def log_histogram(trainer: Any, key: str, values: Any, step: Optional[int] = None, bins: int = 64) -> list[str]:
    """Send a histogram of ``values`` (a host tensor or array; copy device tensors on logging steps only) to every
    W&B and TensorBoard logger of ``trainer``. Returns the names of the loggers that received it."""
    import numpy as np
    import torch
    from lightning.pytorch.loggers import TensorBoardLogger

    step = trainer.global_step if step is None else step
    array = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    array = array.reshape(-1)
    sent = []
    for logger in trainer.loggers:
        if isinstance(logger, _LightningWandbLogger):
            import wandb

            counts, edges = np.histogram(array, bins=bins)
            logger.experiment.log({key: wandb.Histogram(np_histogram=(counts, edges)), "trainer/global_step": step})
            sent.append("wandb")
        elif isinstance(logger, TensorBoardLogger):
            logger.experiment.add_histogram(key, array, global_step=step, bins=bins)
            sent.append("tensorboard")
    return sent

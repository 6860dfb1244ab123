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

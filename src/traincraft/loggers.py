"""The one module that knows logger specifics: W&B offline-by-default, and the run directories."""

from __future__ import annotations

import netrc
import os
from math import inf
from pathlib import Path
from typing import Any, Literal, Optional, Union

from lightning.pytorch.loggers import WandbLogger as _LightningWandbLogger
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn

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


#: Seconds ``wandb.init`` may try to reach the W&B server before the run falls back to offline mode.
DEFAULT_INIT_TIMEOUT = 15.0


def _with_init_timeout(settings: Any, timeout: float) -> Any:
    """``settings`` (None, a dict or ``wandb.Settings``) as a dict with ``init_timeout``, unless it sets its own.

    A dict, because ``wandb.init`` writes its arguments into a ``Settings`` object it is given: a retry offline
    would inherit the failed online attempt's run."""
    import wandb

    if isinstance(settings, wandb.Settings):
        settings = {field: getattr(settings, field) for field in settings.model_fields_set}
    return {"init_timeout": timeout, **(settings or {})}


class WandbLogger(_LightningWandbLogger):
    """Lightning's ``WandbLogger`` that goes online only when it can, and never stops a fit.

    Without credentials (no ``WANDB_API_KEY``, no ``~/.netrc`` entry) the run is recorded offline under
    ``save_dir/wandb/offline-run-*``; upload it later with ``wandb sync <that directory>``.
    ``WANDB_MODE=offline`` forces offline mode everywhere.

    With credentials but no reachable server (no network, a firewall, a wrong ``WANDB_BASE_URL``), ``wandb.init``
    gives up after ``init_timeout`` seconds (W&B's own default is 90) and the run falls back to offline mode with
    one warning that names the directory to sync; training goes on. The same happens when the server refuses the
    credentials. Checkpoints are not uploaded offline: ``log_model`` is then dropped with that warning.

    Args:
        name: display name of the run.
        save_dir: directory that receives the ``wandb/`` run directories (created when the run starts).
        project: W&B project.
        offline: ``None`` decides from the credentials; ``True``/``False`` forces the mode.
        log_model: upload checkpoints as artifacts: ``False``, ``True`` (at the end) or ``"all"`` (each save).
        init_timeout: seconds to wait for the W&B server when the run starts before going offline (> 0).
        **kwargs: passed to ``lightning.pytorch.loggers.WandbLogger`` (``entity``, ``tags``, ``group``, ``settings``,
            ...). A ``settings`` that sets its own ``init_timeout`` keeps it.
    """

    def __init__(
        self,
        name: Optional[str] = None,
        save_dir: str = "runs",
        project: str = "traincraft",
        offline: Optional[bool] = None,
        log_model: Union[Literal["all"], bool] = False,
        init_timeout: float = DEFAULT_INIT_TIMEOUT,
        **kwargs: Any,
    ) -> None:
        if isinstance(init_timeout, bool) or not isinstance(init_timeout, (int, float)) or not 0 < init_timeout < inf:
            raise ValueError(
                f"init_timeout must be a positive number of seconds; got {init_timeout!r}. It bounds how long W&B "
                f"tries to reach its server before the run goes offline (default {DEFAULT_INIT_TIMEOUT:g})."
            )
        if offline and log_model:
            raise ValueError(
                f"log_model={log_model!r} uploads checkpoints, which an offline run (offline=True) cannot do. Set "
                "log_model: false, or leave offline unset so that the run goes online when credentials exist."
            )
        self.offline_mode = wandb_should_be_offline(offline)
        self.init_timeout = float(init_timeout)
        if self.offline_mode and log_model:  # no credentials or WANDB_MODE=offline: a missing login must not stop a fit
            rank_zero_warn(
                f"W&B runs offline here (no credentials, or WANDB_MODE={os.environ.get('WANDB_MODE', '')!r}), so "
                f"log_model={log_model!r} is ignored: checkpoints stay in their directory and are not uploaded."
            )
            log_model = False
        super().__init__(
            name=name,
            save_dir=save_dir,
            project=project,
            offline=self.offline_mode,
            log_model=log_model,
            **kwargs,
        )
        self._wandb_init["settings"] = _with_init_timeout(self._wandb_init.get("settings"), self.init_timeout)

    @property
    def experiment(self) -> Any:
        """The W&B run, started on first use; an online start that fails goes offline instead (one warning)."""
        if self._experiment is None and rank_zero_only.rank == 0:
            Path(self.save_dir or ".").mkdir(parents=True, exist_ok=True)  # else wandb silently picks a temp dir
            if not self._offline:
                import wandb

                try:
                    return super().experiment
                except (wandb.errors.Error, TimeoutError, ConnectionError) as error:
                    self._go_offline(error)
        return super().experiment

    def _go_offline(self, error: BaseException) -> None:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        dropped = (
            f" log_model={self._log_model!r} is dropped: checkpoints stay local." if self._log_model else ""
        )
        rank_zero_warn(
            f"W&B could not start an online run within init_timeout={self.init_timeout:g} s ({reason}). "
            f"Training goes on with the run recorded offline in {Path(self.save_dir or '.') / 'wandb'}/offline-run-*; "
            f"upload it later with `wandb sync <that directory>`.{dropped} Set WANDB_MODE=offline to skip the "
            "attempt, or raise init_timeout on the logger if the server is only slow."
        )
        self._offline = self.offline_mode = True
        self._log_model = False
        self._wandb_init["mode"] = "offline"

    @property
    def run_dir(self) -> str:
        """The local directory of this run (``.../wandb/offline-run-*`` or ``.../wandb/run-*``)."""
        return str(Path(self.experiment.dir).parent)


# ----------------------------------------------------------------------------------------------- rich media
# Callbacks call these with whatever loggers the trainer has; only W&B and TensorBoard receive images and
# histograms (other loggers take scalars only), and nothing here depends on which ones are present.


def shows_media(trainer: Any) -> bool:
    """Whether some logger of ``trainer`` shows images and histograms (W&B or TensorBoard): callbacks ask this
    before they spend a device copy on samples that :func:`log_histogram` and :func:`log_image` would drop.

    Example:
        >>> from types import SimpleNamespace
        >>> shows_media(SimpleNamespace(loggers=[]))
        False
    """
    from lightning.pytorch.loggers import TensorBoardLogger

    return any(isinstance(logger, (_LightningWandbLogger, TensorBoardLogger)) for logger in trainer.loggers)


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


# ------------------------------------------------------------------------------------------- health report
# HealthReport reads the run back from what a logger wrote: a CSV file, TensorBoard events or the W&B run file.

#: Kinds of metric source a health report can read, in order of preference (the CSV file is complete and cheap).
REPORT_SOURCES = ("csv", "tensorboard", "wandb")


def report_source_kind(logger: Any) -> Optional[str]:
    """Which kind of metric source (``"csv"``, ``"tensorboard"``, ``"wandb"``) ``logger`` writes; ``None``: none
    that a health report can read. Starts nothing (no W&B run)."""
    from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

    if isinstance(logger, CSVLogger):
        return "csv"
    if isinstance(logger, TensorBoardLogger):
        return "tensorboard"
    if isinstance(logger, _LightningWandbLogger):
        return "wandb"
    return None


def report_source(logger: Any) -> Path:
    """The metrics that ``logger`` wrote, flushed to disk: the CSV file, the TensorBoard event folder or the W&B
    run directory (``.../wandb/offline-run-*``). Call on rank zero, when the report is built."""
    from lightning.pytorch.loggers.csv_logs import ExperimentWriter

    kind = report_source_kind(logger)
    if kind == "csv":
        logger.save()  # the CSV logger buffers rows until save()
        return Path(logger.log_dir) / ExperimentWriter.NAME_METRICS_FILE
    if kind == "tensorboard":
        logger.experiment.flush()
        return Path(logger.log_dir)
    if kind == "wandb":
        # W&B's service process appends to the run file as records arrive; there is no public flush.
        return Path(logger.experiment.dir).parent
    raise ValueError(f"{type(logger).__name__} writes no metrics a health report can read (CSV, TensorBoard or W&B)")


def log_report(trainer: Any, html_path: Path, name: str = "health-report", max_inline_bytes: int = 8_000_000) -> list[str]:
    """Send a written health report to every W&B logger of ``trainer``: its folder (``report.html``, the PNG
    panels, ``diagnoses.json``) as an artifact of type ``health-report``, and the page itself as ``wandb.Html``
    under the key ``health/report`` when it is under ``max_inline_bytes``. Returns the loggers that received it."""
    sent = []
    for logger in trainer.loggers:
        if not isinstance(logger, _LightningWandbLogger):
            continue
        import wandb

        run = logger.experiment
        artifact = wandb.Artifact(name=f"{name}-{run.id}", type="health-report",
                                  description="traincraft health report: report.html, panels/*.png, diagnoses.json")
        artifact.add_dir(str(Path(html_path).parent))
        run.log_artifact(artifact)
        if Path(html_path).stat().st_size <= max_inline_bytes:
            run.log({"health/report": wandb.Html(Path(html_path).read_text(), inject=False),
                     "trainer/global_step": trainer.global_step})
        sent.append("wandb")
    return sent

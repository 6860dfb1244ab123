"""Sharded parameters (DTensor, as under Lightning's FSDP and ModelParallel strategies): detect them, or refuse.

A norm, an update ratio or a statistic computed from a DTensor's local shard describes one rank's slice, not the
parameter: callbacks that have not been made shard-aware refuse such modules at ``setup`` with this error instead
of logging a per-shard number as if it were global.
"""

from __future__ import annotations

from torch import nn


def _dtensor_type() -> type | None:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch built without distributed
        return None
    return DTensor


def is_sharded(tensor: object) -> bool:
    """True for a DTensor (a parameter or gradient split over ranks)."""
    dtensor = _dtensor_type()
    return dtensor is not None and isinstance(tensor, dtensor)


def sharded_parameter_names(module: nn.Module) -> list[str]:
    """Names of the parameters of ``module`` that are DTensors."""
    return [name for name, param in module.named_parameters() if is_sharded(param)]


def refuse_sharded(module: nn.Module, owner: str, what: str) -> None:
    """Raise a clear error when ``module`` has sharded parameters that ``owner`` cannot treat globally.

    Args:
        module: the LightningModule (or model) the callback is set up on.
        owner: the callback's class name, for the message.
        what: what it would get wrong, e.g. "the update/weight ratio".
    """
    names = sharded_parameter_names(module)
    if names:
        shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
        raise ValueError(
            f"{owner} cannot compute {what} on sharded parameters (DTensor: {shown}): a per-shard value would be "
            "logged as if it were global. Remove the callback for this run, or train with an unsharded strategy "
            "(e.g. 'ddp'); GradientClipping supports sharded parameters."
        )

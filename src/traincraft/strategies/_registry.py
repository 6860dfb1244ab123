"""String names for ``Trainer(strategy="...")``: registered into Lightning's ``StrategyRegistry``."""

from __future__ import annotations

from typing import Any

# name -> (description, constructor arguments)
STRATEGY_NAMES: dict[str, tuple[str, dict[str, Any]]] = {
    "traincraft_ddp": ("DDP with communication accounting, straggler and noise-scale logging", {}),
    "traincraft_ddp_fp16": ("traincraft_ddp with gradients all-reduced in fp16", {"compression": "fp16"}),
    "traincraft_ddp_bf16": ("traincraft_ddp with gradients all-reduced in bf16", {"compression": "bf16"}),
    "traincraft_ddp_powersgd": (
        "traincraft_ddp with rank-1 PowerSGD gradient compression",
        {"compression": "powersgd", "powersgd_rank": 1},
    ),
    "traincraft_ddp_powersgd_rank4": (
        "traincraft_ddp with rank-4 PowerSGD gradient compression",
        {"compression": "powersgd", "powersgd_rank": 4},
    ),
    "traincraft_ddp_spawn": ("traincraft_ddp started with multiprocessing spawn", {"start_method": "spawn"}),
}


def register_strategies(registry: Any) -> list[str]:
    """Add traincraft's data-parallel strategies to a Lightning strategy registry; returns the names added.

    Calling it again is harmless: names already registered to ``DataParallelStrategy`` are skipped, while a name
    taken by another class is an error (something else claimed it).

    Example:
        >>> from lightning.pytorch.strategies import StrategyRegistry
        >>> _ = register_strategies(StrategyRegistry)
        >>> register_strategies(StrategyRegistry), StrategyRegistry["traincraft_ddp_fp16"]["init_params"]
        ([], {'compression': 'fp16'})
    """
    from traincraft.strategies.data_parallel import DataParallelStrategy

    added = []
    for name, (description, init_params) in STRATEGY_NAMES.items():
        if name in registry:
            if registry[name]["strategy"] is DataParallelStrategy:
                continue
            raise ValueError(
                f"strategy name {name!r} is already registered to {registry[name]['strategy'].__name__}; "
                "traincraft cannot register DataParallelStrategy under it. Remove the other registration."
            )
        registry.register(name, DataParallelStrategy, description=description, **init_params)
        added.append(name)
    return added

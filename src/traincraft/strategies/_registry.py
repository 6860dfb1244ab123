"""String names for ``Trainer(strategy="...")``: every traincraft strategy registers here, each under the names
its class lists in ``registered_names`` (``import traincraft.strategies`` does it)."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.strategies import StrategyRegistry

from traincraft.strategies.column_parallel.strategy import ColumnParallelStrategy
from traincraft.strategies.data_parallel import DataParallelStrategy

STRATEGIES = (DataParallelStrategy, ColumnParallelStrategy)


def register_strategies(registry: Any = StrategyRegistry) -> list[str]:
    """Add every traincraft strategy's names to a Lightning strategy registry; returns the names added.

    Calling it again is harmless: names already registered to the same class are skipped, while a name taken by
    another class is an error (something else claimed it).

    Example:
        >>> _ = register_strategies(StrategyRegistry)
        >>> register_strategies(StrategyRegistry), StrategyRegistry["traincraft_ddp_fp16"]["init_params"]
        ([], {'compression': 'fp16'})
        >>> StrategyRegistry["column_parallel"]["strategy"].__name__
        'ColumnParallelStrategy'
    """
    return [name for cls in STRATEGIES for name in cls.register_strategies(registry)]

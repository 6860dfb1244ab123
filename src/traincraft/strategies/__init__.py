"""Strategies for ``Trainer(strategy=...)`` and the communication accounting they share.

Importing this package (``import traincraft`` does) registers the strategies' string names with Lightning, so
``Trainer(strategy="traincraft_ddp_powersgd")`` and ``Trainer(strategy="column_parallel")`` work.
"""

from lightning.pytorch.strategies import StrategyRegistry

from traincraft.strategies._registry import register_strategies as _register_strategies
from traincraft.strategies.column_parallel import (
    ColumnParallelStrategy,
    export_state_dict,
    register_column_parallel,
)
from traincraft.strategies.communication import COLLECTIVES, CommunicationLedger, payload_bytes, wire_bytes
from traincraft.strategies.data_parallel import DataParallelStrategy

_register_strategies(StrategyRegistry)  # every name, from the one table in _registry

__all__ = [
    "COLLECTIVES",
    "ColumnParallelStrategy",
    "CommunicationLedger",
    "DataParallelStrategy",
    "export_state_dict",
    "payload_bytes",
    "register_column_parallel",
    "wire_bytes",
]

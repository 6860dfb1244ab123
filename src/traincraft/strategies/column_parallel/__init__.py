"""Column parallelism (Krizhevsky et al. 2012) and its data x column hybrid (Yadan et al. 2014).

One public module per part: :mod:`.strategy` (``ColumnParallelStrategy``), :mod:`.gather` (the autograd-aware
exchanges between columns), :mod:`.state` (column shards of checkpoints, ``export_state_dict``), :mod:`.mesh`
(the data x column process mesh) and :mod:`.byte_model` (the analytic bytes, against DDP's).
"""

from traincraft.strategies.column_parallel.state import export_state_dict
from traincraft.strategies.column_parallel.strategy import ColumnParallelStrategy, register_column_parallel

__all__ = ["ColumnParallelStrategy", "export_state_dict", "register_column_parallel"]

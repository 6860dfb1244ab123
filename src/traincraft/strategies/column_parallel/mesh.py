"""The 2-D process mesh (data x column) of the column-parallel strategy.

Global rank ``r`` sits at data rank ``r // column_size`` and column ``r % column_size``: the two columns of a replica
are neighbours, so on a multi-GPU node the chatty activation exchanges stay inside the node (Yadan et al. 2014 put
the model-parallel pairs on GPUs sharing a PCIe switch) and only the once-per-step gradient all-reduce crosses it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch.distributed as dist

__all__ = ["ColumnMesh", "build_groups"]


@dataclass(frozen=True)
class ColumnMesh:
    """Coordinates on a ``data_size x column_size`` mesh.

    Example:
        >>> mesh = ColumnMesh(data_size=2)
        >>> mesh.coords(3), mesh.column_ranks(1), mesh.data_ranks(1)
        ((1, 1), [2, 3], [1, 3])
    """

    data_size: int
    column_size: int = 2

    @property
    def world_size(self) -> int:
        return self.data_size * self.column_size

    def coords(self, rank: int) -> tuple[int, int]:
        """``(data rank, column)`` of a global rank."""
        return divmod(rank, self.column_size)

    def column_ranks(self, data_rank: int) -> list[int]:
        """The global ranks holding the columns of one replica, in column order."""
        return [data_rank * self.column_size + c for c in range(self.column_size)]

    def data_ranks(self, column: int) -> list[int]:
        """The global ranks holding the replicas of one column."""
        return [d * self.column_size + column for d in range(self.data_size)]


def build_groups(mesh: ColumnMesh, rank: int, backend: Optional[str] = None) -> tuple[dist.ProcessGroup, dist.ProcessGroup]:
    """Create every column and data group (a collective: all ranks create all groups in the same order) and
    return this rank's ``(column group, data group)``."""
    data_rank, column = mesh.coords(rank)
    column_group = data_group = None
    for d in range(mesh.data_size):
        group = dist.new_group(mesh.column_ranks(d), backend=backend)
        if d == data_rank:
            column_group = group
    for c in range(mesh.column_size):
        group = dist.new_group(mesh.data_ranks(c), backend=backend)
        if c == column:
            data_group = group
    assert column_group is not None and data_group is not None
    return column_group, data_group

"""DDP communication hooks by name, on gloo (CPU) and NCCL (GPU) alike, each recording what it sends.

A hook receives one gradient bucket (a flat buffer of this rank's summed-over-the-local-batch gradients) and
returns a future of the averaged buffer. Every hook here records each collective it launches into the shared
:class:`~traincraft.strategies.communication.CommunicationLedger` (sizes from metadata: no host sync) and hands
the local and the averaged bucket to :class:`GradientSyncState`, which keeps their squared norms on the device for
the gradient noise scale.

Analytic payload per optimizer step, for P gradient elements of which the matrices (weights reshaped to
``shape[0] × rest``) n_i × m_i are compressed by PowerSGD and the remaining U elements are not:

==============  ===========================================================
hook            payload bytes per step
==============  ===========================================================
``none``        4·P (fp32 gradients)
``fp16``        2·P
``bf16``        2·P
``powersgd``    4·(r·Σ(n_i + m_i) + U); a matrix is compressed when r·(n+m) < n·m
==============  ===========================================================

PowerSGD (Vogels, Karimireddy & Jaggi 2019) sends P = M·Q and Q = Mᵀ·P̂ (P̂: P with orthonormal columns) for
each gradient matrix M, warm-starts Q from the previous step, and keeps the compression error on each rank
(error feedback) so that it is sent later rather than lost. Its collectives run synchronously inside the hook (on
NCCL that only orders the streams); the uncompressed hooks return the all-reduce's future and overlap with the
rest of the backward pass.
"""

# no `from __future__ import annotations`: DDP compares the hooks' annotations with the real classes
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Optional

import torch
import torch.distributed as dist

from traincraft.strategies.communication import CommunicationLedger

COMPRESSIONS: tuple[str, ...] = ("none", "fp16", "bf16", "powersgd")
_ELEMENT_BYTES = {"none": 4, "fp16": 2, "bf16": 2}


class GradientSyncState:
    """What the hooks share: the ledger, the group, and per-step device-side squared gradient norms.

    ``local_sq`` and ``global_sq`` collect one scalar tensor per bucket (a list append is atomic, and the futures'
    callbacks may run on the communication thread); :meth:`close_step` sums them once per optimizer step.
    """

    def __init__(
        self,
        ledger: CommunicationLedger,
        world_size: int,
        group: Optional[dist.ProcessGroup] = None,
        track_norms: bool = True,
        on_ready: Optional[Callable[[], None]] = None,
    ) -> None:
        self.ledger = ledger
        self.world_size = world_size
        self.group = group
        self.track_norms = track_norms
        self.on_ready = on_ready
        self.step = 0
        self.local_sq: list[torch.Tensor] = []
        self.global_sq: list[torch.Tensor] = []

    def local(self, buffer: torch.Tensor) -> None:
        if self.track_norms:
            self.local_sq.append(torch.linalg.vector_norm(buffer, dtype=torch.float32).square())
        if self.on_ready is not None:
            self.on_ready()

    def reduced(self, buffer: torch.Tensor) -> None:
        if self.track_norms:
            self.global_sq.append(torch.linalg.vector_norm(buffer, dtype=torch.float32).square())

    def close_step(self) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
        """End of an optimizer step: (|g_local|², |g_global|²) summed over buckets, or None if nothing synced."""
        self.step += 1
        if not self.local_sq or len(self.local_sq) != len(self.global_sq):
            self.local_sq.clear()
            self.global_sq.clear()
            return None
        out = torch.stack(self.local_sq).sum(), torch.stack(self.global_sq).sum()
        self.local_sq.clear()
        self.global_sq.clear()
        return out


def _completed(value: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    future: torch.futures.Future[torch.Tensor] = torch.futures.Future()
    future.set_result(value)
    return future


def allreduce_hook(state: GradientSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
    """Plain fp32 averaging, as DDP's built-in reducer does, plus accounting."""
    buffer = bucket.buffer()
    state.local(buffer)
    state.ledger.record("all_reduce", buffer, state.world_size)
    buffer.div_(state.world_size)
    future = dist.all_reduce(buffer, group=state.group, async_op=True).get_future()

    def done(fut: torch.futures.Future) -> torch.Tensor:
        reduced = fut.value()[0]
        state.reduced(reduced)
        return reduced

    return future.then(done)


def _cast_hook(dtype: torch.dtype) -> Callable[[GradientSyncState, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    def hook(state: GradientSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        buffer = bucket.buffer()
        state.local(buffer)
        # divide after the cast's rounding but before the sum, so the half-precision sum cannot overflow
        compressed = buffer.to(dtype).div_(state.world_size)
        state.ledger.record("all_reduce", compressed, state.world_size)
        future = dist.all_reduce(compressed, group=state.group, async_op=True).get_future()

        def done(fut: torch.futures.Future) -> torch.Tensor:
            buffer.copy_(fut.value()[0])
            state.reduced(buffer)
            return buffer

        return future.then(done)

    hook.__name__ = f"{dtype}_compress_hook".replace("torch.", "")
    return hook


fp16_hook = _cast_hook(torch.float16)
bf16_hook = _cast_hook(torch.bfloat16)


def powersgd_compressible(shape: Sequence[int], rank: int) -> bool:
    """Whether PowerSGD sends a gradient of ``shape`` as rank-``rank`` factors (fewer elements than dense).

    Example:
        >>> powersgd_compressible((64, 24, 5, 5), 1), powersgd_compressible((64,), 1), powersgd_compressible((2, 2), 1)
        (True, False, False)
    """
    if len(shape) < 2:
        return False
    n = shape[0]
    m = math.prod(shape[1:])
    return rank * (n + m) < n * m


def powersgd_payload_elements(shapes: Iterable[Sequence[int]], rank: int) -> int:
    """Elements PowerSGD all-reduces per step for gradients of these shapes (see the module table).

    Example:
        >>> powersgd_payload_elements([(1024, 576), (1024,)], 1)  # 1024 + 576 factor entries + 1024 bias
        2624
    """
    total = 0
    for shape in shapes:
        if powersgd_compressible(shape, rank):
            total += rank * (shape[0] + math.prod(shape[1:]))
        else:
            total += math.prod(shape)
    return total


def compressed_payload_bytes(shapes: Iterable[Sequence[int]], compression: str, rank: int = 1) -> int:
    """Analytic payload bytes per optimizer step for fp32 gradients of ``shapes`` (the module table).

    Example:
        >>> compressed_payload_bytes([(10, 4), (10,)], "none"), compressed_payload_bytes([(10, 4), (10,)], "fp16")
        (200, 100)
    """
    if compression not in COMPRESSIONS:
        raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")
    shapes = list(shapes)
    if compression == "powersgd":
        return 4 * powersgd_payload_elements(shapes, rank)
    return _ELEMENT_BYTES[compression] * sum(math.prod(shape) for shape in shapes)


def orthonormalize_columns(matrix: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Gram-Schmidt on the columns of ``matrix`` in place; ``eps`` keeps all-zero columns finite (they stay 0).

    Example:
        >>> q = orthonormalize_columns(torch.tensor([[3.0, 1.0], [4.0, 1.0]]))
        >>> torch.allclose(q.T @ q, torch.eye(2), atol=1e-6)
        True
    """
    for i in range(matrix.shape[1]):
        column = matrix[:, i : i + 1]
        if i:
            previous = matrix[:, :i]
            column.sub_(previous @ (previous.T @ column))
        column.div_(torch.linalg.vector_norm(column) + eps)
    return matrix


class PowerSGDHook:
    """Rank-``rank`` PowerSGD with error feedback and warm start; plain averaging for ``warmup_steps`` steps.

    The initial Q of each gradient is drawn from a generator seeded by ``seed`` and the order in which the
    parameter was first met: DDP hands buckets to hooks in the same order on every rank, so every rank starts
    from the same Q without communicating it. Q and the error memory are keyed by the parameter itself, so they
    follow it when DDP rebuilds its buckets after the first step.
    """

    def __init__(self, rank: int = 1, warmup_steps: int = 0, seed: int = 0) -> None:
        self.rank = rank
        self.warmup_steps = warmup_steps
        self.seed = seed
        self.__name__ = self.__qualname__ = f"powersgd_rank{rank}_hook"  # DDP reads a hook's names
        self._q: dict[int, torch.Tensor] = {}
        self.error: dict[int, torch.Tensor] = {}  # per parameter (by id): what compression has not sent yet

    def _initial_q(self, m: int, like: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + len(self._q))
        return torch.randn(m, self.rank, generator=generator).to(device=like.device, dtype=like.dtype)

    def __call__(self, state: GradientSyncState, bucket: dist.GradBucket) -> torch.futures.Future[torch.Tensor]:
        if state.step < self.warmup_steps:
            return allreduce_hook(state, bucket)
        buffer = bucket.buffer()
        state.local(buffer)
        n_ranks, group = state.world_size, state.group
        dense, factored = [], []
        for param, grad in zip(bucket.parameters(), bucket.gradients(), strict=True):
            (factored if powersgd_compressible(grad.shape, self.rank) else dense).append((id(param), grad))

        dense_flat = None
        if dense:
            dense_flat = torch.cat([grad.reshape(-1) for _, grad in dense])
            state.ledger.record("all_reduce", dense_flat, n_ranks)
            dense_work = dist.all_reduce(dense_flat, group=group, async_op=True)

        if factored:
            keys, grads, matrices = [], [], []
            for key, grad in factored:
                matrix = grad.reshape(grad.shape[0], -1)
                if key in self.error:
                    matrix = matrix + self.error[key]  # error feedback: resend what was lost last time
                if key not in self._q:
                    self._q[key] = self._initial_q(matrix.shape[1], matrix)
                keys.append(key)
                grads.append(grad)
                matrices.append(matrix)
            ps = torch.cat([matrix @ self._q[key] for key, matrix in zip(keys, matrices, strict=True)])
            state.ledger.record("all_reduce", ps, n_ranks)
            dist.all_reduce(ps, group=group)
            p_hats = [orthonormalize_columns(p) for p in torch.split(ps, [m.shape[0] for m in matrices])]
            qs = torch.cat([matrix.T @ p for matrix, p in zip(matrices, p_hats, strict=True)])
            state.ledger.record("all_reduce", qs, n_ranks)
            dist.all_reduce(qs, group=group)
            qs.div_(n_ranks)
            for key, grad, matrix, p, q in zip(
                keys, grads, matrices, p_hats, torch.split(qs, [m.shape[1] for m in matrices]), strict=True
            ):
                approximation = p @ q.T
                self.error[key] = matrix - approximation
                self._q[key] = q.clone()  # warm start: the next step's power iteration begins here
                grad.copy_(approximation.view_as(grad))

        if dense_flat is not None:
            dense_work.wait()
            dense_flat.div_(n_ranks)
            for (_, grad), value in zip(dense, torch.split(dense_flat, [g.numel() for _, g in dense]), strict=True):
                grad.copy_(value.view_as(grad))
        # bucket.gradients() are views into the buffer, so the buffer now holds the averaged approximation
        state.reduced(buffer)
        return _completed(buffer)


def make_comm_hook(
    compression: str, powersgd_rank: int = 1, powersgd_warmup_steps: int = 0, seed: int = 0
) -> Callable[[GradientSyncState, dist.GradBucket], torch.futures.Future[torch.Tensor]]:
    """The hook for a compression name (one of :data:`COMPRESSIONS`)."""
    if compression == "none":
        return allreduce_hook
    if compression == "fp16":
        return fp16_hook
    if compression == "bf16":
        return bf16_hook
    if compression == "powersgd":
        return PowerSGDHook(powersgd_rank, powersgd_warmup_steps, seed)
    raise ValueError(f"unknown compression {compression!r}; expected one of {COMPRESSIONS}")

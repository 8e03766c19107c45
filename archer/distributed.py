"""The few collectives the trainer needs across data-parallel ranks, behind one small object.

Losses and the update loop ask for mini-batch totals (unit counts, entropy thresholds, finite
verdicts) without caring whether they run on one process or many: :class:`Collectives` does the
all-reduce / all-gather over the default process group when one is initialised with several
ranks, and returns its input otherwise. Every rank must make the same calls in the same order.
:class:`GradientSync` pauses the backward's gradient reduction between the micro-batches of one
optimizer step, the one thing DDP and FSDP2 do differently for the update.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["Collectives", "DDPGradientSync", "FSDP2GradientSync", "GradientSync"]


class Collectives:
    """All-reduce and all-gather over the default process group (identity with one process).

    Args:
        local: This process alone, whatever the process group: for code that runs off the training
            thread (an asynchronous rollout producer), which must not take part in collectives.
    """

    def __init__(self, local: bool = False) -> None:
        self.local = local

    @property
    def world_size(self) -> int:
        if self.local or not (dist.is_available() and dist.is_initialized()):
            return 1
        return dist.get_world_size()

    @staticmethod
    def _comm_device(tensor: Tensor) -> torch.device:
        """NCCL reduces CUDA tensors only; gloo takes any."""
        if dist.get_backend() == "nccl" and tensor.device.type != "cuda":
            return torch.device("cuda", torch.cuda.current_device())
        return tensor.device

    def _reduce(self, tensor: Tensor, op: dist.ReduceOp) -> Tensor:
        tensor = torch.as_tensor(tensor)
        if self.world_size == 1:
            return tensor.clone()
        reduced = tensor.to(self._comm_device(tensor), copy=True)
        dist.all_reduce(reduced, op=op)
        return reduced.to(tensor.device)

    def sum(self, tensor: Tensor) -> Tensor:
        """Sum over ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.SUM)

    def max(self, tensor: Tensor) -> Tensor:
        """Maximum over ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.MAX)

    def min(self, tensor: Tensor) -> Tensor:
        """Minimum over ranks (a new tensor)."""
        return self._reduce(tensor, dist.ReduceOp.MIN)

    def cat(self, values: Tensor) -> Tensor:
        """1-D ``values`` of every rank concatenated in rank order (lengths may differ between ranks)."""
        if self.world_size == 1:
            return values
        device = self._comm_device(values)
        length = torch.tensor([values.numel()], device=device)
        lengths = [torch.zeros_like(length) for _ in range(self.world_size)]
        dist.all_gather(lengths, length)
        padded = torch.zeros(int(max(lengths)), dtype=values.dtype, device=device)
        padded[: values.numel()] = values
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: int(n)] for part, n in zip(parts, lengths)]).to(values.device)


class GradientSync:
    """Whether a backward pass reduces gradients across ranks (the base class: one process, nothing to
    reduce). Micro-batches of one optimizer step accumulate locally and sync on the last one only."""

    @contextlib.contextmanager
    def enabled(self, sync: bool) -> Iterator[None]:
        """Run the backward passes inside with (``sync``) or without the cross-rank gradient reduction."""
        if sync:
            yield
        else:
            with self._paused():
                yield

    def _paused(self) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()


class DDPGradientSync(GradientSync):
    """DDP: ``no_sync`` (Lightning's ``strategy.block_backward_sync()``) pauses the all-reduce."""

    def __init__(self, block_backward_sync: Callable[[], contextlib.AbstractContextManager]) -> None:
        self._block = block_backward_sync

    def _paused(self) -> contextlib.AbstractContextManager:
        return self._block()


class FSDP2GradientSync(GradientSync):
    """FSDP2: unsharded gradients accumulate until the last micro-batch (``set_requires_gradient_sync``)."""

    def __init__(self, model: torch.nn.Module) -> None:
        self.model = model

    @contextlib.contextmanager
    def _paused(self) -> Iterator[None]:
        self.model.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.model.set_requires_gradient_sync(True)

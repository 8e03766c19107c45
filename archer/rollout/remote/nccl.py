"""The ``nccl`` weight transport (GPU only; untested here: no GPU on the project's machines).

vLLM's own NCCL weight transfer, driven by vLLM's ``NCCLTrainerWeightTransferEngine`` with one NCCL
group spanning this process (rank 0) and every server's workers (server ``k`` from rank
:func:`rank_offsets` ``[k]`` on, read from ``/get_world_size``). The group is set up at the first
sync with ``/init_weight_transfer_engine``; each sync runs ``/start_weight_update``, then
``/update_weights`` on every server concurrently with the broadcast from rank 0, then
``/finish_weight_update`` with the version. vLLM's engine calls the servers through a client with
these four methods; :class:`_FanOutClient` fans each out to all servers over HTTP.

A failed transfer tears the group down (it is unusable afterwards) and fails every server; the next
sync builds a new group. Nothing is kept on disk, so a failed server rolls back to its checkpoint.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from archer.rollout.remote.fleet import Server, ServerFleet, each, raise_first
from archer.rollout.server import free_port

__all__ = ["NCCLTransport", "rank_offsets"]


def rank_offsets(world_sizes: Sequence[int]) -> list[int]:
    """NCCL rank of each server's first worker in one group: the trainer is rank 0, then the
    servers' workers in order (a server's workers take ``rank_offset .. rank_offset + size - 1``)."""
    offsets, next_rank = [], 1
    for size in world_sizes:
        offsets.append(next_rank)
        next_rank += size
    return offsets


def _is_loopback(url: str) -> bool:
    host = urllib.parse.urlparse(url).hostname or ""
    if host == "localhost":
        return True
    with contextlib.suppress(ValueError):
        return ipaddress.ip_address(host).is_loopback
    return False


class NCCLTransport:
    """Weights over one NCCL group with every server (see the module docstring).

    Args:
        fleet: The servers (started with ``--weight-transfer-config '{"backend": "nccl"}'``).
        layout: ``(name, dtype, full shape)`` of every tensor a sync sends, read once at ``setup`` on
            every rank (reading a LoRA actor's merged weights, or an FSDP2 actor's, takes collectives,
            which the sender alone must not run at each sync); None: the metadata comes from the sent
            tensors themselves.
        master_address: Address of this machine the servers' workers reach for the rendezvous
            (None: 127.0.0.1 when every server is local, else this host's name).
        master_port: Port of the rendezvous (None: a free one).
    """

    def __init__(self, fleet: ServerFleet, layout: list[tuple[str, torch.dtype, tuple[int, ...]]] | None,
                 master_address: str | None, master_port: int | None) -> None:
        self.fleet = fleet
        self.layout = layout
        self.master_address = master_address
        self.master_port = master_port
        self.version = 0
        """Version being sent (``/finish_weight_update`` labels the servers with it)."""
        self._transfer: Any = None  # vLLM's NCCLTrainerWeightTransferEngine; None: no group
        self._param_meta: Any = None  # vLLM's ParamMeta (imported with the group)
        self._pairs: Iterable[tuple[str, torch.Tensor]] = ()
        self._meta: list[Any] = []

    def send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> tuple[str | None, dict[str, BaseException | None]]:
        """Broadcast the tensors to every server; returns (None: no folder, url → error)."""
        try:
            if self._transfer is None:  # first sync, or the group was torn down by a failed one
                self._transfer = self._open()
            self._send(named_tensors, version)
        except Exception as err:  # every server is then failed and rolled back
            self.close()  # the group is unusable after a failed transfer; rebuilt next sync
            return None, {s.url: err for s in self.fleet.servers}
        return None, {}

    def prune(self) -> None:
        """Nothing is kept between syncs."""

    def close(self) -> None:
        """Tear the group down on both sides (the servers must still answer); idempotent."""
        if self._transfer is None:
            return
        with contextlib.suppress(Exception):
            self._transfer.shutdown()
        self._transfer = None
        each(self.fleet.servers, lambda s: self.fleet.call(s, "POST", "/shutdown_weight_transfer_engine"))

    def _open(self) -> Any:
        try:
            from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource
            from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine
        except ImportError as err:
            raise ImportError("transport 'nccl' needs vLLM (with CUDA) in the training process; use transport: files") from err
        outer = self
        self._param_meta = ParamMeta

        class _CallSource(WeightSource):
            """The tensors of the current ``load_weights`` call, with their metadata."""

            def metadata(self) -> list[Any]:
                return outer._meta

            def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
                return iter(outer._pairs)

        servers = self.fleet.servers
        address = self.master_address or ("127.0.0.1" if all(_is_loopback(s.url) for s in servers) else socket.gethostbyname(socket.gethostname()))
        port = self.master_port or free_port("0.0.0.0")
        world_size = 1 + sum(s.world_size for s in servers)
        info = NCCLTrainerInitInfo(master_address=address, master_port=port, world_size=world_size, rank=0)
        return NCCLTrainerWeightTransferEngine.trainer_init(info, client=_FanOutClient(self), source=_CallSource())

    def _send(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        if self.layout is not None:  # metadata without gathering; vLLM checks iteration against it
            self._meta = [self._param_meta(name, dtype, shape) for name, dtype, shape in self.layout]
            self._pairs = named_tensors
        else:
            self._pairs = list(named_tensors)
            self._meta = [self._param_meta(n, t.dtype, tuple(t.shape)) for n, t in self._pairs]
        self.version = version
        try:
            self._transfer.send_weights()
        finally:
            self._pairs, self._meta = (), []


class _FanOutClient:
    """vLLM's ``VLLMWeightSyncClient`` protocol over HTTP, for all servers at once."""

    def __init__(self, transport: NCCLTransport) -> None:
        self.transport = transport
        servers = transport.fleet.servers
        self.offsets = dict(zip((s.url for s in servers), rank_offsets([s.world_size for s in servers])))

    def _all(self, path: str, body: Callable[[Server], Any]) -> None:
        fleet = self.transport.fleet
        raise_first(each(fleet.servers, lambda s: fleet.call(s, "POST", path, body(s))))

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        self._all("/init_weight_transfer_engine", lambda s: {"init_info": {**init_info, "rank_offset": self.offsets[s.url]}})

    def start_weight_update(self) -> None:
        self._all("/start_weight_update", lambda s: None)

    def update_weights(self, update_info: Any) -> None:
        self._all("/update_weights", lambda s: {"update_info": update_info})

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._all("/finish_weight_update", lambda s: {"weight_version": str(self.transport.version)})

"""Does a server hold the tensors we sent? vLLM's ``/weight_checker`` checksums against ours.

vLLM reports the SHA-256 of each parameter's bytes as it holds it. We compute the same digests of
the sent tensors in the server's dtype, under each layout the parameter may have: the checkpoint
layout, vLLM's fused ``qkv_proj`` (q ‖ k ‖ v) and ``gate_up_proj`` (gate ‖ up) along dim 0, and
vocabulary rows zero-padded to a multiple of 64.

What can be compared: parameters kept in checkpoint layout, or in the fused layouts, on servers
without tensor/pipeline parallelism. On CPU vLLM repacks the linear layers' weights for its kernels
(their checksum is that of an empty tensor), so only embeddings, LM head, norms and biases are
compared there.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping

import torch

from archer.rollout.remote.client import RemoteServerError
from archer.rollout.remote.fleet import Server, ServerFleet

__all__ = ["compare_checksums", "tensor_digest", "verify_server"]

_EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
"""vLLM's ``/weight_checker`` digest of a parameter it no longer holds in checkpoint layout (on CPU
the linear layers' weights are repacked for the GEMM kernels and the parameter left empty)."""
_VOCAB_PADDING = 64
"""vLLM pads the vocabulary rows of embeddings and LM heads to a multiple of this, with zeros."""


def tensor_digest(tensor: torch.Tensor) -> str:
    """SHA-256 of a tensor's bytes, computed as vLLM's ``/weight_checker`` computes it."""
    return hashlib.sha256(tensor.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def _candidate_digests(name: str, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> list[str] | None:
    """Digests that vLLM's parameter ``name`` may have if it holds ``tensors`` (HF names) in
    ``dtype``: the tensor itself, vLLM's fused layouts (``qkv_proj`` = q ‖ k ‖ v,
    ``gate_up_proj`` = gate ‖ up, along dim 0) and vocabulary rows zero-padded to a multiple of 64.
    None when the name maps to nothing we sent (the parameter is then not compared)."""
    fused = {".qkv_proj.": (".q_proj.", ".k_proj.", ".v_proj."), ".gate_up_proj.": (".gate_proj.", ".up_proj.")}
    parts: list[str] | None = [name] if name in tensors else None
    for fused_name, pieces in fused.items():
        if parts is None and fused_name in name:
            names = [name.replace(fused_name, piece) for piece in pieces]
            parts = names if all(n in tensors for n in names) else None
    if parts is None:
        return None
    full = torch.cat([tensors[n].detach().to("cpu", dtype) for n in parts]) if len(parts) > 1 else tensors[parts[0]].detach().to("cpu", dtype)
    digests = [tensor_digest(full)]
    rows = full.shape[0] if full.dim() else 0
    if rows % _VOCAB_PADDING:
        padded = torch.zeros((math.ceil(rows / _VOCAB_PADDING) * _VOCAB_PADDING, *full.shape[1:]), dtype=dtype)
        padded[:rows] = full
        digests.append(tensor_digest(padded))
    return digests


def compare_checksums(checksums: Mapping[str, str], tensors: Mapping[str, torch.Tensor], dtype: torch.dtype) -> tuple[int, list[str]]:
    """Compare a server's ``/weight_checker`` checksums with the tensors we sent.

    Keys look like ``dp0:pp0:pcp0:tp0:model.norm.weight``. Compared: every parameter of an
    unsharded worker (``tp0``/``pp0``, one TP rank) whose name maps to sent tensors and whose
    digest is not that of an empty tensor. Returns (number compared, names that differ)."""
    sharded = any(not key.split(":")[3].startswith("tp0") or not key.split(":")[1].startswith("pp0") for key in checksums)
    checked, mismatches = 0, []
    for key, digest in checksums.items():
        name = key.rsplit(":", 1)[-1]
        if sharded or digest == _EMPTY_SHA256:
            continue
        candidates = _candidate_digests(name, tensors, dtype)
        if candidates is None:
            continue
        checked += 1
        if digest not in candidates:
            mismatches.append(name)
    return checked, mismatches


def verify_server(fleet: ServerFleet, server: Server, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Check that ``server`` holds ``tensors`` (cast to its dtype); sets ``server.verified`` to the
    number of parameters compared and returns its checksums. Raises :class:`RemoteServerError` on a
    mismatch, or when nothing could be compared."""
    checksums = fleet.checksums(server)
    checked, mismatches = compare_checksums(checksums, tensors, server.dtype)
    if mismatches:
        shown = ", ".join(mismatches[:5]) + (" ..." if len(mismatches) > 5 else "")
        raise RemoteServerError(server.url, f"weights differ from those sent in {len(mismatches)} of {checked} compared parameters: {shown}")
    if checked == 0:
        raise RemoteServerError(server.url, "no parameter could be compared with the sent tensors (sharded server or unknown layout)")
    server.verified = checked
    return checksums

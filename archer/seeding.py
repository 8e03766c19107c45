"""Seeds derived by hashing, so that different purposes can never share a sampling stream.

Every random draw of a run (a step's rollouts, a dynamic-sampling refill, a mini-batch shuffle, a
validation batch) gets its seed from ``derive_seed(base, purpose, *indices)``. Seeds built by
adding multiples of constants collide (``step·1_000_003 + draw`` reaches the next step's seed
after a million draws; a validation seed ``base + 7919·batch`` equals a train seed); hashed
tuples do not, except by chance (2⁻³¹ per pair). The rank enters last, by XOR with its own
hashed mask (:func:`rank_seed`): ranks draw different samples, and a test engine can remove the
rank's mask to recover the rank-independent seed of the draw.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

__all__ = ["Seeds", "derive_seed", "rank_seed"]

_MODULUS = 2**31  # torch, vLLM and Python's random all accept seeds below 2**31


def derive_seed(*parts: int | str) -> int:
    """A seed in ``[0, 2**31)`` from ``parts`` (ints and strings): equal parts, equal seed; else unrelated."""
    digest = hashlib.blake2b(repr(parts).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % _MODULUS


def rank_seed(seed: int, rank: int) -> int:
    """``seed`` made specific to ``rank`` (an involution: ``rank_seed(rank_seed(s, r), r) == s``)."""
    return seed ^ derive_seed("rank", rank)


@dataclass(frozen=True)
class Seeds:
    """A run's seeds: ``seeds(purpose, *indices)`` is this rank's seed of one draw, derived from the
    run's ``base`` seed, independent of any global RNG state (a resumed run samples exactly what the
    uninterrupted run would have). ``base`` alone serves draws that must agree on every rank."""

    base: int
    rank: int = 0

    def __call__(self, purpose: str, *indices: int) -> int:
        return rank_seed(derive_seed(self.base, purpose, *indices), self.rank)

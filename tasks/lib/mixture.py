"""Mixing training sources to their weights, counted in tokens (data.sources).

Each source's examples (after its contract, de-duplication and the length policy) come in a seeded order of their
own, so changing one source's weight or adding a source never reorders another. The mixture's size is set by the
source that runs out first: total = min over sources of (its tokens / its share); every source then takes rows in
its order while they fit its share of that total. No row is repeated, and each source's share of the tokens is
off its weight by less than one of its rows.
"""

from __future__ import annotations

import hashlib

import numpy as np


def shares(weights: dict[str, float]) -> dict[str, float]:
    total = sum(weights.values())
    return {name: weight / total for name, weight in weights.items()}


def source_order(count: int, seed: int, name: str) -> np.ndarray:
    """A permutation of a source's examples, from the run's seed and the source's name only."""
    digest = hashlib.sha256(f"{seed}\x1fmixture\x1f{name}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "big")).permutation(count)


def mix_by_tokens(lengths: dict[str, np.ndarray], weights: dict[str, float], seed: int) -> dict[str, np.ndarray]:
    """{source: positions of its examples taken, in its seeded order} for token shares as the weights say."""
    share = shares(weights)
    total = min(lengths[name].sum() / share[name] for name in lengths)
    taken = {}
    for name, source_lengths in lengths.items():
        order = source_order(len(source_lengths), seed, name)
        budget = share[name] * total
        fits = np.cumsum(source_lengths[order]) <= budget + 1e-6 * budget  # the limiting source takes all
        taken[name] = order[: int(np.argmin(fits)) if not fits.all() else len(order)]
    return taken


def interleave(counts: dict[str, int], seed: int) -> list[tuple[str, int]]:
    """(source, i-th taken example) for every taken example, shuffled by seed: the training rows of a mixture."""
    pairs = [(name, i) for name, count in counts.items() for i in range(count)]
    order = np.random.default_rng(seed).permutation(len(pairs))
    return [pairs[i] for i in order]

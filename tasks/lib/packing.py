"""Packing tokenized examples into rows of a token budget, and cutting a step's row into per-process
shares and micro-batches (always between examples, never inside one).

Best-fit decreasing (about 80 lines of numpy and bisect): deterministic for a seed, re-packed each epoch, so
a resumed run can skip ahead to exactly where the interrupted one stopped.
"""

from __future__ import annotations

import random
from bisect import bisect_left, insort
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from tasks.lib.chat import IGNORE_INDEX, TokenizedSet
from tasks.lib.ranks import Ranks


@dataclass
class Pack:
    """Several examples laid end to end in one row; position ids restart at each example so that
    attention stays inside each example (transformers builds the block-diagonal mask from them)."""

    input_ids: list[int]
    labels: list[int]
    position_ids: list[int]


def plan_packs(lengths: np.ndarray, token_budget: int, seed: int) -> list[list[int]]:
    """Best-fit decreasing: examples (shuffled by seed, then stably sorted longest first) go into
    the open pack with the least room that still fits them. A sorted list of the distinct free
    capacities (at most token_budget entries) makes each placement a bisect: O(n log budget).
    The packs come back shuffled by the same seed."""
    lengths = np.asarray(lengths)
    if len(lengths) and int(lengths.max()) > token_budget:
        raise ValueError(f"an example of {int(lengths.max())} tokens exceeds the pack budget {token_budget}")
    rng = np.random.default_rng(seed)
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    packs: list[list[int]] = []
    capacities: list[int] = []  # sorted distinct free capacities of open packs
    by_capacity: dict[int, list[int]] = {}
    for index, n in zip(order.tolist(), lengths[order].tolist()):
        k = bisect_left(capacities, n)
        if k < len(capacities):
            free = capacities[k]
            pack = by_capacity[free].pop()
            if not by_capacity[free]:
                del by_capacity[free]
                capacities.pop(k)
        else:
            pack, free = len(packs), token_budget
            packs.append([])
        packs[pack].append(index)
        left = free - n
        if left > 0:
            if left not in by_capacity:
                by_capacity[left] = []
                insort(capacities, left)
            by_capacity[left].append(pack)
    random.Random(seed).shuffle(packs)
    return packs


def packing_efficiency(lengths: np.ndarray, token_budget: int, seed: int) -> dict:
    packs = plan_packs(lengths, token_budget, seed)
    real = int(np.sum(lengths))
    return {"packs": len(packs), "token_budget": token_budget, "real_tokens": real,
            "efficiency": real / max(1, len(packs) * token_budget)}


def _as_set(examples) -> TokenizedSet:
    return examples if isinstance(examples, TokenizedSet) else TokenizedSet.from_examples(examples)


def build_pack(examples: TokenizedSet, members: list[int]) -> Pack:
    ids, labels, positions = [], [], []
    for index in members:
        lo, hi = int(examples.offsets[index]), int(examples.offsets[index + 1])
        chunk = examples.ids[lo:hi]
        ids += chunk.tolist()
        example_labels = np.where(examples.trained[lo:hi], chunk, IGNORE_INDEX)
        example_labels[:1] = IGNORE_INDEX  # the first token is never predicted from the previous example
        labels += example_labels.tolist()
        positions += range(hi - lo)
    return Pack(ids, labels, positions)


def pack_examples(examples, token_budget: int, seed: int) -> list[Pack]:
    examples = _as_set(examples)
    return [build_pack(examples, members) for members in plan_packs(examples.lengths, token_budget, seed)]


def pack_stream(examples, token_budget: int, seed: int) -> Iterator[Pack]:
    """Endless packs, epoch after epoch, each epoch packed and shuffled by (seed + epoch):
    deterministic, so a resumed run can skip ahead to exactly where the interrupted one stopped."""
    examples = _as_set(examples)
    if len(examples) == 0:
        raise ValueError("no training examples to pack")
    epoch = 0
    while True:
        for members in plan_packs(examples.lengths, token_budget, seed + epoch):
            yield build_pack(examples, members)
        epoch += 1


def count_targets(labels) -> int:
    """Tokens the loss is taken on: labelled positions after the first (each predicts from the one before)."""
    return sum(1 for label in list(labels)[1:] if label != IGNORE_INDEX)


def cut(pack: Pack, lo: int, hi: int) -> Pack:
    return Pack(pack.input_ids[lo:hi], pack.labels[lo:hi], pack.position_ids[lo:hi])


def example_starts(pack: Pack) -> list[int]:
    """Where each example of the pack begins (its position ids restart at 0)."""
    return [i for i, position in enumerate(pack.position_ids) if position == 0]


def rank_share(pack: Pack, rank: int, world: int) -> Pack:
    """This process's contiguous share of a step's pack: the examples cut into `world` runs of about equal
    token counts. Every process computes the same cuts (packing is deterministic), so shares are disjoint
    and cover the pack; with fewer examples than processes some shares are empty."""
    if world == 1:
        return pack
    n = len(pack.input_ids)
    bounds = example_starts(pack) + [n]

    def boundary(k: int) -> int:  # the example boundary nearest to k/world of the way through
        return 0 if k == 0 else n if k == world else min(bounds, key=lambda b: abs(b - k * n / world))

    return cut(pack, boundary(rank), boundary(rank + 1))


def split_pack(pack: Pack, max_tokens: int) -> list[Pack]:
    """The pack cut between examples into consecutive micro-batches of at most max_tokens tokens (an
    example longer than that is a micro-batch of its own). The loss is unchanged: the first token of an
    example is never a target, so no target loses the token it is predicted from. 0: no cut."""
    n = len(pack.input_ids)
    if n == 0:
        return []
    if max_tokens <= 0 or n <= max_tokens:
        return [pack]
    starts = example_starts(pack)
    ends = starts[1:] + [n]
    pieces, lo = [], 0
    for start, end in zip(starts[1:], ends[1:]):
        if end - lo > max_tokens:  # the example at `start` does not fit: the piece ends before it
            pieces.append(cut(pack, lo, start))
            lo = start
    pieces.append(cut(pack, lo, n))
    return pieces


def micro_batches(pack: Pack, ranks: Ranks, max_tokens: int) -> list[Pack]:
    """This process's micro-batches of one step."""
    return split_pack(rank_share(pack, ranks.rank, ranks.world), max_tokens)

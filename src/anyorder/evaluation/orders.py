"""Seeded execution orders: every random order this project uses can be regenerated from a seed.

Each (seed, epoch, stream) triple gets its own generator, so a training run resumed at an epoch
boundary draws exactly the orders and batches it would have drawn without the interruption.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

# Independent random streams within one epoch. STREAM_GLOBAL seeds torch's global generator at
# the start of each epoch, for what timm draws from it (stochastic depth, dropout).
# STREAM_NOISE: nullspace noise synthesis at the start of an epoch (batches, start, orders).
STREAM_BATCHES, STREAM_ORDERS, STREAM_AUGMENT, STREAM_VALIDATION, STREAM_GLOBAL = 0, 1, 2, 3, 4
STREAM_NOISE = 5
STREAM_PRUNING = 6  # the subsets (and their orders) of a pruning curve, one generator per k
STREAM_RANK = 1000  # + rank: a process's own training orders (order_scope: rank)


def generator_for(seed: int, epoch: int = 0, stream: int = 0) -> torch.Generator:
    """A torch CPU generator seeded from (seed, epoch, stream) through numpy's SeedSequence."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch), int(stream)])
    return torch.Generator().manual_seed(int(state.generate_state(1, dtype=np.uint64)[0] >> 1))


def layerdrop_rates(depth: int, rate: float, schedule: str = "uniform") -> list[float]:
    """LayerDrop's skip probability per execution slot: `rate` everywhere ("uniform", as Fan et
    al.), or growing with the slot, rate * (s + 1) / depth ("linear", as stochastic depth). The
    rate follows the slot a block runs at, never the block's index."""
    if schedule == "uniform":
        return [float(rate)] * depth
    if schedule == "linear":
        return [float(rate) * (slot + 1) / depth for slot in range(depth)]
    raise ValueError(f"unknown LayerDrop schedule {schedule!r} (uniform, linear)")


class OrderSampler:
    """Draws execution orders for training: sequential, one permutation per batch, or per sample;
    with `drop_rates` (LayerDrop, shared orders only), the block at slot s is then skipped with
    probability drop_rates[s] (at least one block always runs)."""

    def __init__(self, depth: int, shuffle: bool, per_sample: bool = False,
                 drop_rates: Optional[list[float]] = None):
        if drop_rates is not None and (per_sample or len(drop_rates) != depth):
            raise ValueError("LayerDrop needs one rate per slot and orders shared by the batch")
        self.depth = depth
        self.shuffle = shuffle
        self.per_sample = per_sample
        self.drop_rates = torch.tensor(drop_rates) if drop_rates and max(drop_rates) > 0 else None

    def sample(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        """A (k,) order shared by the batch, or (batch_size, depth) orders, one per sample."""
        if not self.shuffle:
            order = torch.arange(self.depth)
        elif self.per_sample:
            return torch.argsort(torch.rand(batch_size, self.depth, generator=generator), dim=1)
        else:
            order = torch.randperm(self.depth, generator=generator)
        if self.drop_rates is None:
            return order
        draws = torch.rand(self.depth, generator=generator)
        keep = draws >= self.drop_rates
        if not keep.any():  # never an empty model: keep the slot that came closest to staying
            keep[torch.argmax(draws - self.drop_rates)] = True
        return order[keep]


def epoch_orders(seed: int, epoch: int, num_train: int, batch_size: int, depth: int,
                 shuffle: bool, per_sample: bool, drop_rates: Optional[list[float]] = None,
                 rank: int = 0) -> list[torch.Tensor]:
    """The execution order of every training step of one epoch, as `train_model` draws them:
    a (depth,) order per step (shorter with LayerDrop's `drop_rates`), or (batch, depth) orders
    per step with `per_sample`.

    This is the one place orders are drawn, so the orders of any run can be regenerated from
    its seed and settings (recorded in `train_orders.json` beside every model). `rank`: the
    process's own orders under `order_scope: rank` (rank 0's are the shared ones).
    """
    sampler = OrderSampler(depth, shuffle, per_sample, drop_rates)
    generator = generator_for(seed, epoch, STREAM_ORDERS if rank == 0 else STREAM_RANK + rank)
    sizes = [min(batch_size, num_train - start) for start in range(0, num_train, batch_size)]
    return [sampler.sample(size, generator) for size in sizes]


def random_orders(depth: int, count: int, seed: int, length: Optional[int] = None,
                  distinct: bool = True) -> list[list[int]]:
    """`count` random orders of `length` (default: all) of `depth` blocks, reproducible from `seed`.

    With `distinct`, no order repeats (as long as enough exist; otherwise all of them are returned).
    """
    length = depth if length is None else length
    if not 1 <= length <= depth:
        raise ValueError(f"order length must be in [1, {depth}], got {length}")
    generator = generator_for(seed, 0, STREAM_VALIDATION)
    total = 1
    for i in range(length):
        total *= depth - i
    count = min(count, total) if distinct else count
    orders: list[list[int]] = []
    seen: set[tuple[int, ...]] = set()
    while len(orders) < count:
        order = torch.randperm(depth, generator=generator)[:length].tolist()
        if distinct and tuple(order) in seen:
            continue
        seen.add(tuple(order))
        orders.append(order)
    return orders

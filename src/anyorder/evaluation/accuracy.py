"""Accuracy in sequential order and over many seeded random orders. `correct` is the one loop that
runs images through a model and marks each right or wrong; every accuracy here comes from it."""
from __future__ import annotations

import math
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch

from anyorder.model.vit import AnyOrderViT
from anyorder.evaluation.orders import random_orders
from anyorder.data.inputs import to_model_input

Order = Optional[Sequence[int]]          # None: sequential; a shorter order is a pruned model
Groups = list[tuple[np.ndarray, Order]]  # (image indices, their block order)


def batches(groups: Groups, batch_size: int) -> Iterator[tuple[np.ndarray, Order]]:
    """(image indices, order) per batch, batches never mixing orders."""
    for indices, order in groups:
        for start in range(0, len(indices), batch_size):
            yield indices[start:start + batch_size], order


def _groups(entry: Union[Order, Groups], num_images: int) -> Groups:
    if isinstance(entry, list) and entry and isinstance(entry[0], tuple):
        return entry
    return [(np.arange(num_images), entry)]


@torch.no_grad()
def correct(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
            orders: Sequence[Union[Order, Groups]], batch_size: int = 256,
            device: torch.device | str = "cpu") -> np.ndarray:
    """(len(orders), N) bool: whether `model` gets each image (uint8 NHWC) right, per entry of
    `orders`: one execution order for every image, or groups [(image indices, their order)].

    Batches never mix groups. Work is shared between entries: a batch of images goes through
    the stem once, and the orders it runs in are walked in sorted order, keeping the tokens of
    the current prefix, so orders that begin with the same blocks share those blocks' outputs
    (100 pruned subsets cost far fewer block calls than 100 full passes). Each block sees
    exactly the tokens a separate pass would give it, so the results are those of evaluating
    every order on its own.
    """
    device = torch.device(device)
    model.to(device).eval()
    work: dict[bytes, tuple[np.ndarray, list[tuple[list[int], int]]]] = {}
    for row, entry in enumerate(orders):
        groups = [(indices, model.sequential_order() if order is None
                   else model.check_order(order, 1).tolist())
                  for indices, order in _groups(entry, len(labels))]
        for indices, order in batches(groups, batch_size):
            work.setdefault(indices.tobytes(), (indices, []))[1].append((order, row))
    hits = np.zeros((len(orders), len(labels)), dtype=bool)
    for indices, runs in work.values():
        targets = torch.as_tensor(labels[indices], device=device)
        stack = [model.forward_stem(to_model_input(images[indices], model.spec, device))]
        prefix: list[int] = []                       # stack[i]: tokens after prefix[:i]
        for order, row in sorted(runs, key=lambda run: run[0]):
            shared = 0
            while shared < min(len(prefix), len(order)) and prefix[shared] == order[shared]:
                shared += 1
            del stack[shared + 1:], prefix[shared:]
            for slot in range(shared, len(order)):
                stack.append(model.run_block(stack[-1], order[slot], slot))
                prefix.append(order[slot])
            predictions = model.forward_head(stack[-1]).argmax(dim=1)
            hits[row, indices] = (predictions == targets).cpu().numpy()
    return hits


def accuracy_for_orders(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                        orders: Sequence[Union[Order, Groups]], batch_size: int = 256,
                        device: torch.device | str = "cpu") -> list[float]:
    """Top-1 accuracy of `model` on (images uint8 NHWC, labels) per entry of `orders` (see
    `correct`)."""
    hits = correct(model, images, labels, orders, batch_size, device)
    return [int(row.sum()) / len(labels) for row in hits]


def random_order_accuracy(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                          num_orders: int, seed: int, batch_size: int = 256,
                          device: torch.device | str = "cpu") -> dict[str, float]:
    """Accuracy over `num_orders` distinct seeded random orders: {mean, std, min, max, count}."""
    orders = random_orders(model.depth, num_orders, seed)
    return summarize(accuracy_for_orders(model, images, labels, orders, batch_size, device))


def summarize(values: Sequence[float]) -> dict[str, float]:
    array = np.asarray(values, dtype=np.float64)
    return {"mean": float(array.mean()), "std": float(array.std(ddof=1)) if len(array) > 1 else 0.0,
            "min": float(array.min()), "max": float(array.max()), "count": int(len(array))}


def evaluate_orders(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray, num_orders: int,
                    seed: int, batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Sequential accuracy, and accuracy over `num_orders` distinct seeded random orders.

    Returns {"sequential": acc, "arbitrary": {mean,std,min,max,count}, "orders": [...],
    "order_accuracies": [...], "order_seed": seed, "outcomes": {"sequential": (N,) bool,
    "random_orders": (num_orders, N) bool}} (outcomes: per image, for anyorder.evaluation.intervals).
    """
    orders = random_orders(model.depth, num_orders, seed)
    hits = correct(model, images, labels, [None] + orders, batch_size, device)
    accuracies = [int(row.sum()) / len(labels) for row in hits]
    sequential, per_order = accuracies[0], accuracies[1:]
    arbitrary = summarize(per_order)
    return {
        "sequential": sequential,
        "arbitrary": arbitrary,
        "order_seed": seed,
        "orders": orders,
        "order_accuracies": per_order,
        "num_images": int(len(labels)),
        "chance": 1.0 / max(1, len(model.spec.class_names) or int(labels.max()) + 1),
        "depth": model.depth,
        # over the orders only (the spread of one order's accuracy); differences between models
        # get intervals over test images too (anyorder.evaluation.intervals, the report)
        "arbitrary_orders_ci95_halfwidth": 1.96 * arbitrary["std"] / math.sqrt(len(per_order)),
        "outcomes": {"sequential": hits[0], "random_orders": list(hits[1:])},
    }


def select_best(models: dict[str, AnyOrderViT], images: np.ndarray, labels: np.ndarray,
                num_orders: int, seed: int, batch_size: int = 256,
                device: torch.device | str = "cpu") -> tuple[str, dict]:
    """The model with the best mean accuracy over `num_orders` seeded random orders (the same
    orders for every model) on the data given (the validation split: a choice must never see
    the test split). Ties go to the first name. Returns (name, {name: summary of its accuracies})."""
    if not models:
        raise ValueError("select_best needs at least one model")
    depths = {model.depth for model in models.values()}
    if len(depths) != 1:
        raise ValueError(f"select_best compares models of one depth, got depths {sorted(depths)}")
    scores = {name: random_order_accuracy(model, images, labels, num_orders, seed, batch_size,
                                          device)
              for name, model in models.items()}
    names = list(models)
    best = max(names, key=lambda name: (scores[name]["mean"], -names.index(name)))
    return best, scores

"""How blocks behave depending on the slot they run at (the paper's analysis, section 1).

- `slot_confusion`: for an LS-pred model, the confusion matrix of the slot each position head
  predicts against the slot its block actually ran at (random orders, test images).
- `block_outputs_by_slot`: one block's output (mean over tokens) with that block run at every
  slot, for a 2-D projection coloured by slot (`project`: PCA here, UMAP when installed).
- `slot_contribution`: the accuracy drop when the block at slot s is skipped, per slot s,
  averaged over random orders (the sequential order for a sequentially trained model).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from anyorder.data.inputs import to_model_input
from anyorder.evaluation.accuracy import accuracy_for_orders
from anyorder.model.vit import AnyOrderViT
from anyorder.evaluation.orders import generator_for, random_orders


@torch.no_grad()
def stem_tokens(model: AnyOrderViT, images: np.ndarray, batch_size: int,
                device: torch.device) -> list[torch.Tensor]:
    """Tokens entering the first block, per batch: the analyses run many orders over the same
    images, and orders only change what follows the stem."""
    model.eval()
    tokens = []
    for start in range(0, len(images), batch_size):
        batch = to_model_input(images[start:start + batch_size], model.spec, device)
        tokens.append(model.forward_stem(batch))
    return tokens


@torch.no_grad()
def slot_confusion(model: AnyOrderViT, images: np.ndarray, num_orders: int, seed: int,
                   batch_size: int = 256, device: torch.device | str = "cpu") -> dict:
    """Predicted vs actual slot of an LS-pred model over `num_orders` seeded random orders:
    {"matrix": depth x depth counts (rows: actual slot), "accuracy": fraction right}."""
    if not model.behaviour.predicts_slot:
        raise ValueError(f"slot confusion needs an ls_pred model, got {model.variant}")
    device = torch.device(device)
    model.to(device).eval()
    matrix = np.zeros((model.depth, model.depth), dtype=np.int64)
    tokens = stem_tokens(model, images, batch_size, device)
    for order in random_orders(model.depth, num_orders, seed):
        for batch in tokens:
            _, position_logits = model.forward_layers(batch, order)
            for slot, logits in enumerate(position_logits):
                predicted = logits.argmax(dim=1).cpu().numpy()
                np.add.at(matrix[slot], predicted, 1)
    return {"matrix": matrix.tolist(), "accuracy": float(np.trace(matrix) / matrix.sum()),
            "num_orders": num_orders, "seed": seed}


@torch.no_grad()
def block_outputs_by_slot(model: AnyOrderViT, images: np.ndarray, block: int, seed: int,
                          batch_size: int = 256, device: torch.device | str = "cpu"
                          ) -> tuple[np.ndarray, np.ndarray]:
    """The output of `block` (mean over tokens, (N, D)) with the block run at each slot s: the
    other blocks fill the slots before it in a seeded random order. Returns (features (S*N, D),
    slot of each row)."""
    if not 0 <= block < model.depth:
        raise ValueError(f"block {block} is outside [0, {model.depth - 1}]")
    device = torch.device(device)
    model.to(device).eval()
    generator = generator_for(seed)
    others = [b for b in range(model.depth) if b != block]
    tokens = stem_tokens(model, images, batch_size, device)
    features, slots = [], []
    for slot in range(model.depth):
        before = [others[i] for i in torch.randperm(len(others), generator=generator)[:slot]]
        for batch in tokens:
            out, _ = model.forward_layers(batch, before + [block])
            features.append(out.mean(dim=1).float().cpu().numpy())
            slots.append(np.full(len(batch), slot))
    return np.concatenate(features), np.concatenate(slots)


def project(features: np.ndarray, method: str = "pca", seed: int = 0) -> np.ndarray:
    """(N, D) -> (N, 2): PCA (centred SVD, signs fixed) or UMAP (umap-learn, seeded)."""
    if method == "umap":
        import umap  # optional: pip install umap-learn
        return umap.UMAP(n_components=2, random_state=seed).fit_transform(features)
    if method != "pca":
        raise ValueError(f"unknown projection {method!r} (pca, umap)")
    centred = features - features.mean(axis=0)
    _, _, vt = np.linalg.svd(centred.astype(np.float64), full_matrices=False)
    components = vt[:2]
    signs = np.sign(components[np.arange(2), np.abs(components).argmax(axis=1)])
    return (centred @ (components * signs[:, None]).T).astype(np.float32)


def slot_separation(points: np.ndarray, slots: np.ndarray) -> float:
    """Between-slot variance / total variance of the points (0: slots overlap, 1: apart)."""
    centre = points.mean(axis=0)
    total = float(((points - centre) ** 2).sum())
    between = sum(float((slots == s).sum() * ((points[slots == s].mean(axis=0) - centre) ** 2)
                        .sum()) for s in np.unique(slots))
    return between / total if total else 0.0


def slot_contribution(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                      num_orders: int, seed: int, batch_size: int = 256,
                      device: torch.device | str = "cpu", shuffled: Optional[bool] = None) -> dict:
    """Per slot s: mean accuracy drop when the block at slot s is skipped (the others keep their
    order), over `num_orders` seeded random orders (LayerShuffle) or the sequential order."""
    shuffled = model.behaviour.shuffled_training if shuffled is None else shuffled
    orders = (random_orders(model.depth, num_orders, seed) if shuffled
              else [model.sequential_order()])
    skipped = [order[:s] + order[s + 1:] for order in orders for s in range(model.depth)]
    accuracies = accuracy_for_orders(model, images, labels, orders + skipped, batch_size, device)
    full, rest = accuracies[:len(orders)], accuracies[len(orders):]
    drops = np.array([[full[i] - rest[i * model.depth + s] for s in range(model.depth)]
                      for i in range(len(orders))])
    return {"drop_per_slot": drops.mean(axis=0).tolist(),
            "drop_std_per_slot": drops.std(axis=0).tolist(),
            "full_accuracy": float(np.mean(full)), "orders": "random" if shuffled
            else "sequential", "num_orders": len(orders), "seed": seed}

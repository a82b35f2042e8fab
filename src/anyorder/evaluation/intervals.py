"""Per-image outcomes and bootstrap intervals: how sure a difference between two models is.

Every evaluation keeps, per test image, whether the model got it right (one row of booleans per
block order, corruption, attack...). Those rows are stored packed (`pack`/`unpack`: the length and
base64 of np.packbits, ~65 bytes for 359 images) beside the metrics, so that the report can put a 95%
interval on any difference it shows. The interval is a seeded percentile bootstrap that
resamples the test images (paired: both models see the same resampled images) and, where a
figure is a mean over block orders or seeds, those too (each model's own, independently). An
interval over orders alone would say nothing of how a second test set would come out.
"""
from __future__ import annotations

import base64
from typing import Any

import numpy as np

RESAMPLES = 2000


def pack(correct: np.ndarray) -> str:
    """A boolean vector -> "<length>:<base64 of its bits>"."""
    correct = np.asarray(correct, dtype=bool)
    return f"{len(correct)}:" + base64.b64encode(np.packbits(correct).tobytes()).decode()


def unpack(text: str) -> np.ndarray:
    """`pack`'s text -> the boolean vector."""
    count, _, data = text.partition(":")
    bits = np.unpackbits(np.frombuffer(base64.b64decode(data), dtype=np.uint8))
    if not count.isdigit() or len(bits) < int(count):
        raise ValueError(f"not packed outcomes: {text[:40]!r}")
    return bits[:int(count)].astype(bool)


def pack_tree(tree: Any) -> Any:
    """Every numpy boolean vector in nested dicts/lists -> packed text (the rest unchanged)."""
    if isinstance(tree, dict):
        return {k: pack_tree(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return [pack_tree(v) for v in tree]
    if isinstance(tree, np.ndarray):
        return pack(tree)
    return tree


def unpack_tree(tree: Any) -> Any:
    """`pack_tree`'s inverse: every string leaf is unpacked."""
    if isinstance(tree, dict):
        return {k: unpack_tree(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [unpack_tree(v) for v in tree]
    return unpack(tree) if isinstance(tree, str) else tree


def resample_weights(count: int, resamples: int, generator: np.random.Generator) -> np.ndarray:
    """(resamples, count) float: how often each of `count` units is drawn in each bootstrap
    resample (multinomial, `count` draws with replacement)."""
    return generator.multinomial(count, np.full(count, 1.0 / count), size=resamples).astype(float)


def _summary(point: float, samples: np.ndarray) -> dict:
    low, high = np.percentile(samples, [2.5, 97.5])
    return {"value": float(point), "low": float(low), "high": float(high),
            "resamples": int(len(samples))}


def _mean_accuracy(rows: np.ndarray, images: np.ndarray, units: np.ndarray) -> np.ndarray:
    """Accuracy averaged over rows (orders, seeds) and images, under bootstrap weights:
    rows (k, N) bool, images (B, N), units (B, k) -> (B,)."""
    per_row = rows.astype(float) @ images.T / images.sum(1)   # (k, B): each row's accuracy
    return (units * per_row.T).sum(1) / units.sum(1)


def difference(a: np.ndarray, b: np.ndarray, resamples: int = RESAMPLES, seed: int = 0,
               resample_rows: bool = True) -> dict:
    """Mean accuracy of A minus that of B, with a 95% interval. a: (k_a, N), b: (k_b, N) booleans
    (one row per order or seed, one column per test image, the same images in both). Images are
    resampled paired; each side's rows independently when they are a random draw (orders,
    seeds), not when they are a fixed set (`resample_rows=False`: corruptions)."""
    a, b = np.atleast_2d(a), np.atleast_2d(b)
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"outcomes of {a.shape[1]} and {b.shape[1]} images: a difference needs "
                         f"the same test images on both sides")
    generator = np.random.default_rng(seed)
    images = resample_weights(a.shape[1], resamples, generator)

    def rows(count: int) -> np.ndarray:
        return resample_weights(count, resamples, generator) if resample_rows else \
            np.ones((resamples, count))

    ours, theirs = _mean_accuracy(a, images, rows(len(a))), _mean_accuracy(b, images, rows(len(b)))
    return _summary(a.mean() - b.mean(), ours - theirs)


def corruption_errors(outcomes: dict[str, dict[str, np.ndarray]]) -> np.ndarray:
    """{corruption: {severity: correct (N,)}} -> (C, N) errors per image summed over severities."""
    return np.stack([sum((~np.asarray(by_severity[s])).astype(float) for s in sorted(by_severity))
                     for _, by_severity in sorted(outcomes.items())])


def mce(errors: np.ndarray, baseline: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Mean corruption error relative to a baseline (ImageNet-C's mCE): the mean over corruptions
    of (errors summed over severities) / the baseline's. errors, baseline: (C, N) from
    `corruption_errors`, same corruptions; weights (B, N) bootstrap weights (None: the data as
    it is). No corruption is dropped: where the baseline made no error, its error counts as one
    image (the smallest error the test set can measure), so a model that errs there is charged
    for it instead of the corruption vanishing from the mean."""
    weights = np.ones((1, errors.shape[1])) if weights is None else weights
    own, base = errors @ weights.T, baseline @ weights.T                  # (C, B)
    return (own / np.maximum(base, 1.0)).mean(0)


def mce_interval(errors: np.ndarray, baseline: np.ndarray, resamples: int = RESAMPLES,
                 seed: int = 0) -> dict:
    """`mce` with a 95% interval over resampled test images (paired with the baseline's)."""
    weights = resample_weights(errors.shape[1], resamples, np.random.default_rng(seed))
    return _summary(float(mce(errors, baseline)[0]), mce(errors, baseline, weights))

"""Robustness of one model: corruptions, adversarial attacks, nullspace invariance.

Every figure is measured in sequential order and, for LayerShuffle models, also in seeded random
block orders ("random_orders": each test image is assigned one of `num_orders` random orders, the
same assignment for every corruption and attack, and the attack sees the order its image is
evaluated in). Corrupted test sets come from
`anyorder.robustness.corruptions` (the pipeline generates them once, in the `corrupt` stage).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from anyorder.robustness.attacks import PixelModel, attack
from anyorder.robustness.corruption_names import FAMILY_OF
from anyorder.model.vit import AnyOrderViT
from anyorder.robustness.nullspace import (exact_noise_like, exact_nullspace, invariance,
                                           synthesize_noise)
from anyorder.robustness.settings import RobustnessConfig, SynthesisConfig
from anyorder.evaluation.accuracy import Groups, batches, correct
from anyorder.evaluation.orders import STREAM_VALIDATION, generator_for, random_orders


def eps_label(eps: float) -> str:
    """A budget as a key: '8/255' when it is a whole number of 255ths, else the number."""
    steps = eps * 255
    return f"{round(steps)}/255" if abs(steps - round(steps)) < 1e-6 else f"{eps:.6g}"


def order_groups(model: AnyOrderViT, num_images: int, num_orders: int, seed: int
                 ) -> dict[str, Groups]:
    """How the test images are run, per evaluation mode: "sequential" for every model; for a
    model trained shuffled also "random_orders": `num_orders` seeded random orders, each image
    assigned one of them at random (each order runs as whole batches: as fast as sequential)."""
    modes: dict[str, Groups] = {"sequential": [(np.arange(num_images), None)]}
    if model.behaviour.shuffled_training:
        orders = random_orders(model.depth, num_orders, seed)
        generator = np.random.default_rng([int(seed) & 0xFFFFFFFF, num_images])
        assignment = generator.integers(0, len(orders), num_images)
        modes["random_orders"] = [(np.flatnonzero(assignment == k), order)
                                  for k, order in enumerate(orders)
                                  if (assignment == k).any()]
    return modes


def accuracy(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray, groups: Groups,
             batch_size: int, device: torch.device) -> float:
    """Top-1 accuracy, each image run in the order of its group."""
    return float(correct(model, images, labels, [groups], batch_size, device)[0].mean())


def corruption_accuracy(model: AnyOrderViT, corrupted: dict[str, np.ndarray],
                        severities: list[int], labels: np.ndarray,
                        modes: dict[str, Groups], batch_size: int,
                        device: torch.device) -> tuple[dict, dict]:
    """Accuracy per corruption and severity, per family, and the mean over all of them; and the
    per-image outcomes ({mode: {corruption: {severity: (N,) bool}}}).

    Every corrupted version of a group's images goes through the model together (one stream of
    batches per order, not one per corruption, severity and order: 8 forwards instead of 600
    for an LS model's 75 sets in 8 orders); each image is still run in its group's order."""
    sets = [(name, str(s), stack[i]) for name, stack in corrupted.items()
            for i, s in enumerate(severities)]
    table: dict = {name: {str(s): {} for s in severities} for name in corrupted}
    outcomes: dict = {}
    for mode, groups in modes.items():
        hits_all = np.zeros((len(sets), len(labels)), dtype=bool)
        for indices, order in groups:
            stacked = np.concatenate([stack[indices] for _, _, stack in sets])
            hits = correct(model, stacked, np.tile(labels[indices], len(sets)), [order],
                           batch_size, device)[0]
            hits_all[:, indices] = hits.reshape(len(sets), len(indices))
        outcomes[mode] = {name: {} for name in corrupted}
        for (name, severity, _), hits in zip(sets, hits_all):
            table[name][severity][mode] = float(hits.mean())
            outcomes[mode][name][severity] = hits

    def mean(names, mode):
        return float(np.mean([table[n][str(s)][mode] for n in names for s in severities]))

    families = sorted({FAMILY_OF[n] for n in table})
    return {
        "per_corruption": table,
        "family_of": {n: FAMILY_OF[n] for n in table},
        "per_family": {f: {m: mean([n for n in table if FAMILY_OF[n] == f], m) for m in modes}
                       for f in families},
        "mean_corruption_accuracy": {m: mean(list(table), m) for m in modes},
        "errors": {n: {m: float(sum(1 - table[n][str(s)][m] for s in severities)) for m in modes}
                   for n in table},  # summed over severities: the numerator of a CE
    }, outcomes


def adversarial_accuracy(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                         cfg: RobustnessConfig, modes: dict[str, Groups],
                         device: torch.device) -> tuple[dict, dict]:
    """Accuracy under each attack and budget; the largest perturbation seen (must be <= eps);
    the sanity check that PGD never scores above FGSM at the same budget; and the per-image
    outcomes ({mode: {attack: {eps label: (N,) bool}}})."""
    attacks = cfg.attacks
    out: dict = {name: {} for name in attacks.names}
    outcomes: dict = {mode: {name: {} for name in attacks.names} for mode in modes}
    worst_excess = 0.0
    for mode, groups in modes.items():
        generator = generator_for(attacks.seed, 0, STREAM_VALIDATION)
        for name in attacks.names:
            for eps in attacks.eps:
                hits = np.zeros(len(labels), dtype=bool)
                for index, order in batches(groups, cfg.batch_size):
                    pixels = torch.as_tensor(images[index]).to(device).permute(0, 3, 1, 2)
                    pixels = pixels.float() / 255.0
                    y = torch.as_tensor(labels[index], device=device)
                    attacked = PixelModel(model, order).to(device)
                    adv = attack(name, attacked, pixels, y, eps, attacks.pgd_steps,
                                 attacks.pgd_step_size, attacks.pgd_random_start, generator)
                    worst_excess = max(worst_excess, float((adv - pixels).abs().max()) - eps)
                    with torch.no_grad():
                        hits[index] = (attacked(adv).argmax(1) == y).cpu().numpy()
                out[name].setdefault(eps_label(eps), {})[mode] = float(hits.mean())
                outcomes[mode][name][eps_label(eps)] = hits
    violations = []
    if "fgsm" in out and "pgd" in out:
        violations = [f"{e} {m}" for e in out["pgd"] for m in out["pgd"][e]
                      if out["pgd"][e][m] > out["fgsm"][e][m]]
    return {"accuracy": out, "eps": [float(e) for e in attacks.eps],
            "max_perturbation_beyond_eps": max(0.0, worst_excess),
            "pgd_above_fgsm": violations}, outcomes


def nullspace_invariance(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                         train_images: np.ndarray, cfg: RobustnessConfig,
                         synthesis: SynthesisConfig, modes: dict[str, Groups],
                         device: torch.device) -> dict:
    """Exact nullspace noise as large as each image, and synthesised approximate-nullspace noise
    (from the training split, never the test split): accuracy and relative logit change."""
    basis = exact_nullspace(model, cfg.exact_rtol)
    patch = int(model.vit.patch_embed.patch_size[0])
    exact = {"nullspace": basis.summary(), "noise_to_image_norm": 1.0 if basis.dimension else 0.0}
    if basis.dimension == 0:
        exact["note"] = (f"the patch embedding has no nullspace: C*P*P = {basis.input_dim} inputs "
                         f"<= width {basis.embed_dim} at rank {basis.rank}; the exact check adds "
                         f"zero noise")
    for mode, groups in modes.items():
        generator = generator_for(cfg.noise_seed, 0, STREAM_VALIDATION)
        exact[mode] = invariance(
            model, images, labels,
            lambda batch: {"images": batch + exact_noise_like(batch, basis, patch, generator)},
            batches(groups, cfg.batch_size), device)
    synthesised_noise = synthesize_noise(model, train_images, synthesis,
                                         generator_for(cfg.noise_seed, 1, STREAM_VALIDATION),
                                         device)
    noise = synthesised_noise.noise.to(device)
    synthesised = {"synthesis": synthesised_noise.record(prefix="")}
    for mode, groups in modes.items():
        synthesised[mode] = invariance(model, images, labels, lambda batch: {"patch_noise": noise},
                                       batches(groups, cfg.batch_size), device)
    return {"exact": exact, "synthesised": synthesised}


def evaluation_subset(num_images: int, size: Optional[int], seed: int) -> np.ndarray:
    """Sorted indices of a seeded subset of `size` test images (all of them when size is None
    or not smaller)."""
    if size is None or size >= num_images:
        return np.arange(num_images)
    generator = np.random.default_rng([int(seed) & 0xFFFFFFFF, num_images])
    return np.sort(generator.permutation(num_images)[:size])


def evaluate_robustness(model: AnyOrderViT, images: np.ndarray, labels: np.ndarray,
                        corrupted: dict[str, np.ndarray], train_images: np.ndarray,
                        cfg: RobustnessConfig, device: torch.device | str = "cpu") -> dict:
    """Everything above for one model on the test split (`corrupted[name]`: (severities, N, H, W,
    3) uint8 in the order of cfg.corruptions.severities). "outcomes" holds, per mode, each
    corrupted and attacked image's right/wrong ((N,) bool arrays, over the images corrupted and
    attacked): what the report's intervals resample (anyorder.evaluation.intervals)."""
    device = torch.device(device)
    modes = order_groups(model, len(labels), cfg.num_orders, cfg.order_seed)
    clean = {mode: accuracy(model, images, labels, groups, cfg.batch_size, device)
             for mode, groups in modes.items()}
    subset = evaluation_subset(len(labels), cfg.num_images, cfg.subset_seed)
    sub_modes = order_groups(model, len(subset), cfg.num_orders, cfg.order_seed)
    sub_corrupted = {name: stack[:, subset] for name, stack in corrupted.items()}
    clean_subset = {mode: correct(model, images[subset], labels[subset], [groups],
                                  cfg.batch_size, device)[0]
                    for mode, groups in sub_modes.items()}
    corruptions, corruption_outcomes = corruption_accuracy(
        model, sub_corrupted, list(cfg.corruptions.severities), labels[subset], sub_modes,
        cfg.batch_size, device)
    adversarial, attack_outcomes = adversarial_accuracy(model, images[subset], labels[subset],
                                                        cfg, sub_modes, device)
    return {
        "variant": model.variant,
        "modes": list(modes),
        "num_images": int(len(labels)),
        "num_images_attacked_and_corrupted": int(len(subset)),
        "clean_accuracy": clean,
        "clean_accuracy_subset": {mode: float(hits.mean()) for mode, hits in clean_subset.items()},
        "corruptions": corruptions,
        "adversarial": adversarial,
        "nullspace": nullspace_invariance(model, images, labels, train_images, cfg,
                                          cfg.synthesis, modes, device),
        "outcomes": {mode: {"clean": clean_subset[mode],
                            "corruptions": corruption_outcomes[mode],
                            "attacks": attack_outcomes[mode]} for mode in sub_modes},
    }

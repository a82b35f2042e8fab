"""The report's robustness part, from every model's robustness record: the page
metrics/robustness.md (anyorder.report's robustness table as Markdown, the differences from the
baseline with their intervals, the noise every nullspace fine-tuning epoch trained on) and the
rows of its plots (accuracy against severity per corruption family; against eps per attack)."""
from __future__ import annotations

from anyorder.report import (differences_markdown, robustness_markdown, robustness_table,
                             synthesis_markdown)

COLUMNS = ["fine_tune_epochs", "clean", "mean_corruption_accuracy", "mce_vs_baseline",
           "fgsm@1/255", "fgsm@4/255", "fgsm@8/255", "pgd@1/255", "pgd@4/255", "pgd@8/255",
           "synthesised_noise_accuracy", "synthesis_converged",
           "exact_nullspace_max_relative_logit_change"]
DIFFERENCES_INTRO = """
Against the baseline `{baseline}` in sequential order, with 95% bootstrap intervals over the test
images (paired: both models on the same resampled images; the corruptions are a fixed set). mCE:
the mean over corruptions of the model's errors summed over severities divided by the baseline's;
where the baseline made no error on a corruption, its error counts as one image, so no corruption
is dropped. An interval that holds 0 (1 for mCE) is no evidence of a difference.

"""


SYNTHESIS_INTRO = """
The noise each nullspace fine-tuning epoch trained on: optimiser steps, the mean squared distance
of the softmax outputs it causes on the check set (converged: under nullspace.synthesis.epsilon),
the same distance for random noise of the same norm (what the `random` control trains on), its
norm, how far it moved from its uniform start and how far it lies from that random noise
(relative L2 distances).

"""


def robustness_page(robust: dict, baseline: str, outcomes: dict) -> tuple[dict, str]:
    """The robustness table of every model (`robust`: name -> its record; `outcomes`: name ->
    its unpacked per-image outcomes, for the intervals) and the page metrics/robustness.md."""
    table = robustness_table(robust, baseline, {n: o["robustness"] for n, o in
                                                 outcomes.items() if "robustness" in o})
    page = (robustness_markdown(table, COLUMNS) + DIFFERENCES_INTRO.format(
        baseline=baseline) + differences_markdown(table))
    trained_noise = synthesis_markdown(robust)
    if trained_noise:
        page += SYNTHESIS_INTRO + trained_noise
    return table, page


def plot_rows(models: dict) -> tuple[list[dict], list[dict]]:
    """Rows of the severity plot (per model, mode, corruption family and severity: the mean
    accuracy over the family) and of the adversarial plot (per model, mode, attack and eps)."""
    severity, adversarial = [], []
    for name, m in models.items():
        for mode in m["modes"]:
            per, family_of = m["corruptions"]["per_corruption"], m["corruptions"]["family_of"]
            for family in sorted(set(family_of.values())):
                for s in next(iter(per.values())):
                    values = [per[c][s][mode] for c in per if family_of[c] == family]
                    severity.append({"model": name, "mode": mode, "family": family,
                                     "severity": int(s), "accuracy": sum(values) / len(values)})
            for attack, by_eps in m["adversarial"]["accuracy"].items():
                for eps_value, (eps, by_mode) in zip(m["adversarial"]["eps"], by_eps.items()):
                    adversarial.append({"model": name, "mode": mode, "attack": attack,
                                        "eps": eps_value, "eps_255": round(eps_value * 255, 3),
                                        "accuracy": by_mode[mode]})
    return severity, adversarial

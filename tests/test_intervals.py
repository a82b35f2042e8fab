"""Per-image outcomes, bootstrap intervals, mCE and the summary tables built on them."""
import numpy as np
import pytest

from anyorder.evaluation.intervals import (corruption_errors, difference, mce, mce_interval, pack, unpack,
                                pack_tree, unpack_tree)
from anyorder.report import robustness_table, summary_table


def test_outcomes_round_trip_packed():
    rng = np.random.default_rng(0)
    hits = rng.random(359) < 0.7
    assert np.array_equal(unpack(pack(hits)), hits)
    tree = {"orders": {"sequential": hits, "random_orders": [hits, ~hits]},
            "robustness": {"sequential": {"clean": hits[:16]}}, "seed": 3}
    back = unpack_tree(pack_tree(tree))
    assert np.array_equal(back["orders"]["random_orders"][1], ~hits)
    assert np.array_equal(back["robustness"]["sequential"]["clean"], hits[:16])
    assert back["seed"] == 3
    with pytest.raises(ValueError, match="not packed outcomes"):
        unpack("9:" + pack(hits[:8]).partition(":")[2])


def test_a_difference_has_an_interval_over_images_that_shrinks_with_more_of_them():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1600):
        b = rng.random(n) < 0.8
        a = b.copy()
        a[np.flatnonzero(~b)[:n // 10]] = True          # A right on 10% more images than B
        d = difference(a, b)
        assert d["value"] == pytest.approx(0.1)
        assert d["low"] > 0 and d["low"] < d["value"] < d["high"]
        widths.append(d["high"] - d["low"])
    assert widths[1] < widths[0] / 2.5                 # ~1/sqrt(N): 4x narrower for 16x images
    same = difference(b, b)
    assert same["value"] == same["low"] == same["high"] == 0


def test_orders_that_disagree_widen_the_interval_unless_they_are_a_fixed_set():
    rng = np.random.default_rng(2)
    base = rng.random(400) < 0.9
    steady = np.stack([base] * 10)
    varied = np.stack([base & (rng.random(400) < acc) for acc in np.linspace(0.6, 1.0, 10)])
    width = lambda d: d["high"] - d["low"]
    assert width(difference(varied, base)) > width(difference(steady, base))
    assert width(difference(varied, base, resample_rows=False)) < width(difference(varied, base))


def _robustness(errors: dict, n: int = 40) -> dict:
    """A minimal metrics/robustness/<name>.json (sequential mode only)."""
    return {"variant": "sequential", "modes": ["sequential"], "num_images_attacked_and_corrupted": n,
            "clean_accuracy": {"sequential": 0.9},
            "corruptions": {"mean_corruption_accuracy": {"sequential": 0.8},
                            "errors": {c: {"sequential": e} for c, e in errors.items()}},
            "adversarial": {"accuracy": {}},
            "nullspace": {"exact": {"sequential": {"relative_logit_change_max": 1e-7,
                                                   "predictions_changed": 0}},
                          "synthesised": {"synthesis": {"converged": True},
                                          "sequential": {"noisy_accuracy": 0.9}}}}


def test_mce_counts_a_corruption_on_which_the_baseline_made_no_error():
    base = _robustness({"fog": 0.2, "snow": 0.0})
    model = _robustness({"fog": 0.2, "snow": 0.1})       # 4 of 40 wrong where the base had none
    table = robustness_table({"base": base, "model": model}, "base")
    # fog: 0.2 / 0.2 = 1; snow: 0.1 / (1/40) = 4 (the base's error counted as one image)
    assert table["models"]["model"]["sequential"]["mce_vs_baseline"] == pytest.approx(2.5)
    assert table["models"]["base"]["sequential"]["mce_vs_baseline"] == pytest.approx(0.5)
    # The same rule on per-image outcomes, and an interval around it.
    n = 40
    ok = np.ones(n, dtype=bool)
    wrong = lambda k: np.r_[np.zeros(k, bool), np.ones(n - k, bool)]
    errors = corruption_errors({"fog": {"1": wrong(8)}, "snow": {"1": wrong(4)}})
    baseline = corruption_errors({"fog": {"1": wrong(8)}, "snow": {"1": ok}})
    assert mce(errors, baseline)[0] == pytest.approx(2.5)
    interval = mce_interval(errors, baseline)
    assert interval["value"] == pytest.approx(2.5) and interval["low"] <= 2.5 <= interval["high"]
    with pytest.raises(KeyError, match="the baseline 'nope'"):
        robustness_table({"base": base}, "nope")


def test_the_summary_compares_with_the_named_baseline_and_flags_unequal_budgets():
    def run(variant, seq, arb, epochs):
        return {"variant": variant, "seed": 0, "sequential": seq, "fine_tune_epochs": epochs,
                "arbitrary": {"mean": arb, "std": 0.0, "min": arb, "max": arb, "count": 2}}
    runs = {"ls": run("ls", 0.97, 0.96, 24), "short": run("sequential", 0.96, 0.5, 8),
            "sequential": run("sequential", 0.98, 0.5, 24)}
    n = 100
    seq = np.r_[np.ones(98, bool), np.zeros(2, bool)]
    ls = np.r_[np.ones(96, bool), np.zeros(4, bool)]
    outcomes = {name: {"orders": {"sequential": seq, "random_orders": [ls, ls]}} for name in runs}
    summary = summary_table(runs, "sequential", outcomes)
    assert summary["baseline_run"] == "sequential"        # named, not the first sequential run
    row = summary["runs"]["ls"]
    assert row["equal_budget"] and not summary["runs"]["short"]["equal_budget"]
    assert row["arbitrary_mean_vs_baseline_sequential"] == pytest.approx(0.96 / 0.98)
    assert row["arbitrary_minus_baseline_sequential"]["value"] == pytest.approx(-0.02)
    assert row["arbitrary_minus_baseline_sequential"]["low"] < -0.02 < \
        row["arbitrary_minus_baseline_sequential"]["high"]
    with pytest.raises(KeyError, match="the baseline run 'base'"):
        summary_table(runs, "base")

"""Shared tiny fixtures: real digits at 16x16 and tiny ViTs, so every test runs in seconds."""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
import yaml

ROOT = Path(__file__).resolve().parents[1]
EMBEDDED = ROOT / "data" / "embedded" / "digits.npz"
sys.path.insert(0, str(ROOT))
from pipeline import env  # noqa: E402  the quiet environment (no telemetry), for every test

env.apply()
# Tiny models gain nothing from more threads, and OpenMP pools thrash when two test workers (or a
# worker and the stages it starts) share 2 cores: one thread everywhere, subprocesses included.
os.environ["OMP_NUM_THREADS"] = "1"

from anyorder.data.prepare import prepare_dataset  # noqa: E402
from anyorder.data.prepared import load_split  # noqa: E402
from anyorder.model.spec import ModelSpec  # noqa: E402
from anyorder.model.vit import build_model  # noqa: E402

torch.set_num_threads(1)


def tiny_spec(variant: str = "sequential", depth: int = 4, **overrides) -> ModelSpec:
    """A ViT small enough to train on 16x16 digits in seconds (3*4*4 = 48 > embed_dim 32)."""
    fields = dict(arch="vit_tiny_patch16_224", num_classes=10, img_size=16, variant=variant,
                  patch_size=4, embed_dim=32, depth=depth, num_heads=2, mlp_ratio=2.0,
                  class_names=[str(i) for i in range(10)])
    fields.update(overrides)
    return ModelSpec(**fields)


def tiny_model(variant: str = "sequential", depth: int = 4, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return build_model(tiny_spec(variant, depth, **overrides))


@pytest.fixture(scope="session")
def digits16(tmp_path_factory):
    """The embedded digits, prepared at 16x16: {split: (uint8 images NHWC, labels)}."""
    out = tmp_path_factory.mktemp("digits16") / "prepared"
    prepare_dataset("npz", str(EMBEDDED), 16, 0.15, 0.2, 0, out)
    return {split: load_split(out, split) for split in ("train", "val", "test")}


# The real pipeline, shrunk: a full `dvc repro` in well under a minute on 2 CPU cores.
TINY_PIPELINE = {
    "data": {"image_size": 16},
    "model": {"overrides": {"patch_size": 4, "embed_dim": 16, "depth": 3, "num_heads": 2}},
    "pretrain": {"train": {"epochs": 1, "warmup_epochs": 0}},
    "finetune": {"train": {"epochs": 1}, "runs": {"seq": {"variant": "sequential", "seed": 0},
                                       "ls": {"variant": "ls", "seed": 0},
                                       "ls1": {"variant": "ls", "seed": 1,
                                               "layerdrop_rate": 0.3}}},
    "report": {"baseline": "seq"},
    "evaluate": {"num_orders": 3},
    "select": {"num_orders": 3},
    "export": {"check_orders": 3, "models": ["ls_best"]},
    "nullspace": {"train": {"epochs": 1}, "synthesis": {"steps": 60, "check_images": 64},
                  "arms": {"seq_null": {"start": "seq", "noise": "nullspace", "seed": 0},
                           "ls_plain": {"start": "ls_best", "noise": "none", "seed": 0}},
                  "study_arms": {"seq_random": {"start": "seq", "noise": "random", "seed": 0}}},
    "robustness": {"corruptions": {"names": ["gaussian_noise", "fog"], "severities": [1, 5]},
                   "attacks": {"eps": [0.0313725490196078], "pgd_steps": 2},
                   "num_images": 16, "num_orders": 2},
    "pruning": {"subsets": 3},
    "merge": {"num_orders": 2, "models": {"frank": {
        "generator": "greedy", "sources": ["ls", "ls1"], "seed": 0}}},
    "analysis": {"models": ["seq", "ls"], "num_images": 16,
                 "num_orders": 2},
}


def _merged(base: dict, override: dict) -> dict:
    out = dict(base)
    for key, value in override.items():
        # Named entries (runs, models, arms) are replaced, not merged.
        nested = isinstance(value, dict) and key not in ("runs", "models", "arms", "study_arms")
        out[key] = _merged(base.get(key) or {}, value) if nested else value
    return out


def shipped_params(edits: dict | None = None) -> dict:
    """This project's params.yaml as a dict, with `edits` merged in (named entries replaced)."""
    return _merged(yaml.safe_load((ROOT / "params.yaml").read_text()), edits or {})


def copy_tiny_project(root: Path) -> Path:
    """Copy this project's pipeline and library into `root` with TINY_PIPELINE params
    (no git or DVC repository yet: callers init what they need)."""
    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".gitignore", ".dvcignore"):
        shutil.copy(ROOT / name, root / name)
    for name in ("pipeline", "src", "data/embedded", "models/weights", "models/recipes"):
        shutil.copytree(ROOT / name, root / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = shipped_params(TINY_PIPELINE)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    return root

"""Is PGD strong enough, or is something masking gradients? PGD accuracy against steps and eps.

    python bench/pgd_strength.py   # after `make run`; writes bench/results/pgd_strength.json

On the pipeline's sequential baseline and its LS model (models/finetune/sequential,
models/selected/ls_best), the whole test split in sequential order: FGSM, and PGD with 5 (the
pipeline's setting), 20 and 50 steps with random start and 50 without, at eps 4, 8 and 16/255.
Without masking, accuracy falls with more steps and reaches about 0 at a large enough eps.
"""
from __future__ import annotations

import datetime
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from anyorder.robustness.attacks import PixelModel, attack  # noqa: E402
from anyorder.model.checkpoint import load_model  # noqa: E402
from anyorder.data.prepared import load_split  # noqa: E402


def main() -> None:
    torch.set_num_threads(2)
    images, labels = load_split(ROOT / "data/prepared", "test")
    pixels = torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255
    targets = torch.as_tensor(labels)
    rows = []
    for name in ("models/finetune/sequential", "models/selected/ls_best"):
        model = PixelModel(load_model(ROOT / name)).eval()
        for eps in (4 / 255, 8 / 255, 16 / 255):
            settings = [("fgsm", 1, False), ("pgd", 5, True), ("pgd", 20, True),
                        ("pgd", 50, True), ("pgd", 50, False)]
            for attack_name, steps, random_start in settings:
                adv = attack(attack_name, model, pixels, targets, eps, steps, 2.5, random_start,
                             torch.Generator().manual_seed(0))
                with torch.no_grad():
                    accuracy = float((model(adv).argmax(1) == targets).float().mean())
                rows.append({"model": name, "eps_255": round(eps * 255), "attack": attack_name,
                             "steps": steps, "random_start": random_start, "accuracy": accuracy})
                print(rows[-1], flush=True)
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "num_images": int(len(labels)), "rows": rows}
    (ROOT / "bench/results/pgd_strength.json").write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()

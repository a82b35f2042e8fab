"""One-time cross-check of the hand-written attacks (src/anyorder/robustness/attacks.py) against torchattacks.

torchattacks is not a dependency (3.5.1 pins requests~=2.25.1, which would downgrade what MLflow
needs), so install it beside the project without its dependencies to run this:

    pip install --no-deps --target /tmp/ta torchattacks==3.5.1
    PYTHONPATH=/tmp/ta python bench/attack_crosscheck.py   # writes bench/results/attack_crosscheck.json

On a seeded tiny ViT and seeded images in [0, 1]: FGSM, and PGD without random start (same step
size and steps), ours against torchattacks' at several budgets: the largest pixel difference of
the adversarial images and the accuracy each leaves.
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

from anyorder.robustness.attacks import PixelModel, fgsm, pgd  # noqa: E402
from anyorder.model.spec import ModelSpec  # noqa: E402
from anyorder.model.vit import build_model  # noqa: E402


def main() -> None:
    import torchattacks
    torch.manual_seed(0)
    spec = ModelSpec(arch="vit_tiny_patch16_224", num_classes=10, img_size=32, patch_size=8,
                     embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0)
    model = PixelModel(build_model(spec, seed=0)).eval()
    images = torch.rand(64, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        labels = model(images).argmax(1)
    rows = []
    for eps in (1 / 255, 2 / 255, 4 / 255, 8 / 255):
        steps, alpha = 5, 2.5 * eps / 5
        pairs = {
            "fgsm": (fgsm(model, images, labels, eps),
                     torchattacks.FGSM(model, eps=eps)(images, labels)),
            "pgd": (pgd(model, images, labels, eps, steps, alpha, random_start=False),
                    torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps,
                                     random_start=False)(images, labels)),
        }
        for name, (ours, theirs) in pairs.items():
            with torch.no_grad():
                acc = [float((model(x).argmax(1) == labels).float().mean()) for x in (ours, theirs)]
            rows.append({"attack": name, "eps_255": round(eps * 255), "max_pixel_difference":
                         float((ours - theirs).abs().max()),
                         "pixels_differing": int(((ours - theirs).abs() > 1e-6).sum()),
                         "accuracy_ours": acc[0], "accuracy_torchattacks": acc[1]})
    out = {"date": datetime.date.today().isoformat(), "machine": platform.platform(),
           "torch": torch.__version__, "torchattacks": torchattacks.__version__, "rows": rows}
    path = ROOT / "bench/results/attack_crosscheck.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    for row in rows:
        print(row)


if __name__ == "__main__":
    main()

"""The paper's shape at test size: a ViT with patch 16 at 224 px (196 patches; tiny width, two
blocks) through every stage's library path: training, order evaluation, pruning, robustness (all
15 corruptions, both attacks, the nullspace invariance), merging, export, the ONNX runtime and the
HTTP service. The 16 px digits, upscaled 14x, are the data."""
import sys

import httpx
import numpy as np
import pytest
import torch

from anyorder.config import settings_from_dict
from anyorder.evaluation.accuracy import evaluate_orders
from anyorder.evaluation.pruning import pruning_curve
from anyorder.export.blocks import check_export, export_model
from anyorder.export.runtime import BlockRuntime
from anyorder.model.merge import Recipe, merge_models
from anyorder.model.vit import build_model
from anyorder.robustness.corruption_names import CORRUPTIONS
from anyorder.robustness.corruptions import corrupt_severities
from anyorder.robustness.evaluate import evaluate_robustness
from anyorder.serving.cluster import launch
from anyorder.training.loop import train_model
from anyorder.training.settings import TrainConfig
from conftest import shipped_params, tiny_spec
from data_fixtures import png

SIZE, PATCH = 224, 16


def spec224(variant: str):
    return tiny_spec(variant, depth=2, img_size=SIZE, patch_size=PATCH)


@pytest.fixture(scope="module")
def data224(digits16):
    def upscaled(split: str, count: int):
        images, labels = digits16[split]
        factor = SIZE // images.shape[1]
        return np.repeat(np.repeat(images[:count], factor, 1), factor, 2), labels[:count]
    return {"train": upscaled("train", 64), "val": upscaled("val", 16),
            "test": upscaled("test", 12)}


@pytest.fixture(scope="module")
def trained224(data224):
    models = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        model = build_model(spec224("ls"))
        result = train_model(model, data224["train"], data224["val"],
                             TrainConfig(epochs=1, batch_size=16), seed=seed, progress=False)
        assert np.isfinite(result.history[-1]["train_loss"])
        models[name] = model.eval()
    return models


def test_a_patch16_vit_at_224px_evaluates_prunes_and_merges(trained224, data224):
    model = trained224["a"]
    assert model.vit.patch_embed.num_patches == (SIZE // PATCH) ** 2 == 196
    images, labels = data224["test"]
    evaluation = evaluate_orders(model, images, labels, 2, 0, batch_size=8)
    assert evaluation["num_images"] == 12 and evaluation["arbitrary"]["count"] == 2
    curve = pruning_curve(model, images, labels, 2, 0, batch_size=8)
    assert [point["removed"] for point in curve["curve"]] == [0, 1]
    merged = merge_models(Recipe("a", {"a": "", "b": ""}, [("b", 0), ("a", 1)]), trained224)
    expected = trained224["b"].state_dict()["vit.blocks.0.attn.qkv.weight"]
    assert torch.equal(merged.state_dict()["vit.blocks.0.attn.qkv.weight"], expected)


def test_a_patch16_vit_at_224px_runs_every_corruption_attack_and_the_nullspace(trained224,
                                                                              data224):
    images, labels = data224["test"]
    cfg = settings_from_dict(shipped_params({"robustness": {
        "corruptions": {"severities": [5]}, "attacks": {"eps": [0.0313725490196078],
                                                         "pgd_steps": 2},
        "num_images": 4, "num_orders": 2, "batch_size": 8,
        "synthesis": {"steps": 20, "batch_size": 8, "check_images": 8}}})).robustness
    corrupted = {name: corrupt_severities(images, name, [5]) for name in CORRUPTIONS}
    assert all(stack.shape == (1, *images.shape) and stack.dtype == np.uint8
               for stack in corrupted.values())
    result = evaluate_robustness(trained224["a"], images, labels, corrupted,
                                 data224["train"][0], cfg)
    assert set(result["corruptions"]["per_corruption"]) == set(CORRUPTIONS)
    assert set(result["adversarial"]["accuracy"]) == {"fgsm", "pgd"}
    assert result["adversarial"]["max_perturbation_beyond_eps"] < 1e-6
    exact = result["nullspace"]["exact"]
    assert exact["nullspace"]["dimension"] == 3 * PATCH * PATCH - 32  # 768 inputs, width 32
    for mode in ("sequential", "random_orders"):  # noise as large as the image changes nothing
        assert exact[mode]["relative_logit_change_max"] < 1e-4
        assert exact[mode]["predictions_changed"] == 0


def test_a_patch16_vit_at_224px_exports_and_is_served_like_pytorch(trained224, data224,
                                                                   tmp_path):
    model = trained224["a"]
    out = tmp_path / "vit224"
    export_model(model, out, "vit224")
    assert check_export(model, out, 2, 0)["max_abs_error"] < 1e-4
    images, _ = data224["test"]
    expected = BlockRuntime(out).predict(images[:3], [1, 0])
    process, url = launch([sys.executable, "-m", "anyorder.serving.service", str(out), "--port", "0",
                           "--threads", "1"])
    try:
        files = [("images", (f"{i}.png", png(image), "image/png"))
                 for i, image in enumerate(images[:3])]
        with httpx.Client(base_url=url, timeout=60) as client:
            response = client.post("/v1/models/vit224/predict", files=files,
                                   params={"order": "1,0"})
        assert response.status_code == 200, response.text
        np.testing.assert_allclose(response.json()["logits"], expected.logits, atol=1e-4)
    finally:
        process.kill()
        process.wait(timeout=10)

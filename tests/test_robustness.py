"""Nullspace noise, nullspace fine-tuning, corruptions and attacks on tiny models (seconds)."""
import numpy as np
import pytest
import torch

from anyorder.robustness.attacks import PixelModel, attack, fgsm, pgd
from anyorder.config import settings_from_dict
from anyorder.robustness.corruptions import CORRUPTIONS, SEVERITIES, corrupt
from anyorder.robustness.nullspace import (epoch_noise, exact_noise_like, exact_nullspace,
                                invariance, patch_embedding_matrix, synthesize_noise)
from anyorder.robustness.evaluate import batches, evaluation_subset, nullspace_invariance, order_groups
from anyorder.robustness.settings import SynthesisConfig
from anyorder.data.inputs import to_model_input
from anyorder.training.loop import train_model
from anyorder.training.settings import TrainConfig

from conftest import shipped_params, tiny_model


def _images(n=12, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


# -- exact nullspace -------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sequential", "ls_pos"])
def test_exact_nullspace_noise_as_large_as_the_image_leaves_the_logits_unchanged(variant):
    model = tiny_model(variant).eval()
    basis = exact_nullspace(model)
    weight = patch_embedding_matrix(model)
    rank = int(torch.linalg.matrix_rank(weight.double()))
    assert basis.dimension == 3 * 4 * 4 - rank == 48 - 32
    assert torch.allclose(weight.double() @ basis.basis,
                          torch.zeros(32, basis.dimension, dtype=torch.float64),
                          atol=1e-6)
    images = to_model_input(_images(), model.spec)
    noise = exact_noise_like(images, basis, 4, torch.Generator().manual_seed(0))
    # As large as the image, per image, and not trivially small anywhere.
    assert torch.allclose(noise.flatten(1).norm(dim=1), images.flatten(1).norm(dim=1), rtol=1e-4)
    with torch.no_grad():
        clean, noisy = model(images), model(images + noise)
        change = (noisy - clean).norm(dim=1) / clean.norm(dim=1)
        plain = model(images + torch.randn_like(images) * images.std())
    assert change.max() < 1e-4
    assert (noisy.argmax(1) == clean.argmax(1)).all()
    # The same amount of ordinary noise does change the logits: the check can fail.
    assert ((plain - clean).norm(dim=1) / clean.norm(dim=1)).min() > 1e-2


def test_without_a_nullspace_the_dimension_is_zero():
    model = tiny_model(patch_size=2, embed_dim=32)  # 3*2*2 = 12 <= 32
    basis = exact_nullspace(model)
    assert basis.dimension == 0 and basis.rank == 12
    images = to_model_input(_images(2), model.spec)
    assert not exact_noise_like(images, basis, 2, torch.Generator()).any()
    report = nullspace_invariance(model, _images(4), np.zeros(4, dtype=np.int64), _images(8),
                                  settings_from_dict(shipped_params()).robustness,
                                  SynthesisConfig(steps=1, batch_size=4, check_images=8),
                                  order_groups(model, 4, 1, 0), torch.device("cpu"))
    assert "has no nullspace: C*P*P = 12 inputs <= width 32" in report["exact"]["note"]


# -- approximate nullspace -------------------------------------------------------------------------

@pytest.mark.parametrize("variant", ["sequential", "ls"])
def test_synthesis_changes_no_weight_and_reports_what_it_did(variant):
    model = tiny_model(variant).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [p.requires_grad for p in model.parameters()]
    settings = SynthesisConfig(epsilon=1e-6, steps=4, batch_size=4, check_images=8)
    result = synthesize_noise(model, _images(8), settings, torch.Generator().manual_seed(0))
    assert result.noise.shape == (16, 32) and not result.noise.requires_grad
    assert result.steps == 4 and not result.converged  # epsilon out of reach: the whole budget
    assert result.moved > 0 and result.check_images == 8  # the noise itself was optimised
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None for p in model.parameters())
    assert [p.requires_grad for p in model.parameters()] == flags and model.training


def test_synthesis_stops_as_soon_as_the_outputs_barely_move():
    model = tiny_model()
    settings = SynthesisConfig(lim=1e-4, epsilon=0.01, batch_size=4, check_images=8)
    result = synthesize_noise(model, _images(8), settings, torch.Generator().manual_seed(0))
    assert result.converged and result.steps == 0 and result.distance < 0.01


@pytest.fixture(scope="module")
def trained_tiny(digits16):
    """A tiny ViT trained on the digits (what the synthesis meets in the pipeline: a model whose
    outputs are confident, not the near-uniform outputs of random weights)."""
    model = tiny_model(seed=0)
    cfg = TrainConfig(epochs=15, batch_size=64, lr=3e-3, schedule="cosine", warmup_epochs=1)
    history = train_model(model, digits16["train"], digits16["val"], cfg, seed=0,
                          progress=False).history
    assert history[-1]["val_accuracy_sequential"] > 0.8
    return model


@pytest.mark.slow
def test_synthesis_on_a_trained_model_converges_within_the_default_budget(digits16, trained_tiny):
    settings = SynthesisConfig()  # the defaults params.yaml also sets
    train_images = digits16["train"][0]
    result = synthesize_noise(trained_tiny, train_images, settings,
                              torch.Generator().manual_seed(0))
    assert result.converged, result
    assert 0 < result.steps < settings.steps and result.distance < settings.epsilon
    assert result.check_images == settings.check_images
    # Really optimised: far from its uniform start, and random noise of its norm moves the
    # outputs many times more than epsilon (the noise is not the random control in disguise).
    assert result.moved > 0.2
    assert result.random_distance > 10 * settings.epsilon


def test_synthesis_batches_mix_classes(monkeypatch):
    """The training split is stored in source order (sorted by class for an ImageFolder): every
    synthesis batch must still hold many classes."""
    import anyorder.robustness.nullspace as nullspace
    labels = np.repeat(np.arange(10), 30)                       # sorted by class
    images = np.repeat(labels[:, None, None, None] * 20, 16 * 16 * 3).reshape(300, 16, 16, 3)
    seen = []
    real = nullspace.to_model_input

    def spy(batch, spec, device="cpu"):
        seen.append(np.unique(np.asarray(batch)[:, 0, 0, 0]).size)
        return real(batch, spec, device)

    monkeypatch.setattr(nullspace, "to_model_input", spy)
    settings = SynthesisConfig(epsilon=1e-9, steps=5, batch_size=32, check_images=32)
    synthesize_noise(tiny_model(), images.astype(np.uint8), settings,
                     torch.Generator().manual_seed(0))
    assert len(seen) >= 5 and min(seen) >= 6  # 32 random images of 10 classes: >= 6 classes


def test_a_synthesis_that_misses_epsilon_fails_a_fine_tune_that_requires_convergence():
    from anyorder.robustness.nullspace import SynthesisNotConverged
    model = tiny_model()
    strict = SynthesisConfig(epsilon=1e-9, steps=2, batch_size=4, check_images=8,
                             require_convergence=True)
    with pytest.raises(SynthesisNotConverged, match="raise nullspace.synthesis.steps"):
        epoch_noise("nullspace", strict, _images(8))(model, torch.Generator().manual_seed(0))
    lenient = SynthesisConfig(epsilon=1e-9, steps=2, batch_size=4, check_images=8)
    with pytest.warns(UserWarning, match="did not reach epsilon"):
        _, record = epoch_noise("nullspace", lenient, _images(8))(model,
                                                                 torch.Generator().manual_seed(0))
    assert record["noise_converged"] is False and record["noise_steps"] == 2


def test_synthesised_noise_moves_the_outputs_less_than_random_noise_of_its_norm():
    model = tiny_model().eval()
    images = _images(16)
    settings = SynthesisConfig(lim=3.0, lr=0.1, epsilon=1e-9, steps=30, batch_size=16,
                               check_images=16)
    result = synthesize_noise(model, images, settings, torch.Generator().manual_seed(0))
    assert result.distance < result.random_distance
    control = torch.rand(16, 32, generator=torch.Generator().manual_seed(1)) * 2 - 1
    control = control * result.noise.norm() / control.norm()
    every = list(batches([(np.arange(16), None)], 16))
    ours = invariance(model, images, np.zeros(16, dtype=np.int64),
                      lambda b: {"patch_noise": result.noise}, every)
    theirs = invariance(model, images, np.zeros(16, dtype=np.int64),
                        lambda b: {"patch_noise": control}, every)
    assert ours["relative_logit_change_mean"] < theirs["relative_logit_change_mean"]


def test_a_noise_that_does_not_fit_the_model_is_refused():
    model = tiny_model()
    with pytest.raises(ValueError, match="does not fit the patch tokens"):
        model(to_model_input(_images(2), model.spec), patch_noise=torch.zeros(9, 32))


def test_nullspace_fine_tuning_trains_on_clean_and_noisy_images(digits16):
    cfg = TrainConfig(epochs=1, batch_size=64, lr=1e-3, schedule="constant")
    train = (digits16["train"][0][:128], digits16["train"][1][:128])
    settings = SynthesisConfig(steps=3, batch_size=64, check_images=64)
    results = {}
    for kind in ("nullspace", "none"):
        model = tiny_model("ls", seed=0)
        noise = epoch_noise(kind, settings, train[0])
        history = train_model(model, train, digits16["val"], cfg, seed=0, progress=False,
                              epoch_noise=noise).history
        results[kind] = (model.state_dict(), history[-1])
    assert results["nullspace"][1]["noise_norm"] > 0 and "noise_converged" in results["nullspace"][1]
    assert results["nullspace"][1]["train_noisy_loss"] > 0
    assert "noise_norm" not in results["none"][1]
    weights = results["nullspace"][0]["vit.head.weight"], results["none"][0]["vit.head.weight"]
    assert not torch.equal(*weights)  # the noisy term changed the training


# -- attacks ---------------------------------------------------------------------------------------

def _confident_tiny_model_and_data():
    model = tiny_model().eval()
    pixels = torch.as_tensor(_images(32)).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        labels = PixelModel(model)(pixels).argmax(1)  # 100% clean accuracy by construction
    return model, pixels, labels


@pytest.mark.parametrize("name", ["fgsm", "pgd"])
def test_attacks_lower_accuracy_and_keep_every_pixel_within_eps(name):
    model, pixels, labels = _confident_tiny_model_and_data()
    wrapped = PixelModel(model)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    eps = 8 / 255
    adv = attack(name, wrapped, pixels, labels, eps, steps=5,
                 generator=torch.Generator().manual_seed(0))
    assert (adv - pixels).abs().max() <= eps + 1e-6
    assert adv.min() >= 0 and adv.max() <= 1
    with torch.no_grad():
        assert (wrapped(adv).argmax(1) == labels).float().mean() < 0.9
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())


def test_fgsm_is_one_signed_gradient_step_and_pgd_with_one_step_equals_it():
    model, pixels, labels = _confident_tiny_model_and_data()
    wrapped = PixelModel(model)
    x = pixels.clone().requires_grad_(True)
    torch.nn.functional.cross_entropy(wrapped(x), labels, reduction="sum").backward()
    by_hand = (pixels + 4 / 255 * x.grad.sign()).clamp(0, 1)
    assert torch.equal(fgsm(wrapped, pixels, labels, 4 / 255), by_hand)
    one_step = pgd(wrapped, pixels, labels, 4 / 255, steps=1, step_size=4 / 255,
                   random_start=False)
    assert torch.allclose(one_step, by_hand, atol=1e-7)


def test_an_attack_sees_the_order_it_is_evaluated_in():
    model = tiny_model("ls").eval()
    pixels = torch.as_tensor(_images(8)).permute(0, 3, 1, 2).float() / 255
    labels = torch.zeros(8, dtype=torch.long)
    a = fgsm(PixelModel(model, [0, 1, 2, 3]), pixels, labels, 4 / 255)
    b = fgsm(PixelModel(model, [3, 2, 1, 0]), pixels, labels, 4 / 255)
    assert not torch.equal(a, b)


@pytest.mark.parametrize("eps", [-0.1, 1.5])
def test_an_eps_outside_the_unit_interval_is_refused(eps):
    model, pixels, labels = _confident_tiny_model_and_data()
    with pytest.raises(ValueError, match=r"must be in \[0, 1\]"):
        fgsm(PixelModel(model), pixels, labels, eps)


# -- corruptions -----------------------------------------------------------------------------------

@pytest.mark.parametrize("name", CORRUPTIONS)
def test_a_corruption_is_deterministic_for_a_seed_and_keeps_the_images_shape(name):
    images = _images(6, size=16)
    for severity in SEVERITIES:
        out = corrupt(images, name, severity, seed=3)
        assert out.shape == images.shape and out.dtype == np.uint8
        assert np.array_equal(out, corrupt(images, name, severity, seed=3))
    assert not np.array_equal(corrupt(images, name, 5, 3), images)


def test_random_corruptions_differ_between_seeds_and_grow_with_severity():
    images = np.full((4, 32, 32, 3), 128, dtype=np.uint8)
    assert not np.array_equal(corrupt(images, "gaussian_noise", 3, 0),
                              corrupt(images, "gaussian_noise", 3, 1))
    change = [np.abs(corrupt(images, "gaussian_noise", s, 0).astype(int) - 128).mean()
              for s in SEVERITIES]
    assert change == sorted(change)


def test_contrast_keeps_each_channels_mean_as_cifar_10_c():
    images = np.zeros((2, 32, 32, 3), dtype=np.uint8)
    images[..., 0], images[..., 1] = 200, 40                       # a red-ish, dark-blue image
    images[:, ::2, :, 2] = 100                                     # one channel with contrast
    out = corrupt(images, "contrast", 5).astype(float)
    assert np.abs(out.mean(axis=(1, 2)) - images.mean(axis=(1, 2))).max() <= 0.5
    assert out[..., 2].std() < images[..., 2].std() / 4            # contrast lowered x0.15


def test_zoom_blur_weights_the_unzoomed_image_as_cifar_10_c():
    from anyorder.robustness.corruptions import _center_zoom, _zoom_blur
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    for severity, top in enumerate([1.06, 1.11, 1.16, 1.21, 1.26], start=1):
        # CIFAR-10-C: out = sum of clipped_zoom(x, z) over z in arange(1, top, 0.01) (1.00 gives
        # x itself); x = (x + out) / (len(z) + 1)
        zooms = np.arange(1, top, 0.01)
        out = sum(x if z == 1 else _center_zoom(x, float(z)) for z in zooms)
        expected = (x + out) / (len(zooms) + 1)
        assert torch.allclose(_zoom_blur(x, severity, None, 1.0), expected, atol=1e-6)


def test_an_unknown_corruption_or_severity_is_refused():
    with pytest.raises(ValueError, match="unknown corruption 'rain'"):
        corrupt(_images(1), "rain", 1)
    with pytest.raises(ValueError, match="severity"):
        corrupt(_images(1), "fog", 6)


# -- evaluation groups -----------------------------------------------------------------------------

def test_ls_models_are_evaluated_in_random_orders_and_the_baseline_sequentially():
    assert list(order_groups(tiny_model(), 10, 3, 0)) == ["sequential"]
    groups = order_groups(tiny_model("ls"), 10, 3, 0)["random_orders"]
    assert sorted(np.concatenate([index for index, _ in groups]).tolist()) == list(range(10))
    assert len({tuple(order) for _, order in groups}) == len(groups) > 1
    assert evaluation_subset(10, 4, 0).tolist() == evaluation_subset(10, 4, 0).tolist()
    assert len(evaluation_subset(10, 4, 0)) == 4 and len(evaluation_subset(10, None, 0)) == 10



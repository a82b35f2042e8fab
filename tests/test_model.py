"""The wrapper runs exactly the blocks it is told, in the order it is told."""
import dataclasses
import re

import pytest
import torch
from safetensors.torch import save_file

from anyorder.model.spec import ModelSettingsError
from anyorder.model.vit import VARIANTS, build_model

from conftest import tiny_model, tiny_spec


def record_block_calls(model):
    calls = []
    for index, block in enumerate(model.vit.blocks):
        block.register_forward_hook(lambda module, args, out, index=index: calls.append(index))
    return calls


@pytest.mark.parametrize("variant", VARIANTS)
def test_blocks_run_in_the_given_order(variant):
    model = tiny_model(variant, depth=5).eval()
    calls = record_block_calls(model)
    images = torch.randn(3, 3, 16, 16)
    model(images, [3, 0, 4, 1, 2])
    assert calls == [3, 0, 4, 1, 2]
    calls.clear()
    model(images)  # default: sequential
    assert calls == [0, 1, 2, 3, 4]
    calls.clear()
    model(images, [4, 2])  # pruned: only those two, in that order
    assert calls == [4, 2]


def test_order_changes_the_output_and_matches_a_manual_chain():
    model = tiny_model("ls", depth=4).eval()
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_stem(images)
        for block_index in [2, 0, 3, 1]:
            tokens = model.vit.blocks[block_index](tokens)
        manual = model.forward_head(tokens)
        assert torch.allclose(model(images, [2, 0, 3, 1]), manual, atol=1e-6)
        assert not torch.allclose(model(images, [2, 0, 3, 1]), model(images), atol=1e-4)


@pytest.mark.parametrize("variant", VARIANTS)
def test_per_sample_orders_equal_running_each_sample_alone(variant):
    model = tiny_model(variant, depth=4).eval()
    if variant == "ls_pos":
        torch.nn.init.normal_(model.slot_table)  # make slots matter
        for adapter in model.slot_adapters:
            torch.nn.init.normal_(adapter.proj.weight, std=0.2)
    images = torch.randn(4, 3, 16, 16)
    orders = torch.tensor([[0, 1, 2, 3], [3, 2, 1, 0], [1, 3, 0, 2], [0, 1, 2, 3]])
    with torch.no_grad():
        together = model.forward_detailed(images, orders)
        for row in range(4):
            alone = model.forward_detailed(images[row:row + 1], orders[row].tolist())
            assert torch.allclose(together.logits[row], alone.logits[0], atol=1e-5)
            if variant == "ls_pred":
                assert torch.allclose(together.position_logits[:, row], alone.position_logits[:, 0],
                                      atol=1e-5)


def test_ls_pos_tells_each_block_its_slot():
    model = tiny_model("ls_pos", depth=3).eval()
    torch.nn.init.normal_(model.slot_table)
    for adapter in model.slot_adapters:
        torch.nn.init.normal_(adapter.proj.weight, std=0.2)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        tokens = model.forward_stem(images)
        # Block 2 at slot 0, block 0 at slot 1: the table row is the slot, not the block index.
        for slot, block_index in enumerate([2, 0]):
            tokens = model.slot_adapters[block_index](tokens, model.slot_table[slot])
            tokens = model.vit.blocks[block_index](tokens)
        assert torch.allclose(model(images, [2, 0]), model.forward_head(tokens), atol=1e-6)


def test_ls_pos_adapter_starts_as_identity():
    """A fresh LS-pos model computes exactly what the sequential model it is loaded from does."""
    base = tiny_model("sequential").eval()
    pos = build_model(tiny_spec("ls_pos")).eval()
    pos.load_state_dict(base.state_dict(), strict=False)
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(pos(images, [1, 3, 0, 2]), base(images, [1, 3, 0, 2]), atol=1e-6)


def test_ls_pred_heads_predict_the_slot_they_ran_at():
    """Slot s is judged by the head of the block that ran there, on that block's output."""
    model = tiny_model("ls_pred", depth=4).eval()
    images = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        out = model.forward_detailed(images, [3, 0])
        assert out.position_logits.shape == (2, 5, 4)  # slots run, batch, depth
        assert out.position_targets.tolist() == [[0] * 5, [1] * 5]
        tokens = model.forward_stem(images)
        for slot, block_index in enumerate([3, 0]):
            tokens = model.vit.blocks[block_index](tokens)
            expected = model.position_heads[block_index](tokens)
            assert torch.allclose(out.position_logits[slot], expected, atol=1e-6), slot
            # The head of the slot's index (a plausible bug) gives something else.
            assert not torch.allclose(out.position_logits[slot],
                                      model.position_heads[slot](tokens), atol=1e-3)


@pytest.mark.parametrize("variant", ["ls_pred", "ls_pos", "ls"])
def test_per_sample_orders_run_under_bf16_autocast(variant):
    """Under autocast a block or head returns bf16 for fp32 tokens (CUDA training uses bf16);
    the per-sample path gathers into buffers of that dtype instead of failing."""
    model = tiny_model(variant, depth=3).eval()
    orders = torch.tensor([[0, 1, 2], [2, 1, 0], [1, 0, 2]])
    images = torch.randn(3, 3, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        together = model.forward_detailed(images, orders)
        alone = model.forward_detailed(images[1:2], orders[1].tolist())
    assert torch.isfinite(together.logits.float()).all()
    assert torch.allclose(together.logits[1].float(), alone.logits[0].float(), atol=0.05)
    if variant == "ls_pred":
        assert together.position_logits.shape == (3, 3, 3)


@pytest.mark.parametrize("order,message", [
    ([0, 0, 1], "repeats"), ([0, 7], "outside"), ([-1], "outside"), ([], "non-empty"),
])
def test_bad_orders_are_refused(order, message):
    model = tiny_model("ls", depth=4)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(1, 3, 16, 16), order)


def test_prune_layers_keeps_sequential_order_of_the_kept_blocks():
    model = tiny_model("ls", depth=6)
    assert model.prune_layers([5, 1, 3]) == [1, 3, 5]


def test_any_timm_vit_architecture_works():
    model = build_model(tiny_spec("ls", arch="deit_tiny_patch16_224", num_heads=2))
    assert model(torch.randn(2, 3, 16, 16), [1, 0]).shape == (2, 10)


@pytest.mark.parametrize("arch,message", [("resnet18", "not a timm VisionTransformer"),
                                          ("no_such_model", "no model named")])
def test_unknown_or_non_vit_architectures_are_refused(arch, message):
    with pytest.raises(ValueError, match=message):
        build_model(tiny_spec("ls", arch=arch))


def test_pretrained_weights_load_from_a_local_file(tmp_path):
    """Users with timm weights on disk: the blocks come from the file (nothing downloads)."""
    import timm
    torch.manual_seed(123)
    source = timm.create_model("vit_tiny_patch16_224", **tiny_spec().timm_kwargs())
    weights = tmp_path / "vit_tiny.safetensors"
    save_file(source.state_dict(), str(weights))
    model = build_model(tiny_spec(), pretrained=str(weights))
    for key in ("blocks.0.attn.qkv.weight", "patch_embed.proj.weight", "pos_embed"):
        assert torch.equal(model.vit.state_dict()[key], source.state_dict()[key]), key
    with pytest.raises(ModelSettingsError, match="model.pretrained: no such weights file"):
        build_model(tiny_spec(), pretrained=str(tmp_path / "missing.safetensors"))
    # Weights of another shape: a clear error naming the setting, not a torch traceback.
    with pytest.raises(ModelSettingsError, match="model.pretrained: the weights .* do not load"):
        build_model(tiny_spec(embed_dim=16), pretrained=str(weights))
    pickle = tmp_path / "weights.pth"
    torch.save(source.state_dict(), pickle)
    with pytest.raises(ModelSettingsError, match="not a .safetensors file"):
        build_model(tiny_spec(), pretrained=str(pickle))


def test_timm_weights_load_strictly_and_a_file_that_does_not_fit_is_refused_by_key(tmp_path):
    """Every tensor of the model comes from the file and every tensor of the file is used; only a
    classifier for another number of classes stays fresh (and is named); another image grid is
    resampled as timm does."""
    import timm
    torch.manual_seed(7)
    source = timm.create_model("vit_tiny_patch16_224", **{
        **tiny_spec().timm_kwargs(), "num_classes": 1000, "img_size": 32})
    state = source.state_dict()
    weights = tmp_path / "vit.safetensors"
    save_file(state, str(weights))
    model = build_model(tiny_spec(), pretrained=str(weights))  # 10 classes, 16 px: 4x4 patches
    loaded = model.vit.state_dict()
    assert torch.equal(loaded["blocks.3.mlp.fc2.weight"], state["blocks.3.mlp.fc2.weight"])
    assert loaded["pos_embed"].shape == (1, 17, 32) and state["pos_embed"].shape == (1, 65, 32)
    assert loaded["head.weight"].shape == (10, 32)
    missing, extra = dict(state), {**state, "blocks.9.norm1.weight": torch.ones(32)}
    del missing["blocks.1.attn.proj.bias"]
    for name, tensors, message in (("missing", missing, "the model's blocks.1.attn.proj.bias "
                                    "missing from the file"),
                                   ("extra", extra, "the file's blocks.9.norm1.weight unknown "
                                    "to the model")):
        save_file(tensors, str(tmp_path / f"{name}.safetensors"))
        with pytest.raises(ModelSettingsError) as info:
            build_model(tiny_spec(), pretrained=str(tmp_path / f"{name}.safetensors"))
        assert str(info.value).startswith("model.pretrained: the weights ")
        assert message in str(info.value)



def test_timms_own_weights_from_the_hugging_face_cache_load_strictly(tmp_path, monkeypatch):
    import huggingface_hub.constants
    import timm
    repo = tmp_path / "models--timm--vit_tiny_patch16_224.augreg_in21k_ft_in1k"
    (repo / "snapshots" / "abc").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    state = timm.create_model("vit_tiny_patch16_224").state_dict()  # timm's shapes, 1000 classes
    spec = tiny_spec(img_size=32, patch_size=16, embed_dim=192, depth=12, num_heads=3,
                     mlp_ratio=4.0)
    save_file(state, str(repo / "snapshots" / "abc" / "model.safetensors"))
    model = build_model(spec, pretrained="timm")
    assert torch.equal(model.vit.state_dict()["blocks.11.mlp.fc1.weight"],
                       state["blocks.11.mlp.fc1.weight"])
    del state["blocks.11.norm2.weight"]
    save_file(state, str(repo / "snapshots" / "abc" / "model.safetensors"))
    with pytest.raises(ModelSettingsError, match="the model's blocks.11.norm2.weight missing"):
        build_model(spec, pretrained="timm")

def test_uniform_drop_path_follows_no_block_index():
    model = build_model(tiny_spec("ls", drop_path_rate=0.2))
    rates = {block.drop_path1.drop_prob for block in model.vit.blocks}
    assert rates == {0.2}


def test_image_noise_in_the_patch_embedding_nullspace_changes_no_logit():
    """The configured model leaves room for the nullspace issue, and the stem cuts images into
    patches the way the nullspace of the flattened (D, C*P*P) weight assumes (channel-major,
    then rows, then columns): noise built from that basis, patch by patch, is invisible."""
    from anyorder.config import load_settings
    from conftest import ROOT
    m = load_settings(ROOT / "params.yaml").model
    assert 3 * m.known("patch_size") ** 2 > m.known("embed_dim"), \
        "the default model must have a nullspace"
    model = tiny_model("ls").eval()  # patch 4, width 32: 48 inputs, nullspace of dimension 16
    weight = model.vit.patch_embed.proj.weight.detach().reshape(32, -1).double()
    _, singular, vh = torch.linalg.svd(weight)
    basis = vh[int((singular > 1e-6 * singular[0]).sum()):]  # (16, 48)
    assert basis.shape == (48 - 32, 48)
    images = torch.randn(4, 3, 16, 16)
    coefficients = torch.randn(4, 4, 4, basis.shape[0], dtype=torch.float64)  # per patch
    patches = (coefficients @ basis).float().reshape(4, 4, 4, 3, 4, 4)  # N, rows, cols, C, P, P
    noise = patches.permute(0, 3, 1, 4, 2, 5).reshape(4, 3, 16, 16)
    noise *= images.norm() / noise.norm()  # as large as the image itself
    with torch.no_grad():
        clean, noisy = model(images, [2, 0, 3, 1]), model(images + noise, [2, 0, 3, 1])
    assert (clean - noisy).norm() / clean.norm() < 1e-4
    # The same vectors read channel-last within each patch (a plausible bug) are not invisible.
    wrong = (coefficients @ basis).float().reshape(4, 4, 4, 4, 4, 3)  # N, rows, cols, P, P, C
    wrong = wrong.permute(0, 5, 1, 3, 2, 4).reshape(4, 3, 16, 16)
    wrong *= images.norm() / wrong.norm()
    with torch.no_grad():
        assert (clean - model(images + wrong, [2, 0, 3, 1])).norm() / clean.norm() > 1e-3


def test_initialisation_is_seeded_and_leaves_global_state_alone():
    state = torch.random.get_rng_state()
    a, b, c = (build_model(tiny_spec("ls_pos"), seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)


NAMES = [str(i) for i in range(10)]


# The default model's spec before model.arch took presets (params.yaml: vit_tiny_patch16_224 with
# patch_size 8, embed_dim 64, depth 8, num_heads 4, mlp_ratio 2.0; data.image_size 32): the
# cpu_tiny preset must give it byte for byte, so that model.json and checkpoints do not change.
CPU_TINY_SPEC = {
    "arch": "vit_tiny_patch16_224", "num_classes": 10, "img_size": 32, "variant": "sequential",
    "patch_size": 8, "embed_dim": 64, "depth": 8, "num_heads": 4, "mlp_ratio": 2.0,
    "drop_path_rate": 0.0, "position_embedding_dim": 32, "slot_tables": "shared",
    "mean": [0.5, 0.5, 0.5], "std": [0.5, 0.5, 0.5], "class_names": NAMES}


def test_the_cpu_tiny_preset_is_the_default_and_resolves_to_the_same_spec_as_before():
    from anyorder.config import load_settings
    from anyorder.model.spec import model_spec, resolve_image_size
    from conftest import ROOT
    settings = load_settings(ROOT / "params.yaml")
    m = settings.model
    assert (m.arch, settings.data.image_size) == ("cpu_tiny", None)
    size = resolve_image_size(m, settings.data.image_size)
    assert size == 32
    assert model_spec(m, size, NAMES).to_dict() == CPU_TINY_SPEC
    assert model_spec(m, None, NAMES).to_dict() == CPU_TINY_SPEC  # None: the same rule


def test_a_timm_name_means_timms_model_its_input_size_and_normalisation():
    import timm
    from anyorder.model.settings import ModelConfig
    from anyorder.model.spec import model_spec, resolve_image_size
    m = ModelConfig(arch="vit_small_patch16_224")
    assert resolve_image_size(m, None) == 224
    spec = model_spec(m, None, NAMES)
    cfg = timm.models.get_pretrained_cfg("vit_small_patch16_224")
    assert (spec.arch, spec.img_size, spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads,
            spec.mlp_ratio) == ("vit_small_patch16_224", 224, 16, 384, 12, 6, 4.0)
    assert (spec.mean, spec.std) == (tuple(cfg.mean), tuple(cfg.std)) == (
        (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))
    deit = model_spec(ModelConfig(arch="deit_tiny_patch16_224"), None, NAMES)
    assert deit.mean == pytest.approx((0.485, 0.456, 0.406))  # timm's ImageNet values there
    assert deit.std == pytest.approx((0.229, 0.224, 0.225))
    assert model_spec(ModelConfig(arch="vit_base_patch16_384"), None, NAMES).img_size == 384


def test_overrides_apply_on_top_of_a_preset_or_a_timm_model():
    from anyorder.model.settings import ModelConfig, ModelOverrides
    from anyorder.model.spec import model_spec, resolve_image_size
    shallow = model_spec(ModelConfig(overrides=ModelOverrides(depth=4)), None, NAMES)
    assert (shallow.depth, shallow.embed_dim, shallow.patch_size, shallow.img_size) == (4, 64, 8, 32)
    m = ModelConfig(arch="vit_small_patch16_224", overrides=ModelOverrides(
        img_size=64, mean=[0.1, 0.2, 0.3], std=[0.4, 0.5, 0.6], patch_size=8))
    assert resolve_image_size(m, None) == 64
    spec = model_spec(m, None, NAMES)
    assert (spec.img_size, spec.patch_size, spec.embed_dim) == (64, 8, 384)
    assert (spec.mean, spec.std) == ((0.1, 0.2, 0.3), (0.4, 0.5, 0.6))
    assert model_spec(m, None, NAMES).to_dict()["mean"] == [0.1, 0.2, 0.3]


def test_data_image_size_null_follows_the_model_and_a_set_one_is_checked():
    from anyorder.model.settings import ModelConfig, ModelOverrides
    from anyorder.model.spec import model_spec, resolve_image_size
    from anyorder.settings import ConfigError
    assert resolve_image_size(ModelConfig(), None) == 32                   # the preset's
    assert resolve_image_size(ModelConfig(), 48) == 48                     # data.image_size wins
    assert resolve_image_size(ModelConfig(overrides=ModelOverrides(img_size=16)), None) == 16
    assert resolve_image_size(ModelConfig(arch="vit_small_patch16_224"), None) == 224
    assert resolve_image_size(ModelConfig(arch="vit_small_patch16_224"), 96) == 96
    with pytest.raises(ConfigError, match=re.escape(
            "data.image_size: must be divisible by the patch size (model.overrides.patch_size="
            "null (preset cpu_tiny's 8)), got 20")):
        resolve_image_size(ModelConfig(), 20)
    with pytest.raises(ConfigError, match=re.escape(
            "data.image_size: must be divisible by the patch size (model.overrides.patch_size="
            "null (timm's for vit_small_patch16_224: 16)), got 100")):
        resolve_image_size(ModelConfig(arch="vit_small_patch16_224"), 100)
    with pytest.raises(ConfigError, match=re.escape(
            "model.overrides.img_size: model.overrides.patch_size=null (timm's for "
            "vit_small_patch16_224: 16) must divide the model's input size "
            "(model.overrides.img_size=40")):
        resolve_image_size(ModelConfig(arch="vit_small_patch16_224",
                                       overrides=ModelOverrides(img_size=40)), None)
    # Stored at one size, the model at another: prepared at data.image_size, resized on the fly.
    smaller = ModelConfig(overrides=ModelOverrides(img_size=16))
    assert resolve_image_size(smaller, 32) == 32
    assert model_spec(smaller, 32, NAMES).img_size == 16
    with pytest.raises(ConfigError, match=re.escape(
            "model.overrides.img_size: model.overrides.patch_size=null (preset cpu_tiny's 8) must "
            "divide the model's input size (model.overrides.img_size=20)")):
        resolve_image_size(ModelConfig(overrides=ModelOverrides(img_size=20)), 32)


def test_null_overrides_take_timms_values_and_are_still_checked():
    from anyorder.model.settings import ModelConfig, ModelOverrides
    from anyorder.model.spec import model_spec
    timm_values = ModelConfig(arch="vit_tiny_patch16_224")
    spec = model_spec(timm_values, 32, NAMES)
    assert (spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio) == (
        16, 192, 12, 3, 4.0)  # vit_tiny_patch16_224 as timm defines it
    with pytest.raises(ModelSettingsError, match=re.escape(
            "model.overrides.patch_size: model.overrides.patch_size=null (timm's for "
            "vit_tiny_patch16_224: 16) must divide the image size 28")):
        model_spec(timm_values, 28, NAMES)
    with pytest.raises(ModelSettingsError, match=re.escape(
            "model.overrides.embed_dim: model.overrides.num_heads=null (timm's for "
            "vit_tiny_patch16_224: 3) must divide model.overrides.embed_dim=64")):
        model_spec(dataclasses.replace(timm_values, overrides=ModelOverrides(embed_dim=64)), 32,
                   NAMES)


def test_a_typo_in_the_architecture_suggests_the_real_name():
    from anyorder.model.settings import ModelConfig
    from anyorder.model.spec import model_spec
    with pytest.raises(ModelSettingsError, match="did you mean vit_tiny_patch16_224"):
        model_spec(ModelConfig(arch="vit_tiny_patch16_244"), 32, NAMES)
    with pytest.raises(ModelSettingsError) as info:
        model_spec(ModelConfig(arch="cpu_tiyn"), None, NAMES)
    message = str(info.value)
    assert message.startswith("model.arch: timm has no model named 'cpu_tiyn'; did you mean "
                              "cpu_tiny")
    assert "a preset of this project, cpu_tiny, or any timm VisionTransformer name" in message


@pytest.mark.parametrize("pretrained", ["timm", "models/weights/vit.safetensors"])
def test_pretrained_weights_with_the_from_scratch_preset_are_refused(pretrained):
    from anyorder.config import settings_from_dict
    from anyorder.model.settings import ModelConfig
    from conftest import shipped_params
    expected = (f"model.pretrained: cpu_tiny is a from-scratch preset of this project (timm's "
                f"vit_tiny_patch16_224 with patch_size 8, embed_dim 64, depth 8, num_heads 4, "
                f"mlp_ratio 2.0, 32x32 images): no pre-trained weights have its shapes. To start "
                f"from {pretrained!r}, set model.arch to the timm model the weights are for")
    with pytest.raises(ModelSettingsError, match=re.escape(expected)):
        settings_from_dict(shipped_params({"model": {"pretrained": pretrained}}))
    with pytest.raises(ModelSettingsError, match=re.escape(expected)):
        ModelConfig(pretrained=pretrained).check("model", None)
    # A timm name takes them (the weights themselves are checked when the model is built).
    ModelConfig(arch="vit_small_patch16_224", pretrained=pretrained).check("model", None)


def test_timm_weights_refuse_overrides_that_change_their_shapes():
    with pytest.raises(ModelSettingsError) as info:
        build_model(tiny_spec(), pretrained="timm")
    assert "model.overrides.embed_dim=32 (timm: 192)" in str(info.value)
    assert "model.overrides.depth=4 (timm: 12)" in str(info.value)


@pytest.mark.parametrize("offline", [True, False])
def test_timm_weights_without_cache_or_hub_fail_in_seconds(monkeypatch, tmp_path, offline):
    """timm itself retries the hub for about a minute, then fails with a long traceback."""
    import time
    from huggingface_hub import constants
    from anyorder.model.spec import architecture_defaults
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path))       # nothing cached
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", offline)
    monkeypatch.setattr(constants, "ENDPOINT", "https://127.0.0.1")     # nothing listens there
    spec = tiny_spec(**{**architecture_defaults("vit_tiny_patch16_224"), "img_size": 32})
    started = time.monotonic()
    with pytest.raises(ModelSettingsError) as info:
        build_model(spec, pretrained="timm")
    assert time.monotonic() - started < 10
    message = str(info.value)
    assert message.startswith("model.pretrained: timm's weights for vit_tiny_patch16_224 are "
                              "not in the local cache")
    assert ("HF_HUB_OFFLINE is set" if offline else "127.0.0.1") in message
    assert "models/weights/" in message


def test_plain_and_fused_attention_compute_the_same_function():
    # Training on CPU switches timm's attention to its plain form (anyorder.training.loop): it must be
    # the same function, gradients included, or CPU- and GPU-trained models would differ.
    model = tiny_model("ls", seed=0)
    images = torch.randn(3, 3, 16, 16)
    outputs, grads = [], []
    for fused in (True, False):
        model.use_fused_attention(fused)
        model.zero_grad()
        logits = model(images, [2, 0, 3, 1])
        logits.sum().backward()
        outputs.append(logits.detach())
        grads.append(model.vit.blocks[0].attn.qkv.weight.grad.clone())
    assert all(not m.fused_attn for m in model.modules() if hasattr(m, "fused_attn"))
    assert torch.allclose(outputs[0], outputs[1], atol=1e-5)
    assert torch.allclose(grads[0], grads[1], atol=1e-5)


def _start_model(tmp_path, rename=None, depth=4):
    """A pre-trained (sequential) start model on disk, optionally with one key renamed."""
    from anyorder.model.checkpoint import WEIGHTS, save_model
    start = tiny_model(depth=depth, seed=1)
    save_model(start, tmp_path / "start")
    if rename:
        from safetensors.torch import load_file
        state = load_file(tmp_path / "start" / WEIGHTS)
        state[rename[1]] = state.pop(rename[0])
        save_file(state, tmp_path / "start" / WEIGHTS)
    return start


@pytest.mark.parametrize("variant", VARIANTS)
def test_a_fine_tune_takes_every_start_weight_and_keeps_only_its_variant_parts_fresh(tmp_path,
                                                                                      variant):
    from anyorder.model.checkpoint import load_start_weights
    start = _start_model(tmp_path)
    model = tiny_model(variant, seed=2)
    fresh = {k: v.clone() for k, v in model.state_dict().items()}
    load_start_weights(model, tmp_path / "start")
    for key, value in model.state_dict().items():
        expected = fresh[key] if key.startswith(model.variant_parts()) else start.state_dict()[key]
        assert torch.equal(value, expected), key
    assert any(k.startswith(model.variant_parts()) for k in fresh) == (variant in ("ls_pos",
                                                                                  "ls_pred"))
    shallow = tiny_model(variant, depth=2, seed=2)  # a shallower model: the first two blocks
    load_start_weights(shallow, tmp_path / "start")
    assert torch.equal(shallow.vit.blocks[1].mlp.fc1.weight, start.vit.blocks[1].mlp.fc1.weight)


def test_a_fine_tune_refuses_a_start_with_a_renamed_key(tmp_path):
    from anyorder.model.checkpoint import CheckpointError, load_start_weights
    _start_model(tmp_path, rename=("vit.blocks.2.norm1.weight", "vit.blocks.2.ln_1.weight"))
    model = tiny_model("ls_pos", seed=2)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"missing from the start \(1\): "
                                              r"vit\.blocks\.2\.norm1\.weight.*not used by this "
                                              r"model \(1\): vit\.blocks\.2\.ln_1\.weight"):
        load_start_weights(model, tmp_path / "start")
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())  # untouched
    _start_model(tmp_path, depth=4)
    wider = tiny_model(embed_dim=48, num_heads=2, seed=2)
    with pytest.raises(CheckpointError, match="of another shape"):
        load_start_weights(wider, tmp_path / "start")

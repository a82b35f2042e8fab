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
    assert 3 * m.patch_size ** 2 > m.embed_dim, "the default model must have a nullspace"
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


def test_null_overrides_take_timms_values_and_are_still_checked():
    from anyorder.model.settings import ModelConfig
    from anyorder.model.spec import model_spec
    timm_values = ModelConfig(patch_size=None, embed_dim=None, depth=None, num_heads=None,
                              mlp_ratio=None)
    spec = model_spec(timm_values, 32, NAMES)
    assert (spec.patch_size, spec.embed_dim, spec.depth, spec.num_heads, spec.mlp_ratio) == (
        16, 192, 12, 3, 4.0)  # vit_tiny_patch16_224 as timm defines it
    with pytest.raises(ModelSettingsError, match=re.escape(
            "model.patch_size: model.patch_size=null (timm's 16 for vit_tiny_patch16_224) must "
            "divide data.image_size=28")):
        model_spec(timm_values, 28, NAMES)
    with pytest.raises(ModelSettingsError, match=re.escape(
            "model.num_heads: model.num_heads=null (timm's 3 for vit_tiny_patch16_224) must "
            "divide model.embed_dim=64")):
        model_spec(dataclasses.replace(timm_values, embed_dim=64), 32, NAMES)


def test_a_typo_in_the_architecture_suggests_the_real_name():
    from anyorder.model.settings import ModelConfig
    from anyorder.model.spec import model_spec
    with pytest.raises(ModelSettingsError, match="did you mean vit_tiny_patch16_224"):
        model_spec(ModelConfig(arch="vit_tiny_patch16_244"), 32, NAMES)


def test_timm_weights_refuse_overrides_that_change_their_shapes():
    with pytest.raises(ModelSettingsError) as info:
        build_model(tiny_spec(), pretrained="timm")
    assert "model.embed_dim=32 (timm: 192)" in str(info.value)
    assert "model.depth=4 (timm: 12)" in str(info.value)


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

"""The wrapper runs exactly the blocks it is told, in the order it is told."""
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from anyorder.model import VARIANTS, build_model

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
    model = tiny_model("ls_pred", depth=4).eval()
    out = model.forward_detailed(torch.randn(5, 3, 16, 16), [3, 1])
    assert out.position_logits.shape == (2, 5, 4)  # slots run, batch, depth
    assert out.position_targets.tolist() == [[0] * 5, [1] * 5]


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
    with pytest.raises(FileNotFoundError, match="no such weights file"):
        build_model(tiny_spec(), pretrained=str(tmp_path / "missing.safetensors"))


def test_uniform_drop_path_follows_no_block_index():
    model = build_model(tiny_spec("ls", drop_path_rate=0.2))
    rates = {block.drop_path1.drop_prob for block in model.vit.blocks}
    assert rates == {0.2}


def test_patch_embedding_has_a_nontrivial_nullspace_by_default():
    """The default CPU model must leave room for the nullspace issue: C*P*P > embed_dim."""
    from anyorder.config import Settings
    m = Settings().model
    assert 3 * m.patch_size ** 2 > m.embed_dim
    weight = tiny_model().vit.patch_embed.proj.weight.detach().reshape(32, -1).numpy()
    assert weight.shape[1] - np.linalg.matrix_rank(weight) > 0


def test_initialisation_is_seeded_and_leaves_global_state_alone():
    state = torch.random.get_rng_state()
    a, b, c = (build_model(tiny_spec("ls_pos"), seed=s) for s in (3, 3, 4))
    assert torch.equal(torch.random.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    assert not torch.equal(a.vit.blocks[0].attn.qkv.weight, c.vit.blocks[0].attn.qkv.weight)

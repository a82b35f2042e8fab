"""Per-block ONNX export: the contract holds for every variant and for another timm
architecture, the graphs equal PyTorch, the files are the same for the same model, and a failed
export leaves the previous one as it was."""
import json

import numpy as np
import onnx
import pytest
import torch

from anyorder.export import blocks as export
from anyorder.export.blocks import check_export, export_model
from anyorder.model.vit import VARIANTS, build_model
from anyorder.export.runtime import BlockRuntime, read_manifest

from conftest import tiny_model, tiny_spec


def with_slots_that_matter(model):
    """An LS-pos model as a fresh one is an exact copy of its start (zero adapters): give the
    slot table and adapters weights, so running a block at the wrong slot shows."""
    if model.variant == "ls_pos":
        torch.manual_seed(1)
        torch.nn.init.normal_(model.slot_table)
        for adapter in model.slot_adapters:
            torch.nn.init.normal_(adapter.proj.weight, std=0.2)
    return model


@pytest.fixture(scope="module", params=VARIANTS)
def exported(request, tmp_path_factory):
    model = with_slots_that_matter(tiny_model(request.param, depth=3)).eval()
    out = tmp_path_factory.mktemp(request.param) / "export"
    manifest = export_model(model, out, f"tiny-{request.param}", opset=17,
                            accuracies={"sequential": 0.5, "arbitrary": {"mean": 0.4}})
    return model, out, manifest


def test_the_contract_holds_for_every_variant(exported):
    model, out, manifest = exported
    names = sorted(p.name for p in out.iterdir())
    assert names == sorted(["manifest.json", "stem.onnx", "head.onnx",
                            "block_00.onnx", "block_01.onnx", "block_02.onnx"])
    assert read_manifest(out) == manifest
    slotted = model.variant == "ls_pos"
    signatures = {}
    for name in ("stem.onnx", "block_00.onnx", "block_01.onnx", "head.onnx"):
        graph = onnx.load(str(out / name))
        onnx.checker.check_model(graph, full_check=True)
        assert {o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")} == {17}
        assert all(t.data_location != onnx.TensorProto.EXTERNAL for t in graph.graph.initializer)
        dims = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*graph.graph.input, *graph.graph.output]}
        signatures[name] = dims
    # Only the batch axis is dynamic; every block has the one signature of the contract.
    assert signatures["stem.onnx"] == {"images": ["batch", 3, 16, 16],
                                       "tokens": ["batch", 17, 32]}
    block = {"tokens": ["batch", 17, 32], "tokens_out": ["batch", 17, 32],
             **({"slot": [1]} if slotted else {})}
    assert signatures["block_00.onnx"] == signatures["block_01.onnx"] == block
    assert signatures["head.onnx"] == {"tokens": ["batch", 17, 32], "logits": ["batch", 10]}
    assert manifest["slot_input"] is slotted and manifest["variant"] == model.variant
    assert manifest["accuracy"]["sequential"] == 0.5
    assert {"onnx", "onnxruntime", "torch", "timm"} <= set(manifest["versions"])


def test_every_graph_and_every_chain_equals_pytorch(exported):
    model, out, _ = exported
    check = check_export(model, out, num_orders=10, seed=3)
    assert check["max_abs_error"] <= 1e-4, check
    assert check["prediction_agreement"] == 1.0
    # Sequential, then 10 distinct seeded random orders (all 3! = 6 of them at depth 3).
    assert len(check["orders_checked"]) == 1 + min(10, 6)
    assert set(check["chains"]) == {"batch_1", "batch_32"}


def test_ls_pos_blocks_take_their_slot(tmp_path):
    """The slot input changes an LS-pos block's output (and nothing else has one)."""
    model = with_slots_that_matter(tiny_model("ls_pos", depth=3)).eval()
    export_model(model, tmp_path / "export", "pos")
    runtime = BlockRuntime(tmp_path / "export", compose_cache=0)
    tokens = np.random.default_rng(0).standard_normal((2, 17, 32)).astype(np.float32)
    at = {slot: runtime.blocks[1].run(None, runtime._block_feed(tokens, slot))[0]
          for slot in (0, 2)}
    assert np.abs(at[0] - at[2]).max() > 1e-3


def test_another_timm_architecture_exports(tmp_path):
    model = build_model(tiny_spec("ls", arch="deit_tiny_patch16_224", num_heads=2), seed=0)
    export_model(model, tmp_path / "deit", "deit")
    assert check_export(model, tmp_path / "deit", num_orders=10)["max_abs_error"] <= 1e-4


def test_the_same_model_exports_the_same_bytes(exported, tmp_path):
    model, out, manifest = exported
    again = export_model(model, tmp_path / "again", manifest["name"], opset=17,
                         accuracies=manifest["accuracy"])
    assert again == manifest
    for file in out.iterdir():
        assert (tmp_path / "again" / file.name).read_bytes() == file.read_bytes(), file.name


def test_a_failed_export_leaves_the_previous_one(tmp_path, monkeypatch):
    model = tiny_model("ls", depth=2)
    out = tmp_path / "export"
    export_model(model, out, "v1")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken(path, opset):
        if path.name == "head.onnx":
            raise RuntimeError("the checker refused head.onnx")

    monkeypatch.setattr(export, "_check_graph", broken)
    with pytest.raises(RuntimeError, match="refused head.onnx"):
        export_model(tiny_model("ls", depth=2, seed=5), out, "v2")
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temporary leftovers


def test_the_checkpoint_travels_with_the_export(tmp_path):
    from anyorder.model.checkpoint import load_model, save_model
    model = tiny_model("ls", depth=2)
    save_model(model, tmp_path / "model", {"training": {"seed": 0}})
    manifest = export_model(model, tmp_path / "export", "m", checkpoint_dir=tmp_path / "model")
    assert set(manifest["checkpoint"]["sha256"]) == {"model.safetensors", "model.json"}
    reloaded = load_model(tmp_path / "export" / "checkpoint")
    images = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(reloaded(images, [1, 0]), model.eval()(images, [1, 0]))
    assert json.loads((tmp_path / "export/manifest.json").read_text())["version"] == \
        manifest["version"]

"""The order-agnostic runtime: any order of any subset of the exported blocks, missing-block
policies, hash checks before any session, clear errors before any compute, and its CLI."""
import json
import shutil
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image

from anyorder.export import runtime as runtime_module
from anyorder.export.blocks import export_model
from anyorder.files import sha256_file
from anyorder.pyfunc import AnyOrderModel
from anyorder.export.cli import main
from anyorder.export.runtime import (BlockRuntime, ExportError, MissingBlocksError, Policy,
                              read_manifest)

from conftest import tiny_model

DEPTH = 4


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny LS model and its export (module-wide; tests that change files copy it first)."""
    model = tiny_model("ls", depth=DEPTH, seed=2).eval()
    out = tmp_path_factory.mktemp("runtime") / "export"
    export_model(model, out, "tiny")
    return model, out


@pytest.fixture
def copy(source, tmp_path):
    """A private copy of the export, free to damage."""
    _, out = source
    return shutil.copytree(out, tmp_path / "export")


def images(n=5, size=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def torch_logits(model, runtime, batch, order):
    with torch.no_grad():
        return model(torch.from_numpy(runtime.preprocess(batch)), order).numpy()


def rewrite_manifest(export_dir, edit):
    manifest = read_manifest(export_dir)
    edit(manifest)
    (export_dir / "manifest.json").write_text(json.dumps(manifest))


# -- orders and policies ------------------------------------------------------------------------

@pytest.mark.parametrize("order", ["sequential", [3, 1, 0, 2], [2, 0], "1,3"])
def test_any_order_of_any_subset_equals_pytorch(source, order):
    model, out = source
    runtime = BlockRuntime(out, compose_cache=0)
    batch = images()
    result = runtime.predict(batch, order)
    expected_order = {"sequential": [0, 1, 2, 3], "1,3": [1, 3]}.get(order, order) \
        if isinstance(order, str) else order
    assert result.executed_order == expected_order and result.skipped == []
    np.testing.assert_allclose(result.logits, torch_logits(model, runtime, batch, expected_order),
                               atol=1e-4)


def test_random_orders_are_seeded(source):
    _, out = source
    runtime = BlockRuntime(out)
    drawn = {seed: runtime.predict(images(1), "random", seed=seed).executed_order
             for seed in range(6)}
    assert all(sorted(order) == list(range(DEPTH)) for order in drawn.values())
    assert len({tuple(order) for order in drawn.values()}) > 1
    assert runtime.predict(images(1), "random", seed=3).executed_order == drawn[3]


@pytest.mark.parametrize("batch", [1, 7, 65])
def test_any_batch_size(source, batch):
    model, out = source
    runtime = BlockRuntime(out)
    data = images(batch, seed=batch)
    result = runtime.predict(data, [2, 3, 0, 1])
    assert result.logits.shape == (batch, 10)
    np.testing.assert_allclose(result.logits, torch_logits(model, runtime, data, [2, 3, 0, 1]),
                               atol=1e-4)


def test_a_composed_order_gives_what_the_chain_gives(source):
    """A recurring order runs as one composed graph; its logits are the chain's."""
    _, out = source
    chain = BlockRuntime(out, compose_cache=0)
    composed = BlockRuntime(out, compose_cache=2)
    batch = images(9)
    for order in ([1, 0, 3, 2], [1, 0, 3, 2], [0, 1, 2, 3], [3, 2]):
        np.testing.assert_allclose(composed.predict(batch, order).logits,
                                   chain.predict(batch, order).logits, atol=1e-5)
    assert set(composed._composed) == {(0, 1, 2, 3), (1, 0, 3, 2)}  # [3, 2] seen once: chain


def test_orders_seen_once_are_remembered_within_a_bound(source, monkeypatch):
    monkeypatch.setattr(runtime_module, "SEEN_ORDERS", 3)
    runtime = BlockRuntime(source[1])
    for order in ([1, 0], [2, 0], [3, 0], [0, 1], [1, 0]):
        runtime.predict(images(1), order)
    assert len(runtime._seen) == 3 and (1, 0) not in runtime._composed  # forgotten, run as chain
    runtime.predict(images(1), [3, 0])
    assert (3, 0) in runtime._composed  # still remembered: its second use composes it


def test_a_composed_ls_pos_order_keeps_the_slots(tmp_path):
    from test_export import with_slots_that_matter
    model = with_slots_that_matter(tiny_model("ls_pos", depth=3)).eval()
    export_model(model, tmp_path / "pos", "pos")
    chain = BlockRuntime(tmp_path / "pos", compose_cache=0)
    composed = BlockRuntime(tmp_path / "pos")
    batch = images(3)
    for _ in range(2):  # the second call runs the composed graph
        got = composed.predict(batch, [2, 0, 1]).logits
        np.testing.assert_allclose(got, chain.predict(batch, [2, 0, 1]).logits, atol=1e-5)
        np.testing.assert_allclose(got, torch_logits(model, chain, batch, [2, 0, 1]), atol=1e-4)
    assert (2, 0, 1) in composed._composed


def test_skip_runs_what_is_there_and_reports_it(source, copy):
    model, _ = source
    (copy / "block_02.onnx").unlink()
    runtime = BlockRuntime(copy)
    assert runtime.missing == {2: "file absent"} and runtime.available == [0, 1, 3]
    batch = images()
    result = runtime.predict(batch, [3, 2, 1, 0], policy="skip")
    assert result.executed_order == [3, 1, 0] and result.skipped == [2]
    assert result.requested_order == [3, 2, 1, 0]
    np.testing.assert_allclose(result.logits, torch_logits(model, runtime, batch, [3, 1, 0]),
                               atol=1e-4)


def test_fail_and_min_blocks_policies(copy):
    (copy / "block_00.onnx").unlink()
    runtime = BlockRuntime(copy, exclude=[1])
    assert runtime.missing == {0: "file absent", 1: "excluded by the caller"}
    with pytest.raises(MissingBlocksError, match=r"blocks \[0, 1\] are missing.*'fail'"):
        runtime.predict(images(), policy="fail")
    assert runtime.predict(images(), [2, 3], policy="fail").executed_order == [2, 3]
    assert runtime.predict(images(), policy="min_blocks:2").executed_order == [2, 3]
    with pytest.raises(MissingBlocksError, match="only 2 block.*at least 3"):
        runtime.predict(images(), policy="min_blocks:3")


def test_a_block_that_fails_to_load_is_missing(copy):
    """A block whose file is intact (its hash matches) but that ONNX Runtime cannot load is a
    missing block for the policy, not a crash."""
    (copy / "block_01.onnx").write_bytes(b"not an onnx graph")
    rewrite_manifest(copy, lambda m: m["graphs"]["blocks"][1].update(
        sha256=sha256_file(copy / "block_01.onnx")))
    runtime = BlockRuntime(copy)
    assert runtime.missing[1].startswith("failed to load")
    assert runtime.predict(images(), policy="skip").skipped == [1]
    with pytest.raises(MissingBlocksError):
        runtime.predict(images(), policy="fail")


def test_exclude_per_call_is_a_missing_block_for_that_call(source):
    model, out = source
    runtime = BlockRuntime(out)
    batch = images()
    result = runtime.predict(batch, [3, 2, 1, 0], exclude=[1, 2])
    assert result.executed_order == [3, 0] and result.skipped == [2, 1]
    np.testing.assert_allclose(result.logits, torch_logits(model, runtime, batch, [3, 0]),
                               atol=1e-4)
    assert runtime.predict(batch).executed_order == [0, 1, 2, 3]  # the next call has them all
    with pytest.raises(MissingBlocksError):
        runtime.predict(batch, exclude=[0], policy="fail")
    with pytest.raises(ExportError, match=r"exclude \[9\]"):
        runtime.predict(batch, exclude=[9])


@pytest.mark.parametrize("text,expected", [("skip", Policy("skip")), ("fail", Policy("fail")),
                                           ("min_blocks:3", Policy("min_blocks", 3))])
def test_policies_parse(text, expected):
    assert Policy.parse(text) == expected and str(Policy.parse(text)) == text


@pytest.mark.parametrize("text", ["drop", "min_blocks", "min_blocks:0", "min_blocks:x",
                                  "skip:2", ""])
def test_bad_policies_are_refused(text):
    with pytest.raises(ExportError, match="policy"):
        Policy.parse(text)


# -- bad input: clear errors before any compute -------------------------------------------------

@pytest.fixture
def no_compute(monkeypatch):
    """Fails the test if any session runs."""
    def refuse(*args, **kwargs):
        raise AssertionError("a session ran")
    monkeypatch.setattr(ort.InferenceSession, "run", refuse)


@pytest.mark.parametrize("order,message", [
    ([0, 1, 1], r"repeats a block"),
    ([0, 4], r"blocks \[4\] do not exist \(this model has blocks 0..3\)"),
    ([-1], r"blocks \[-1\] do not exist"),
    ("2,x", r"order \(sequential, random, or block indices\) '2,x': use block indices"),
    ("", r"at least one block"),
])
def test_bad_orders_are_refused_before_compute(source, no_compute, order, message):
    runtime = BlockRuntime(source[1])
    with pytest.raises(ExportError, match=message):
        runtime.predict(images(), order)


@pytest.mark.parametrize("batch,message", [
    (images(2, size=32), r"shape \(2, 32, 32, 3\), expected \(N, 16, 16, 3\)"),
    (images(2)[..., :1], r"shape \(2, 16, 16, 1\)"),
    (images(2).astype(np.float32), r"dtype float32, expected uint8"),
    (images(0), r"an empty batch"),
])
def test_bad_images_are_refused_before_compute(source, no_compute, batch, message):
    with pytest.raises(ExportError, match=message):
        BlockRuntime(source[1]).predict(batch)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_input_is_refused_before_compute(source, no_compute, bad):
    runtime = BlockRuntime(source[1])
    batch = runtime.preprocess(images(2))
    batch[1, 0, 3, 3] = bad
    with pytest.raises(ExportError, match="NaN or infinite"):
        runtime.run(batch)


def test_a_tampered_block_is_never_loaded(copy, monkeypatch):
    graph = onnx.load(str(copy / "block_03.onnx"))
    weight = graph.graph.initializer[0]
    values = onnx.numpy_helper.to_array(weight).copy()
    values.flat[0] += 1.0
    weight.CopyFrom(onnx.numpy_helper.from_array(values, weight.name))
    onnx.save(graph, str(copy / "block_03.onnx"))
    sessions = []
    monkeypatch.setattr(ort, "InferenceSession", lambda *a, **k: sessions.append(a))
    with pytest.raises(ExportError, match=r"block_03.onnx: sha256 .* does not match"):
        BlockRuntime(copy)
    assert sessions == []  # refused before any session was created, the others' included


@pytest.mark.parametrize("role", ["stem", "head"])
def test_a_missing_stem_or_head_is_an_error(copy, role):
    (copy / f"{role}.onnx").unlink()
    with pytest.raises(ExportError, match=f"{role}.onnx: the {role} graph is missing"):
        BlockRuntime(copy)


def test_an_opset_the_runtime_cannot_run_is_named(copy):
    graph = onnx.load(str(copy / "stem.onnx"))
    for entry in graph.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 99
    onnx.save(graph, str(copy / "stem.onnx"))
    rewrite_manifest(copy, lambda m: m["graphs"]["stem"].update(
        sha256=sha256_file(copy / "stem.onnx")))
    with pytest.raises(ExportError, match=r"stem.onnx: onnxruntime .* cannot load it .*opset"):
        BlockRuntime(copy)


def test_not_an_export_directory(tmp_path):
    with pytest.raises(ExportError, match="manifest.json: no such file"):
        BlockRuntime(tmp_path)
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ExportError, match="not valid JSON"):
        BlockRuntime(tmp_path)


def test_bad_provider_and_exclude_are_refused(source):
    with pytest.raises(ExportError, match="provider 'tpu'"):
        BlockRuntime(source[1], provider="tpu")
    with pytest.raises(ExportError, match=r"exclude \[7\]"):
        BlockRuntime(source[1], exclude=[7])


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(),
                    reason="this machine has CUDA: nothing to fall back from")
def test_cuda_asked_for_but_absent_falls_back_with_a_warning(source):
    model, out = source
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        runtime = BlockRuntime(out, provider="cuda")
    assert runtime.provider == "cpu"
    assert any("CUDA was asked for" in str(w.message) for w in caught)
    assert runtime.stem.get_providers() == ["CPUExecutionProvider"]
    batch = images(2)
    np.testing.assert_allclose(runtime.predict(batch).logits,
                               torch_logits(model, runtime, batch, list(range(DEPTH))), atol=1e-4)


def test_sessions_do_not_spin(source):
    options = runtime_module.session_options(2)
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert options.intra_op_num_threads == 2


# -- the pyfunc model (no MLflow needed to run it) ----------------------------------------------

def test_the_pyfunc_model_takes_order_seed_policy_and_exclude(source):
    _, out = source
    model = AnyOrderModel(out)
    runtime = BlockRuntime(out)
    batch = images(3)
    got = model.predict(batch, params={"order": "3,1,2", "exclude": "1"})
    assert got["executed_order"].tolist() == [[3, 2]] * 3
    np.testing.assert_array_equal(got["logits"], runtime.predict(batch, [3, 2]).logits)
    assert got["class_index"].tolist() == runtime.predict(batch, [3, 2]).predictions.tolist()
    default = model.predict(batch)
    assert default["executed_order"].tolist() == [[0, 1, 2, 3]] * 3
    with pytest.raises(MissingBlocksError):
        model.predict(batch, params={"exclude": "0", "policy": "fail"})


# -- the command line ----------------------------------------------------------------------------

def write_images(folder, batch, start=0):
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(batch):
        paths.append(folder / f"img{start + i:02d}.png")
        Image.fromarray(image).save(paths[-1])
    return paths


def test_cli_classifies_files_and_folders_as_json(source, tmp_path, capsys):
    _, out = source
    batch = images(5)
    paths = write_images(tmp_path / "images", batch)
    assert main([str(out), str(tmp_path / "images"), "--order", "2,0", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    expected = BlockRuntime(out).predict(batch, [2, 0]).predictions
    assert report["executed_order"] == [2, 0] and report["skipped"] == []
    assert [row["index"] for row in report["predictions"]] == expected.tolist()
    assert [row["file"] for row in report["predictions"]] == [str(p) for p in paths]
    assert main([str(out), str(paths[0]), str(paths[3]), "--batch-size", "1", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 2


def test_cli_prints_accuracy_on_an_imagefolder_tree(source, tmp_path, capsys):
    _, out = source
    runtime = BlockRuntime(out)
    labels = {"3": images(4, seed=1), "7": images(3, seed=2)}
    for name, batch in labels.items():
        write_images(tmp_path / "tree" / name, batch)
    assert main([str(out), str(tmp_path / "tree"), "--order", "random", "--seed", "5",
                 "--exclude", "1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert 1 not in report["executed_order"] and report["skipped"] == [1]
    predictions = np.concatenate([runtime.predict(b, report["executed_order"]).predictions
                                  for b in labels.values()])
    truth = np.array([3] * 4 + [7] * 3)
    assert report["accuracy"] == pytest.approx(float((predictions == truth).mean()))
    assert main([str(out), str(tmp_path / "tree")]) == 0
    assert "accuracy" in capsys.readouterr().out


def test_cli_refuses_bad_input_with_exit_2(source, tmp_path, capsys):
    _, out = source
    write_images(tmp_path / "big", images(1, size=20))
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        ([str(tmp_path / "big")], "img00.png: 20x20 pixels, the model takes 16x16"),
        ([str(tmp_path / "notes.png")], "notes.png: cannot read this image"),
        ([str(tmp_path / "nowhere")], "nowhere: no such file or folder"),
        ([str(tmp_path / "big"), "--order", "0,0"], "repeats a block"),
        ([str(tmp_path / "big"), "--policy", "most"], "policy 'most'"),
        ([str(tmp_path / "big"), "--exclude", "two"], "--exclude 'two': use block indices"),
    ]
    for args, message in cases:
        assert main([str(out), *args]) == 2, args
        assert message in capsys.readouterr().err
    assert main([str(out), str(tmp_path / "big"), "--resize", "--json"]) == 0

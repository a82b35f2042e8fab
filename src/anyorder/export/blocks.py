"""Per-block ONNX export: the contract of the order-agnostic runtime, and its validation twin.

An export directory (format 1) holds:
- `stem.onnx`: "images" float32 (N, 3, H, W), normalised as the manifest says -> "tokens"
  float32 (N, T, D): patch embedding, class token, position embedding;
- `block_XX.onnx`, one per block, all with one signature: "tokens" (N, T, D) -> "tokens_out"
  (N, T, D); an LS-pos block also takes "slot" int64 (1,), the execution slot it runs at;
- `head.onnx`: "tokens" (N, T, D) -> "logits" (N, K): final norm, pooling, classifier;
- `manifest.json`: model name and version, variant, opset, library versions, input size and
  normalisation, class names, the sha256 of every graph, and the accuracies measured in
  sequential and arbitrary order.
Only the batch axis is dynamic; every graph is one file (no external data) and passes
`onnx.checker`. The directory is written to a temporary sibling and swapped in whole, so a failed
export leaves the previous one as it was. `check_export` compares every graph, and chains of them
run by the runtime, against the PyTorch model; `runtime_accuracy` the runtime's test accuracy
against PyTorch's over the evaluated orders.
"""
from __future__ import annotations

import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional, Sequence, Union

import numpy as np
import torch
import torch.nn as nn

from anyorder.model.checkpoint import tensors_digest
from anyorder.files import atomic_directory, atomic_write_json, sha256_file
from anyorder.data.inputs import to_model_input
from anyorder.model.spec import ModelSpec
from anyorder.model.vit import AnyOrderViT
from anyorder.evaluation.orders import random_orders
from anyorder.export.runtime import FORMAT, MANIFEST, BlockRuntime

STEM, HEAD = "stem.onnx", "head.onnx"


def block_file(index: int) -> str:
    return f"block_{index:02d}.onnx"


class _Part(nn.Module):
    """The model's stem or head (`forward_stem`, `forward_head`) as a module of its own."""

    def __init__(self, model: AnyOrderViT, method: str):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        return getattr(self.model, self.method)(inputs)


class _Block(nn.Module):
    """One block with the uniform signature; the LS-pos adapter is part of its block."""

    def __init__(self, model: AnyOrderViT, index: int):
        super().__init__()
        self.model, self.index = model, index

    def forward(self, tokens: torch.Tensor, slot: Optional[torch.Tensor] = None) -> torch.Tensor:
        if slot is None:
            return self.model.vit.blocks[self.index](tokens)
        # The variant's blocks read their execution slot (LS-pos: the slot table's row).
        return self.model.run_block(tokens, self.index, slot[0])


@contextmanager
def _exportable(model: AnyOrderViT) -> Iterator[None]:
    """Eval mode on CPU, and timm's fused attention off while exporting: the TorchScript-based
    exporter cannot trace scaled_dot_product_attention's arguments, and the explicit softmax
    attention it exports instead computes the same function."""
    blocks = [block.attn for block in model.vit.blocks if hasattr(block.attn, "fused_attn")]
    fused = [attn.fused_attn for attn in blocks]
    was_training = model.training
    model.eval().cpu()
    for attn in blocks:
        attn.fused_attn = False
    try:
        yield
    finally:
        for attn, value in zip(blocks, fused):
            attn.fused_attn = value
        model.train(was_training)


def _export_graph(module: nn.Module, args: tuple, path: Path, inputs: list[str], output: str,
                  opset: int) -> None:
    """Export `module` called on `args`; every input and output keeps the traced shape, with
    axis 0 renamed "batch" (the only dynamic axis) except for the slot input."""
    import onnx

    dynamic = {name: {0: "batch"} for name in inputs if name != "slot"}
    dynamic[output] = {0: "batch"}
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        result = module(*args)
        torch.onnx.export(module, args, str(path), input_names=inputs, output_names=[output],
                          dynamic_axes=dynamic, opset_version=opset, dynamo=False,
                          do_constant_folding=True)
    # The exporter leaves some sizes symbolic where its shape inference gave up: pin them.
    shapes = {name: tuple(arg.shape) for name, arg in zip(inputs, args)}
    shapes[output] = tuple(result.shape)
    graph = onnx.load(str(path))
    for value in [*graph.graph.input, *graph.graph.output]:
        dims = value.type.tensor_type.shape.dim
        for axis, size in enumerate(shapes[value.name]):
            dims[axis].Clear()
            if axis == 0 and value.name in dynamic:
                dims[axis].dim_param = "batch"
            else:
                dims[axis].dim_value = size
    onnx.save(graph, str(path))


def _check_graph(path: Path, opset: int) -> None:
    """onnx.checker, single file (no external data), the opset asked for."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False)
    external = [t.name for t in graph.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL]
    if external:
        raise RuntimeError(f"{path}: tensors stored outside the file: {external[:3]}")
    onnx.checker.check_model(graph, full_check=True)
    versions = {o.domain: o.version for o in graph.opset_import}
    if versions.get("", versions.get("ai.onnx")) != opset:
        raise RuntimeError(f"{path}: opset {versions}, expected {opset}")


def _export_graphs(model: AnyOrderViT, out: Path, opset: int) -> torch.Tensor:
    """`stem.onnx`, one `block_XX.onnx` per block and `head.onnx` of `model` into `out`, each
    checked by `_check_graph`; returns the stem's tokens of the traced images."""
    size = model.spec.img_size
    images = torch.zeros(2, 3, size, size)
    tokens = model.forward_stem(images)
    _export_graph(_Part(model, "forward_stem"), (images,), out / STEM, ["images"], "tokens",
                  opset)
    slotted = model.behaviour.slot_input
    for index in range(model.depth):
        args = (tokens, torch.tensor([0], dtype=torch.long)) if slotted else (tokens,)
        _export_graph(_Block(model, index), args, out / block_file(index),
                      ["tokens", "slot"] if slotted else ["tokens"], "tokens_out", opset)
    _export_graph(_Part(model, "forward_head"), (tokens,), out / HEAD, ["tokens"], "logits",
                  opset)
    files = [STEM, *(block_file(i) for i in range(model.depth)), HEAD]
    for file in files:
        _check_graph(out / file, opset)
    return tokens


def _manifest(model: AnyOrderViT, out: Path, name: str, tokens: torch.Tensor, opset: int,
              accuracies: Optional[dict], extra: Optional[dict]) -> dict:
    """The manifest of the graphs written to `out` (see the module docstring); `tokens`: the
    stem's output, whose shape gives the token count and width."""
    import onnx
    import onnxruntime
    import timm

    spec = model.spec
    return {
        "format": FORMAT,
        "name": name,
        "version": tensors_digest(model.state_dict())[:16],
        "variant": model.variant,
        "arch": spec.arch,
        "depth": model.depth,
        "embed_dim": int(tokens.shape[-1]),
        "num_tokens": int(tokens.shape[1]),
        "num_classes": spec.num_classes,
        "class_names": list(spec.class_names),
        "image_size": spec.img_size,
        "channels": 3,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "input": "float32 (N, 3, H, W), RGB scaled to [0, 1] then (x - mean) / std",
        "slot_input": model.behaviour.slot_input,
        "opset": opset,
        "versions": {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__.split("+")[0], "timm": timm.__version__},
        "graphs": {
            "stem": {"file": STEM, "sha256": sha256_file(out / STEM)},
            "blocks": [{"index": i, "file": block_file(i),
                        "sha256": sha256_file(out / block_file(i))}
                       for i in range(model.depth)],
            "head": {"file": HEAD, "sha256": sha256_file(out / HEAD)},
        },
        "accuracy": accuracies or {},
        **(extra or {}),
    }


def _copy_checkpoint(checkpoint_dir: Union[str, Path], out: Path) -> dict:
    """The files of `checkpoint_dir` copied into `out/checkpoint`; returns the manifest's
    "checkpoint" entry (the folder and each file's sha256)."""
    (out / "checkpoint").mkdir()
    copied = {}
    for file in sorted(Path(checkpoint_dir).iterdir()):
        if file.is_file():
            shutil.copy2(file, out / "checkpoint" / file.name)
            copied[file.name] = sha256_file(file)
    return {"dir": "checkpoint", "sha256": copied}


def export_model(model: AnyOrderViT, out_dir: Union[str, Path], name: str, opset: int = 17,
                 accuracies: Optional[dict] = None, extra: Optional[dict] = None,
                 checkpoint_dir: Optional[Union[str, Path]] = None) -> dict:
    """Write the export directory `out_dir` for `model` (see the module docstring); return its
    manifest. `accuracies`: what evaluation measured ({"sequential": ..., "arbitrary": {...}}).
    `checkpoint_dir`: the model directory the model was loaded from; its files are copied into
    `checkpoint/`, so the export carries the PyTorch weights it was made from. The version is a
    digest of the weights, so the same model always exports the same files."""
    with atomic_directory(out_dir) as tmp, _exportable(model):
        tokens = _export_graphs(model, tmp, opset)
        manifest = _manifest(model, tmp, name, tokens, opset, accuracies, extra)
        if checkpoint_dir is not None:
            manifest["checkpoint"] = _copy_checkpoint(checkpoint_dir, tmp)
        atomic_write_json(tmp / MANIFEST, manifest)
    return manifest


# -- the validation twin ---------------------------------------------------------------------------

def check_export(model: AnyOrderViT, export_dir: Union[str, Path], num_orders: int = 10,
                 seed: int = 0, batch_sizes: Sequence[int] = (1, 32)) -> dict:
    """Every graph against PyTorch on seeded random inputs, then the runtime's chain against
    the PyTorch model in sequential order and `num_orders` seeded random orders at each batch
    size. Returns {"max_abs_error": worst of everything, "prediction_agreement": worst, ...}."""
    rng = np.random.default_rng(seed)
    runtime = BlockRuntime(export_dir, compose_cache=0)
    size, errors = model.spec.img_size, {}
    with _exportable(model), torch.no_grad():
        images = rng.standard_normal((4, 3, size, size)).astype(np.float32)
        tokens = model.forward_stem(torch.from_numpy(images))
        errors["stem"] = _abs_error(runtime.stem.run(None, {"images": images})[0], tokens)
        noisy = (tokens + 0.1 * torch.from_numpy(
            rng.standard_normal(tuple(tokens.shape)).astype(np.float32))).numpy()
        for index in range(model.depth):
            slot = int(rng.integers(model.depth))
            expected = _Block(model, index)(
                torch.from_numpy(noisy), torch.tensor([slot]) if runtime.slotted else None)
            got = runtime.blocks[index].run(None, runtime._block_feed(noisy, slot))[0]
            errors[block_file(index)] = _abs_error(got, expected)
        errors["head"] = _abs_error(runtime.head.run(None, {"tokens": noisy})[0],
                                    model.forward_head(torch.from_numpy(noisy)))
        orders = [list(range(model.depth))] + random_orders(model.depth, num_orders, seed)
        chains = {}
        for batch in batch_sizes:
            inputs = rng.standard_normal((batch, 3, size, size)).astype(np.float32)
            worst, agreement = 0.0, 1.0
            for order in orders:
                expected = model(torch.from_numpy(inputs), order).numpy()
                got = runtime.run(inputs, order).logits
                worst = max(worst, float(np.abs(got - expected).max()))
                agreement = min(agreement, float((got.argmax(1) == expected.argmax(1)).mean()))
            chains[f"batch_{batch}"] = {"max_abs_error": worst, "prediction_agreement": agreement}
    return {
        "max_abs_error": max([*errors.values(), *(c["max_abs_error"] for c in chains.values())]),
        "prediction_agreement": min(c["prediction_agreement"] for c in chains.values()),
        "graphs_max_abs_error": errors,
        "chains": chains,
        "orders_checked": orders,
        "batch_sizes": list(batch_sizes),
        "seed": seed,
    }


def runtime_accuracy(export_dir: Union[str, Path], evaluation: dict, images: np.ndarray,
                     labels: np.ndarray, spec: Optional[ModelSpec] = None,
                     batch_size: int = 256) -> dict:
    """The runtime's test accuracy in sequential order and in the evaluate stage's orders
    (`evaluation`: its metrics), next to what PyTorch measured there (points = percentage
    points). Images of another size than the model's (`spec`; stored larger, resized on the fly)
    are resized and normalised as PyTorch's evaluation does; the runtime's own preprocessing
    takes images at the model's size."""
    runtime = BlockRuntime(export_dir)
    orders = [list(range(runtime.depth))] + evaluation["orders"]
    hits = np.zeros(len(orders), dtype=np.int64)
    for start in range(0, len(labels), batch_size):  # a batch at a time: the split is not in memory
        batch = images[start:start + batch_size]
        if spec is not None and batch.shape[1:3] != (spec.img_size, spec.img_size):
            normalised = to_model_input(batch, spec).numpy()
        else:
            normalised = runtime.preprocess(batch)  # once for every order
        for i, order in enumerate(orders):
            hits[i] += int((runtime.run(normalised, order).predictions ==
                            labels[start:start + batch_size]).sum())
    ours = [float(count / len(labels)) for count in hits]
    theirs = [evaluation["sequential"]] + evaluation["order_accuracies"]
    return {"sequential": ours[0], "arbitrary_mean": sum(ours[1:]) / len(ours[1:]),
            "max_difference_points": 100 * max(abs(a - b) for a, b in zip(ours, theirs)),
            "orders": len(orders)}


def _abs_error(got: np.ndarray, expected: torch.Tensor) -> float:
    return float(np.abs(got - expected.numpy()).max())

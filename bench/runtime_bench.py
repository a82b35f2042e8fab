"""How fast the order-agnostic runtime is, against one whole-model ONNX graph and PyTorch eager.

    python bench/runtime_bench.py [--models default vit_s] [--batches 1 64] [--repeats 7]
                                  [--provider cpu|cuda] [--out bench/results/runtime_cpu.json]

For each model (random weights, seeded: speed does not depend on them), every variant runs on the
same inputs, interleaved (variant A, B, C, ... then again, each round starting one variant
later), `--repeats` rounds after a warm-up;
each timing is the median of `--calls` calls. Reported: the median over rounds and its spread
(min-max), and each variant's ratio to the whole-model graph measured in the same round.

Variants:
- whole_graph:    the model exported as one ONNX graph (sequential order), one session;
- runtime:        BlockRuntime, sequential order (a recurring order: composed once, then cached);
- runtime_chain:  BlockRuntime with composition off: one session call per graph, numpy between
                  (on CUDA: tokens stay on the device, I/O binding);
- runtime_chain_no_io_binding: CUDA only, the chain with a host round trip per block;
- runtime_random: BlockRuntime, a different random order on every call (the chain, uncached);
- torch_eager:    the PyTorch model in eval mode, no_grad.
Every ONNX session uses the runtime's options (no thread spinning, `--threads` intra-op threads);
torch uses the same thread count.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _report import header, write  # noqa: E402  (bench/_report.py)

import numpy as np  # noqa: E402
import torch  # noqa: E402

from anyorder.export.blocks import _exportable, export_model  # noqa: E402
from anyorder.model.spec import ModelSpec  # noqa: E402
from anyorder.model.vit import build_model  # noqa: E402
from anyorder.export.runtime import PROVIDERS, BlockRuntime, session_options  # noqa: E402

MODELS = {
    # The pipeline's default model (params.yaml): 32x32 inputs, patch 8, width 64, depth 8.
    "default": dict(arch="vit_tiny_patch16_224", img_size=32, patch_size=8, embed_dim=64,
                    depth=8, num_heads=4, mlp_ratio=2.0),
    # ViT-S/16 at 224 px as timm defines it.
    "vit_s": dict(arch="vit_small_patch16_224", img_size=224, patch_size=16, embed_dim=384,
                  depth=12, num_heads=6, mlp_ratio=4.0),
}


def whole_graph_session(model, path: Path, threads: int, provider: str):
    """The reference: the whole model as one graph, exported the same way as the blocks."""
    import onnxruntime as ort

    size = model.spec.img_size
    with _exportable(model), warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(2, 3, size, size),), str(path), dynamo=False,
                          input_names=["images"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    return ort.InferenceSession(str(path), session_options(threads), providers=PROVIDERS[provider])


def time_calls(fn, calls: int) -> float:
    """Median seconds of one call over `calls` calls."""
    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        seconds.append(time.perf_counter() - started)
    return statistics.median(seconds)


def timed_rounds(variants: dict, repeats: int, calls: int) -> dict[str, list[float]]:
    """Per variant, `repeats` timings of `calls` calls each, after a warm-up."""
    with torch.no_grad():
        for fn in variants.values():  # warm-up: first calls allocate and compose
            time_calls(fn, 3)
        rounds: dict[str, list[float]] = {label: [] for label in variants}
        labels = list(variants)
        for round_index in range(repeats):
            # Interleaved, and in a rotated order each round: drift and position effects
            # (caches warmed by the variant before) hit every variant alike.
            shift = round_index % len(labels)
            for label in labels[shift:] + labels[:shift]:
                rounds[label].append(time_calls(variants[label], calls))
    return rounds


def round_summary(rounds: dict[str, list[float]]) -> dict:
    """Per variant: median, min and max milliseconds and the median ratio to the whole graph
    over the rounds."""
    whole_rounds = rounds["whole_graph"]
    return {
        label: {"median_ms": 1e3 * statistics.median(values),
                "min_ms": 1e3 * min(values), "max_ms": 1e3 * max(values),
                "ratio_to_whole_graph": statistics.median(
                    [v / w for v, w in zip(values, whole_rounds)])}
        for label, values in rounds.items()}


def bench_model(name: str, batches: list[int], repeats: int, calls: int, threads: int,
                provider: str, work: Path) -> dict:
    spec = ModelSpec(num_classes=10, variant="ls", class_names=[str(i) for i in range(10)],
                     **MODELS[name])
    model = build_model(spec, seed=0).eval()
    export_dir = work / f"{name}_export"
    export_model(model, export_dir, name)
    whole = whole_graph_session(model, work / f"{name}_whole.onnx", threads, provider)
    runtime = BlockRuntime(export_dir, provider=provider, threads=threads)
    chain = BlockRuntime(export_dir, provider=provider, threads=threads, compose_cache=0)
    unbound = BlockRuntime(export_dir, provider=provider, threads=threads, compose_cache=0,
                           io_binding=False)
    if provider == "cuda":  # torch on the GPU too, timed to the end of its kernels
        model, tensor_device, sync = model.cuda(), "cuda", torch.cuda.synchronize
    else:
        tensor_device, sync = "cpu", (lambda: None)
    rng = np.random.default_rng(0)
    results = {}
    for batch in batches:
        images = rng.standard_normal((batch, 3, spec.img_size, spec.img_size)).astype(np.float32)
        tensor = torch.from_numpy(images).to(tensor_device)
        counter = iter(range(10 ** 9))
        variants = {
            "whole_graph": lambda: whole.run(None, {"images": images}),
            "runtime": lambda: runtime.run(images, "sequential"),
            "runtime_chain": lambda: chain.run(images, "sequential"),
            "runtime_random": lambda: chain.run(images, "random", seed=next(counter)),
            "torch_eager": lambda: (model(tensor), sync()),
        }
        if provider == "cuda":  # tokens on the device between blocks, against a host round trip
            variants["runtime_chain_no_io_binding"] = \
                lambda: unbound.run(images, "sequential")
        # Same answers first (the runtime's orders equal the whole graph's sequential one).
        reference = whole.run(None, {"images": images})[0]
        for label in [v for v in variants if v.startswith("runtime") and v != "runtime_random"]:
            error = float(np.abs(variants[label]().logits - reference).max())
            assert error < 1e-3, (label, error)
        n = max(1, calls // max(1, batch // 8)) if name == "vit_s" else calls
        results[f"batch_{batch}"] = round_summary(timed_rounds(variants, repeats, n))
        results[f"batch_{batch}"]["calls_per_round"] = n
        print(f"{name} batch {batch}: " + ", ".join(
            f"{label} {r['median_ms']:.3f} ms ({r['ratio_to_whole_graph']:.2f}x)"
            for label, r in results[f"batch_{batch}"].items() if isinstance(r, dict)), flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 64])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--calls", type=int, default=20, help="calls per timing (fewer for "
                                                              "large ViT-S batches)")
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--provider", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--out", default=str(ROOT / "bench/results/runtime_cpu.json"))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import onnxruntime as ort

    with tempfile.TemporaryDirectory() as work:
        results = {name: bench_model(name, args.batches, args.repeats, args.calls, args.threads,
                                     args.provider, Path(work)) for name in args.models}
    report = {
        **header(torch=torch.__version__, onnxruntime=ort.__version__,
                 provider=args.provider, threads=args.threads),
        "repeats": args.repeats,
        "results": results,
    }
    write(args.out, report)


if __name__ == "__main__":
    main()

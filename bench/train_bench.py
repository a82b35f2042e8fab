"""Training throughput: LayerShuffle against plain sequential training of the same timm ViT, and
the FLOP/s achieved against a matrix-multiply peak measured in the same run.

    python bench/train_bench.py [--batch 64] [--steps 20] [--rounds 5] [--threads N]
                                [--device cpu|cuda] [--dtype fp32|bf16] [--arch default|vit_s|vit_b]
                                [--optimizer pipeline|fused|loop] [--compile]
                                [--attention pipeline|fused|plain]
                                [--profile FILE.json] [--out bench/results/train_cpu.json]

Variants (same model, same synthetic data, same AdamW; each round runs every variant for
`--steps` timed steps after 3 warm-up steps, the variants' order rotating from round to round so
drift hits them alike):
- timm_plain:     `model.vit(x)`: timm's own forward, cross-entropy, backward, AdamW step;
- sequential:     our AnyOrderViT, blocks 0..L-1 (what the sequential fine-tune runs);
- layershuffle:   our AnyOrderViT, a new random block order every step (LS, one order per batch).
Reported per variant: images/s (median over rounds, min-max), the ratio to timm_plain in the same
round, and achieved FLOP/s (the training step's FLOPs from torch's FlopCounterMode on one step,
times steps/s) as a fraction of the peak: the median of timed square `--peak-size` matmuls in the
same dtype, measured between rounds.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from _report import header, write  # noqa: E402  (bench/_report.py)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from anyorder.config import load_settings  # noqa: E402
from anyorder.model.settings import ModelOverrides  # noqa: E402
from anyorder.model.spec import model_spec  # noqa: E402
from anyorder.model.vit import build_model  # noqa: E402
from anyorder.training.loop import FUSED_ADAMW_DEVICES  # noqa: E402

ARCHS = {"vit_s": "vit_small_patch16_224", "vit_b": "vit_base_patch16_224"}  # timm's models


def make_model(arch: str, device: torch.device):
    """params.yaml's model ("default") or a timm ViT as timm defines it (224 px)."""
    settings = load_settings(ROOT / "params.yaml")
    if arch == "default":
        config, size = settings.model, settings.data.image_size
    else:
        config, size = dataclasses.replace(settings.model, arch=ARCHS[arch],
                                           overrides=ModelOverrides(), pretrained="none"), None
    spec = model_spec(config, size, [str(i) for i in range(10)], "ls")
    return build_model(spec, "none", seed=0).to(device), spec.img_size


def matmul_rate(rows: int, inner: int, cols: int, dtype, device, calls: int = 50,
                repeats: int = 5) -> float:
    """FLOP/s of (rows x inner) @ (inner x cols): median of `repeats` timings of `calls`."""
    a = torch.randn(rows, inner, device=device, dtype=dtype)
    b = torch.randn(inner, cols, device=device, dtype=dtype)
    torch.mm(a, b)
    rates = []
    for _ in range(repeats):
        sync(device)
        started = time.perf_counter()
        for _ in range(calls):
            torch.mm(a, b)
        sync(device)
        rates.append(2 * rows * inner * cols * calls / (time.perf_counter() - started))
    return statistics.median(rates)


def matmul_peak(size: int, dtype: torch.dtype, device: torch.device) -> float:
    """FLOP/s of a square matmul (a few calls per timing on CPU, where one takes ~15 ms)."""
    return matmul_rate(size, size, size, dtype, device, calls=3 if device.type == "cpu" else 50)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def step_fn(model, variant: str, images, labels, optimizer, autocast, generator):
    """One training step of `variant` (see the module docstring)."""
    def step():
        with autocast:
            if variant == "timm_plain":
                logits = model.vit(images)
            else:
                order = None if variant == "sequential" else \
                    torch.randperm(model.depth, generator=generator).tolist()
                logits = model(images, order)
            loss = F.cross_entropy(logits.float(), labels)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return step


def step_flops(step) -> float:
    from torch.utils.flop_counter import FlopCounterMode
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return float(counter.get_total_flops())


# Where a training step's time goes, by kind of operator (self time, aten names).
KINDS = {
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear",
               "aten::_scaled_dot_product_flash_attention_for_cpu",
               "aten::_scaled_dot_product_flash_attention_for_cpu_backward",
               "aten::convolution", "aten::_convolution", "aten::mkldnn_convolution",
               "aten::convolution_backward"),
    "optimizer": ("aten::_fused_adamw_", "aten::_foreach_", "aten::lerp_", "aten::addcmul_",
                  "aten::addcdiv_", "aten::sqrt", "aten::div_", "aten::mul_", "aten::add_",
                  "aten::zero_", "aten::fill_"),
    "norm_activation": ("aten::native_layer_norm", "aten::native_layer_norm_backward",
                        "aten::gelu", "aten::gelu_backward", "aten::_softmax",
                        "aten::_log_softmax", "aten::_log_softmax_backward_data",
                        "aten::nll_loss", "aten::nll_loss_backward"),
    "copies_views": ("aten::copy_", "aten::clone", "aten::contiguous", "aten::t",
                     "aten::transpose", "aten::view", "aten::reshape", "aten::permute",
                     "aten::select", "aten::slice", "aten::cat", "aten::as_strided",
                     "aten::expand", "aten::unbind", "aten::empty", "aten::empty_like",
                     "aten::_to_copy", "aten::to", "aten::sum", "aten::add", "aten::mul"),
}


def profile_steps(step, count: int = 10) -> dict:
    """Self CPU time of `count` steps by operator and by kind (KINDS; "other" for the rest)."""
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        started = time.perf_counter()
        for _ in range(count):
            step()
        wall = time.perf_counter() - started
    rows = [(e.key, e.self_cpu_time_total / 1e6) for e in prof.key_averages()]
    total = sum(seconds for _, seconds in rows)
    by_kind: dict = {}
    for key, seconds in rows:
        kind = next((k for k, names in KINDS.items()
                     if key in names or (key.startswith("aten::_foreach_") and k == "optimizer")),
                    "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + seconds
    top = sorted(rows, key=lambda r: -r[1])[:25]
    return {"steps": count, "wall_s": round(wall, 3), "profiled_self_s": round(total, 3),
            "by_kind": {k: {"seconds": round(v, 3), "share": round(v / total, 3)}
                        for k, v in sorted(by_kind.items(), key=lambda kv: -kv[1])},
            "top_ops": [{"op": key, "seconds": round(sec, 4), "share": round(sec / total, 3)}
                        for key, sec in top]}


VARIANTS = ["timm_plain", "sequential", "layershuffle"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--arch", default="default", choices=["default", *ARCHS])
    parser.add_argument("--peak-size", type=int, default=1024)
    parser.add_argument("--optimizer", default="pipeline", choices=["pipeline", "fused", "loop"],
                        help="AdamW's implementation: fused (one kernel), loop (torch's default "
                             "on CPU: a Python loop over the parameters), or what training uses "
                             "(pipeline: fused on CPU and CUDA; anyorder.training.loop)")
    parser.add_argument("--fused", dest="optimizer", action="store_const", const="fused",
                        help=argparse.SUPPRESS)  # the older spelling of --optimizer fused
    parser.add_argument("--compile", action="store_true", help="torch.compile each block")
    parser.add_argument("--attention", default="pipeline", choices=["pipeline", "fused", "plain"],
                        help="timm's attention kernel: fused (scaled_dot_product_attention), "
                             "plain (two matmuls + softmax), or what training uses (pipeline: "
                             "fused on a GPU, plain on CPU; anyorder.training.loop)")
    parser.add_argument("--profile", default="", help="also profile 10 LayerShuffle steps "
                                                      "(torch.profiler, CPU) into this JSON")
    parser.add_argument("--out", default=str(ROOT / "bench/results/train_cpu.json"))
    return parser.parse_args()


def build_steps(args: argparse.Namespace, device: torch.device, autocast) -> tuple:
    """The model, its training steps per variant (one AdamW, one synthetic batch) and their
    FLOPs; returns (model, image size, fused attention?, fused AdamW?, steps, FLOPs)."""
    model, size = make_model(args.arch, device)
    model.train()
    fused_attention = args.attention == "fused" or (args.attention == "pipeline"
                                                    and device.type == "cuda")
    model.use_fused_attention(fused_attention)  # model.vit's modules: timm_plain runs it too
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(args.batch, 3, size, size, device=device)
    labels = torch.randint(0, 10, (args.batch,), device=device)
    fused_adamw = args.optimizer == "fused" or (args.optimizer == "pipeline"
                                                and device.type in FUSED_ADAMW_DEVICES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=fused_adamw or None)
    steps = {v: step_fn(model, v, images, labels, optimizer, autocast, generator)
             for v in VARIANTS}
    flops = {v: step_flops(steps[v]) for v in VARIANTS}  # eager: compiled kernels are not counted
    if args.compile:  # the blocks only: orders stay free; compiled in the first warm-up steps
        torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
        for block in model.vit.blocks:
            block.compile()
    return model, size, fused_attention, fused_adamw, steps, flops


def timed_rounds(args: argparse.Namespace, steps: dict, dtype: torch.dtype,
                 device: torch.device) -> tuple[dict, dict, list]:
    """`args.rounds` rounds of every variant (order rotating), a matmul peak before each;
    returns images/s and ratios to timm_plain per variant, and the peaks."""
    rates: dict = {v: [] for v in VARIANTS}
    ratios: dict = {v: [] for v in VARIANTS}
    peaks = []
    for round_index in range(args.rounds):
        peaks.append(matmul_peak(args.peak_size, dtype, device))
        order = VARIANTS[round_index % 3:] + VARIANTS[:round_index % 3]
        this_round = {}
        for variant in order:
            for _ in range(3):
                steps[variant]()
            sync(device)
            started = time.perf_counter()
            for _ in range(args.steps):
                steps[variant]()
            sync(device)
            this_round[variant] = args.batch * args.steps / (time.perf_counter() - started)
        for variant in VARIANTS:
            rates[variant].append(this_round[variant])
            ratios[variant].append(this_round[variant] / this_round["timm_plain"])
        print(f"round {round_index + 1}: " + ", ".join(
            f"{v} {this_round[v]:.0f} img/s" for v in VARIANTS) +
            f", peak {peaks[-1] / 1e9:.1f} GFLOP/s", flush=True)
    return rates, ratios, peaks


def variant_results(rates: dict, ratios: dict, flops: dict, peak: float, batch: int) -> dict:
    """Per variant: images/s and ratio to timm_plain (median, min, max), and FLOP/s achieved."""
    results = {}
    for variant in VARIANTS:
        rate = statistics.median(rates[variant])
        achieved = flops[variant] / batch * rate
        results[variant] = {
            "images_per_s": {"median": round(rate, 1), "min": round(min(rates[variant]), 1),
                             "max": round(max(rates[variant]), 1)},
            "ratio_to_timm_plain": {"median": round(statistics.median(ratios[variant]), 3),
                                    "min": round(min(ratios[variant]), 3),
                                    "max": round(max(ratios[variant]), 3)},
            "step_gflops": round(flops[variant] / 1e9, 3),
            "achieved_gflops_per_s": round(achieved / 1e9, 2),
            "fraction_of_peak": round(achieved / peak, 3),
        }
    return results


def write_profile(args: argparse.Namespace, step, report: dict, model, dtype: torch.dtype,
                  device: torch.device) -> None:
    """Profile LayerShuffle steps and time the model's own matmuls into `args.profile`."""
    profiled = profile_steps(step)
    profiled.update(command=report["command"], date=report["date"], batch=args.batch,
                    matmul_peak_gflops_per_s=report["matmul_peak_gflops_per_s"]["median"])
    # The model's own matmuls: (batch x tokens, width) @ (width, 3 width) for qkv, and the
    # MLP's; timed like the peak, in the same dtype.
    tokens = model.vit.patch_embed.num_patches + 1
    width = model.vit.embed_dim
    hidden = model.vit.blocks[0].mlp.fc1.out_features
    profiled["model_matmuls_gflops_per_s"] = {
        f"{args.batch * tokens}x{width}@{width}x{out}": round(
            matmul_rate(args.batch * tokens, width, out, dtype, device) / 1e9, 2)
        for out in (3 * width, hidden)}
    print(json.dumps(profiled["by_kind"], indent=1))
    write(args.profile, profiled)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    autocast = torch.autocast(device_type=device.type, dtype=torch.bfloat16,
                              enabled=args.dtype == "bf16")
    model, size, fused_attention, fused_adamw, steps, flops = build_steps(args, device, autocast)
    rates, ratios, peaks = timed_rounds(args, steps, dtype, device)
    peak = statistics.median(peaks)
    results = variant_results(rates, ratios, flops, peak, args.batch)
    report = {
        **header(torch=torch.__version__, threads=args.threads,
                 device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu"),
        "model": {"arch": args.arch, "image_size": size, "depth": model.depth,
                  "parameters": sum(p.numel() for p in model.parameters())},
        "attention": "fused" if fused_attention else "plain",
        "batch": args.batch, "steps": args.steps, "rounds": args.rounds, "dtype": args.dtype,
        "fused_adamw": fused_adamw, "compiled_blocks": args.compile,
        "matmul_peak_gflops_per_s": {"median": round(peak / 1e9, 2),
                                     "min": round(min(peaks) / 1e9, 2),
                                     "max": round(max(peaks) / 1e9, 2),
                                     "size": args.peak_size},
        "results": results,
    }
    print(json.dumps(results, indent=1))
    write(args.out, report)
    if args.profile:
        write_profile(args, steps["layershuffle"], report, model, dtype, device)


if __name__ == "__main__":
    main()

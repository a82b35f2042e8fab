"""Memory and throughput of the data path at 224 px: does memory stay flat as the data grows, and
is the loader ever the bottleneck?

    python bench/data_bench.py [--sizes 10000 40000] [--work /tmp/anyorder-data-bench]
                               [--device cpu|cuda] [--arch tiny|vit_s] [--no-throughput]
                               [--out bench/results/data_224.json]
    torchrun --nproc_per_node N bench/data_bench.py --epoch-only DIR --device cuda --arch vit_s

1. A generated ImageFolder of 224x224 JPEGs (10 classes; each image a random 14x14 pattern
   enlarged, so it compresses like a photo rather than like noise) per size, kept in --work.
2. Memory: for each size, in fresh processes, the peak RSS (the kernel's ru_maxrss of that
   process) of `prepare` (decode, resize, split, write) and of one LayerShuffle training epoch
   (a tiny ViT, patch 16, width 32, depth 4, batch 64, with its validation pass; or ViT-S/16
   with --arch vit_s) on the prepared files, on --device, its images/s; the growth from the
   smallest to the largest size. On a GPU the epoch's images/s next to bench/train_bench.py's
   (synthetic batches already on the device) says what reading from disk costs.
3. Throughput, images/s per core: decoding + resizing a JPEG (what prepare does, one thread);
   reading prepared batches (the DataLoader's work, one process); converting and augmenting a
   batch (normalise + random shift, on this CPU); and the training step itself (forward +
   backward + AdamW) of the tiny ViT and of a ViT-S/16 at 224 px, per core of this machine.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "bench"))

from _report import header, write  # noqa: E402  (bench/_report.py)

SIZE = 224
CLASSES = 10


def generate(root: Path, count: int) -> Path:
    """An ImageFolder of `count` 224x224 JPEGs (made once, reused)."""
    import numpy as np
    from PIL import Image
    done = root / ".complete"
    if done.is_file() and done.read_text() == str(count):
        return root
    rng = np.random.default_rng(count)
    for c in range(CLASSES):
        (root / f"class{c}").mkdir(parents=True, exist_ok=True)
    for i in range(count):
        small = rng.integers(0, 256, (14, 14, 3), dtype=np.uint8)
        image = Image.fromarray(small).resize((SIZE, SIZE), Image.BILINEAR)
        image.save(root / f"class{i % CLASSES}" / f"{i:06d}.jpg", quality=90)
    done.write_text(str(count))
    return root


ARCHS = {  # name -> ModelSpec fields; both LayerShuffle, patch 16 at 224 px
    "tiny": dict(arch="vit_tiny_patch16_224", embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0),
    "vit_s": dict(arch="vit_small_patch16_224", embed_dim=384, depth=12, num_heads=6,
                  mlp_ratio=4.0),
}


def tiny_spec(arch: str = "tiny"):
    from anyorder.model.spec import ModelSpec
    return ModelSpec(num_classes=CLASSES, img_size=SIZE, variant="ls", patch_size=16,
                     class_names=[f"class{c}" for c in range(CLASSES)], **ARCHS[arch])


def child_prepare(tree: str, out: str) -> dict:
    from anyorder.data.prepare import prepare_dataset
    meta = prepare_dataset("imagefolder", tree, SIZE, 0.15, 0.2, 0, out)
    return {"counts": meta["counts"]}


def child_epoch(prepared: str, device: str = "cpu", arch: str = "tiny") -> dict:
    import torch
    from anyorder.data.prepared import load_split
    from anyorder.model.vit import build_model
    from anyorder.training.loop import train_model
    from anyorder.training.settings import TrainConfig
    torch.manual_seed(0)
    model = build_model(tiny_spec(arch))
    nproc = int(os.environ.get("WORLD_SIZE", "1"))
    cfg = TrainConfig(epochs=1, batch_size=64 if arch == "tiny" else 256, lr=1e-3,
                      shift_pixels=2, device=device, nproc=nproc)
    train = load_split(prepared, "train")
    result = train_model(model, train, load_split(prepared, "val"), cfg, seed=0, progress=False)
    seconds = result.epoch_seconds[0]  # the epoch and its validation pass
    return {"train_images": int(len(train[1])), "arch": arch, "device": device,
            "processes": nproc, "seconds": round(seconds, 1),
            "train_images_per_s": round(len(train[1]) / seconds, 1)}


def measured(task: str, *args: str, threads: int) -> dict:
    """Run `task` in a fresh process; its result plus its peak RSS in MiB."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT / "src")}
    code = (f"import json, sys; sys.path.insert(0, {str(ROOT / 'bench')!r}); import data_bench; "
            f"print(json.dumps(data_bench.child_{task}(*sys.argv[1:])))")
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    out = proc.stdout.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        raise SystemExit(f"{task} {args} failed ({proc.returncode})")
    result = json.loads(out.strip().splitlines()[-1])
    return {**result, "peak_rss_mib": round(usage.ru_maxrss / 1024, 1),
            "wall_seconds": round(time.perf_counter() - started, 1)}


def rate(fn, items_per_call: int, seconds: float = 3.0) -> float:
    """Calls of fn per `seconds` (after one warm-up) -> items per second."""
    fn()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        fn()
        calls += 1
    return calls * items_per_call / (time.perf_counter() - started)


def throughput(tree: Path, prepared: Path) -> dict:
    import numpy as np
    import torch
    from anyorder.data.images import read_image
    from anyorder.data.inputs import random_shift, to_model_input
    from anyorder.data.loader import batch_loader
    from anyorder.data.prepared import load_split
    from anyorder.model.vit import build_model

    torch.set_num_threads(1)
    files = sorted(tree.glob("class0/*.jpg"))[:200]
    position = iter(range(10 ** 9))
    decode = rate(lambda: read_image(files[next(position) % len(files)], SIZE), 1)
    images, labels = load_split(prepared, "train")
    rng = np.random.default_rng(0)
    batches = [rng.permutation(len(labels))[:64] for _ in range(40)]
    started = time.perf_counter()
    for _ in batch_loader(images, labels, batches, workers=0):
        pass
    read = 40 * 64 / (time.perf_counter() - started)
    spec = tiny_spec("tiny")
    batch = torch.from_numpy(images[batches[0]])
    gen = torch.Generator().manual_seed(0)
    augment = rate(lambda: random_shift(to_model_input(batch, spec), 2, gen), 64)
    threads = os.cpu_count() or 1
    torch.set_num_threads(threads)
    steps = {}
    for name, model_spec, size in (("tiny_p16_w32_d4", spec, 64),
                                   ("vit_small_patch16_224", tiny_spec("vit_s"), 16)):
        torch.manual_seed(0)
        model = build_model(model_spec)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        x = torch.randn(size, 3, SIZE, SIZE)
        y = torch.randint(0, CLASSES, (size,))

        def step():
            loss = torch.nn.functional.cross_entropy(model(x, torch.randperm(model.depth)), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        per_second = rate(step, size, seconds=10.0)
        steps[name] = {"batch": size, "images_per_s": round(per_second, 1),
                       "images_per_s_per_core": round(per_second / threads, 1)}
    return {
        "per_core_images_per_s": {
            "decode_and_resize_jpeg (prepare, once)": round(decode, 1),
            "read_prepared_batches (DataLoader)": round(read, 1),
            "to_model_input_and_random_shift (on the device; CPU here)": round(augment, 1),
        },
        "training_step": {**steps, "threads": threads},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10000, 40000])
    parser.add_argument("--work", type=Path, default=Path("/tmp/anyorder-data-bench"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="tiny")
    parser.add_argument("--no-throughput", action="store_true")
    parser.add_argument("--epoch-only", type=Path, help="train one epoch on this prepared "
                        "directory and print the result (under torchrun: every process)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench/results/data_224.json")
    args = parser.parse_args()
    if args.epoch_only:
        print(json.dumps(child_epoch(str(args.epoch_only), args.device, args.arch)))
        return
    threads = os.cpu_count() or 1
    memory = {}
    for count in args.sizes:
        tree = generate(args.work / f"tree{count}", count)
        prepared = args.work / f"prepared{count}"
        print(f"{count} images: prepare ...", flush=True)
        prepare = measured("prepare", str(tree), str(prepared), threads=threads)
        print(f"  {prepare}\n{count} images: one training epoch ...", flush=True)
        epoch = measured("epoch", str(prepared), args.device, args.arch, threads=threads)
        print(f"  {epoch}", flush=True)
        memory[count] = {"prepare": prepare, "train_epoch": epoch}
    small, large = memory[min(args.sizes)], memory[max(args.sizes)]
    growth = {task: round(large[task]["peak_rss_mib"] / small[task]["peak_rss_mib"] - 1, 4)
              for task in ("prepare", "train_epoch")}
    smallest = min(args.sizes)
    report = {**header(threads=threads), "image_size": SIZE,
              "memory": {str(k): v for k, v in memory.items()},
              "peak_rss_growth": growth}
    if not args.no_throughput:
        report["throughput"] = throughput(args.work / f"tree{smallest}",
                                          args.work / f"prepared{smallest}")
    print(json.dumps(report, indent=2))
    write(args.out, report)


if __name__ == "__main__":
    main()

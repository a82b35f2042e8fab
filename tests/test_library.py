"""The library runs where only its own dependencies exist (the GPU machine has torch, timm, numpy,
safetensors, onnx and onnxruntime, and nothing can be installed there quickly)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import EMBEDDED, ROOT

# Everything the pipeline, the tests and the coming export need, that the library must not.
ABSENT = ("dvc", "mlflow", "prefect", "fastapi", "sqlalchemy", "sklearn", "pandas", "onnx",
          "onnxruntime", "onnxscript", "onnx_ir", "matplotlib", "git", "pytest")

ISOLATED = textwrap.dedent("""
    import importlib, pkgutil, sys, tempfile
    ABSENT = __ABSENT__
    for name in ABSENT:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise SystemExit(f"the isolation leaks: {name} is importable")
    import anyorder
    for module in pkgutil.iter_modules(anyorder.__path__):
        importlib.import_module(f"anyorder.{module.name}")

    # ...and it works: prepare, build, train an epoch, save, load, evaluate.
    import torch
    torch.set_num_threads(1)
    from anyorder.checkpoint import load_model
    from anyorder.config import ModelConfig, TrainConfig
    from anyorder.data import load_meta, load_split, prepare_dataset
    from anyorder.evaluate import evaluate_orders
    from anyorder.model import build_model, model_spec
    from anyorder.train import train_and_save
    work = tempfile.mkdtemp()
    prepare_dataset("npz", __DATA__, 16, 0.15, 0.2, 0, work + "/prepared")
    meta = load_meta(work + "/prepared")
    spec = model_spec(ModelConfig(patch_size=4, embed_dim=16, depth=2, num_heads=2),
                      16, meta["class_names"], "ls")
    model = build_model(spec, seed=0)
    train_and_save(model, work + "/prepared", TrainConfig(epochs=1, device="cpu"), 0,
                   work + "/model")
    result = evaluate_orders(load_model(work + "/model"), *load_split(work + "/prepared", "test"),
                             num_orders=2, seed=0)
    assert 0.0 <= result["arbitrary"]["mean"] <= 1.0
    print("library ok")
""")


def test_the_library_imports_and_trains_without_the_orchestration_stack(tmp_path):
    """A site-packages with only what is left when the orchestration stack is not installed
    (links to every other package), and no site processing: `python -S`."""
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    bare = tmp_path / "site-packages"
    bare.mkdir()
    for entry in site_packages.iterdir():
        name = entry.name.split(".")[0] if entry.suffix in (".py", ".so") else entry.name
        if name not in ABSENT and not entry.name.endswith(".pth"):
            (bare / entry.name).symlink_to(entry)
    script = (ISOLATED.replace("__ABSENT__", repr(ABSENT))
              .replace("__DATA__", repr(str(EMBEDDED))))
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path,
                          env={**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{bare}"})
    assert proc.returncode == 0 and "library ok" in proc.stdout, proc.stderr[-3000:]

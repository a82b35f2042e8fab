"""The library runs where only its own dependencies exist (the GPU machine has torch, timm, numpy,
safetensors, onnx and onnxruntime, and nothing can be installed there quickly)."""
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import EMBEDDED, ROOT

# Everything the pipeline and the tests need, that the library must not.
ABSENT = ("dvc", "mlflow", "prefect", "fastapi", "sqlalchemy", "sklearn", "pandas", "onnxscript",
          "onnx_ir", "matplotlib", "git", "pytest")
# Serving an export needs even less: the runtime and the MLflow loader module run without torch.
ABSENT_WHEN_SERVING = ABSENT + ("torch", "torchvision", "timm", "safetensors", "onnx")

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
    from anyorder.model.checkpoint import load_model
    from anyorder.model.settings import ModelConfig, ModelOverrides
    from anyorder.training.settings import TrainConfig
    from anyorder.data.prepare import prepare_dataset
    from anyorder.data.prepared import load_meta, load_split
    from anyorder.evaluation.accuracy import evaluate_orders
    from anyorder.model.spec import model_spec
    from anyorder.model.vit import build_model
    from anyorder.training.loop import train_and_save
    work = tempfile.mkdtemp()
    prepare_dataset("npz", __DATA__, 16, 0.15, 0.2, 0, work + "/prepared")
    meta = load_meta(work + "/prepared")
    spec = model_spec(ModelConfig(overrides=ModelOverrides(patch_size=4, embed_dim=16, depth=2,
                                                           num_heads=2)),
                      16, meta["class_names"], "ls")
    model = build_model(spec, seed=0)
    train_and_save(model, work + "/prepared", TrainConfig(epochs=1, device="cpu"), 0,
                   work + "/model")
    result = evaluate_orders(load_model(work + "/model"), *load_split(work + "/prepared", "test"),
                             num_orders=2, seed=0)
    assert result["arbitrary"]["count"] == 2 == len(result["order_accuracies"])
    # ...and exports, and the runtime runs the export (onnx and onnxruntime, no exporter extras).
    from anyorder.export.blocks import check_export, export_model
    from anyorder.export.runtime import BlockRuntime
    trained = load_model(work + "/model")
    export_model(trained, work + "/export", "tiny")
    assert check_export(trained, work + "/export", num_orders=2)["max_abs_error"] <= 1e-4
    images, labels = load_split(work + "/prepared", "test")
    runtime = BlockRuntime(work + "/export")
    assert runtime.predict(images[:8], [1, 0]).executed_order == [1, 0]
    print("library ok")
""")


def without(packages: tuple, tmp_path: Path) -> dict:
    """The environment of a Python whose site-packages lacks `packages` (links to every other
    entry of ours) and that processes no .pth files: run it as `python -S`."""
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    bare = tmp_path / "site-packages"
    bare.mkdir()
    for entry in site_packages.iterdir():
        name = entry.name.split(".")[0] if entry.suffix in (".py", ".so") else entry.name
        if name not in packages and not entry.name.endswith(".pth"):
            (bare / entry.name).symlink_to(entry)
    return {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{bare}"}


def test_the_library_imports_trains_and_exports_without_the_orchestration_stack(tmp_path):
    script = (ISOLATED.replace("__ABSENT__", repr(ABSENT))
              .replace("__DATA__", repr(str(EMBEDDED))))
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=without(ABSENT, tmp_path))
    assert proc.returncode == 0 and "library ok" in proc.stdout, proc.stderr[-3000:]


SERVING = textwrap.dedent("""
    import importlib, sys
    for name in __ABSENT__:
        try:
            importlib.import_module(name)
        except ImportError:
            continue
        raise SystemExit(f"the isolation leaks: {name} is importable")
    import numpy as np
    from anyorder.pyfunc import _load_pyfunc
    model = _load_pyfunc(__EXPORT__)
    out = model.predict(np.zeros((2, 16, 16, 3), np.uint8), params={"order": "1,0"})
    assert out["logits"].shape == (2, 10) and out["executed_order"].tolist() == [[1, 0], [1, 0]]
    print("serving ok")
""")


def test_an_export_is_served_without_torch(tmp_path):
    """Where the model is only served (mlflow models serve, a small box), numpy and onnxruntime
    are all the runtime and the MLflow loader module need."""
    from anyorder.export.blocks import export_model
    from conftest import tiny_model
    export_model(tiny_model("ls", depth=2), tmp_path / "export", "tiny")
    script = (SERVING.replace("__ABSENT__", repr(ABSENT_WHEN_SERVING))
              .replace("__EXPORT__", repr(str(tmp_path / "export"))))
    proc = subprocess.run([sys.executable, "-S", "-c", script], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path, env=without(ABSENT_WHEN_SERVING, tmp_path))
    assert proc.returncode == 0 and "serving ok" in proc.stdout, proc.stderr[-3000:]

"""The MLflow pyfunc flavor of an export: `mlflow.pyfunc.load_model("models:/<name>@champion")` and
`mlflow models serve` run the order-agnostic runtime through this module.

MLflow finds it by name (`loader_module="anyorder.pyfunc"`), so anyone with this package
installed can load a registered model; it imports neither MLflow nor torch (only the runtime's
numpy and onnxruntime), which is also why it is a loader module rather than a PythonModel class.

Input: uint8 images (N, H, W, 3) at the model's size. Inference params (declared in the model's
signature, `PARAMS`): `order` ("sequential", "random" or block indices such as "3,0,2"), `seed`
(for "random"), `policy` ("skip", "fail", "min_blocks:K") and `exclude` (blocks to treat as
missing, "2,5"). Output: {"logits" (N, K), "class_index" (N,), "executed_order" (N, k): the order
that ran, the same for every row}.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from anyorder.export.runtime import BlockRuntime, parse_indices
from anyorder.export.sources import find_export

# name -> (MLflow param type, default); `register` turns these into the model's ParamSchema.
PARAMS = {"order": ("string", "sequential"), "seed": ("long", 0), "policy": ("string", "skip"),
          "exclude": ("string", "")}


class AnyOrderModel:
    """A loaded export; `predict` runs it (no type hints on it: MLflow 3 inspects them)."""

    def __init__(self, export_dir):
        self.export_dir = Path(export_dir)
        self.runtime = BlockRuntime(self.export_dir)

    def predict(self, model_input, params=None):
        params = {name: default for name, (_, default) in PARAMS.items()} | dict(params or {})
        exclude = parse_indices(params["exclude"], "exclude")
        images = model_input
        if isinstance(images, dict):  # a named tensor input
            images = next(iter(images.values()))
        result = self.runtime.predict(np.asarray(images), order=str(params["order"]),
                                      seed=int(params["seed"]), policy=str(params["policy"]),
                                      exclude=exclude)
        rows = len(result.logits)
        return {"logits": result.logits,
                "class_index": result.predictions.astype(np.int64),
                "executed_order": np.tile(np.asarray(result.executed_order, np.int64), (rows, 1))}


def _load_pyfunc(data_path):
    """MLflow's entry point: `data_path` is the logged export directory (or holds one)."""
    return AnyOrderModel(find_export(data_path) or data_path)

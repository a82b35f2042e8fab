"""Quality gates of the model registry: a version becomes the alias (e.g. `champion`) only if its
export measured up. Plain Python: the numbers come from the export's manifest and check."""
from __future__ import annotations

from dataclasses import dataclass

from anyorder.settings import Section, require


@dataclass(frozen=True)
class Gates(Section):
    """Quality gates: the registry alias moves only to a version that passes all of them."""
    min_sequential_accuracy: float = 0.0
    min_arbitrary_accuracy: float = 0.9   # mean test accuracy over the evaluated random orders
    max_export_error: float = 1e-4        # worst |ONNX - PyTorch| of logits found by the export

    def check(self, key: str) -> None:
        for name in ("min_sequential_accuracy", "min_arbitrary_accuracy"):
            require(0.0 <= getattr(self, name) <= 1.0, f"{key}.{name}", "must be in [0, 1]",
                    getattr(self, name))
        require(self.max_export_error > 0, f"{key}.max_export_error", "must be > 0",
                self.max_export_error)


def check_gates(gates: Gates, manifest: dict, export_check: dict) -> dict:
    """{"passed": bool, "gates": {name: {value, threshold, passed}}, "failed": [why, ...]}.

    manifest: an export's manifest (its "accuracy": the evaluate stage's test accuracies);
    export_check: the export stage's metrics (its "max_abs_error": worst |ONNX - PyTorch|)."""
    accuracy = manifest.get("accuracy") or {}
    measured = {
        "min_sequential_accuracy": (accuracy.get("sequential"), ">="),
        "min_arbitrary_accuracy": ((accuracy.get("arbitrary") or {}).get("mean"), ">="),
        "max_export_error": (export_check.get("max_abs_error"), "<="),
    }
    results, failed = {}, []
    for name, (value, direction) in measured.items():
        threshold = getattr(gates, name)
        passed = value is not None and (value >= threshold if direction == ">=" else
                                        value <= threshold)
        results[name] = {"value": value, "threshold": threshold, "passed": passed}
        if not passed:
            failed.append(f"{name}: {value} is not {direction} {threshold}" if value is not None
                          else f"{name}: not measured")
    return {"passed": not failed, "gates": results, "failed": failed}

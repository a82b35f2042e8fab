"""Checkpoints: safetensors weights + a JSON of the model spec; never pickles.

Every write goes to a temporary file in the same directory and is renamed into place, so a
process killed mid-write leaves the previous file intact.
"""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors.torch import load_file, save_file

from .model import AnyOrderViT, ModelSpec, build_model

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def atomic_save_tensors(path: str | Path, tensors: dict[str, torch.Tensor],
                        metadata: Optional[dict[str, str]] = None) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp,
                  metadata=metadata)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_model(model: AnyOrderViT, directory: str | Path, extra: Optional[dict] = None) -> None:
    """Write `model.safetensors` and `model.json` (the spec, plus `extra` facts) into directory."""
    directory = Path(directory)
    atomic_save_tensors(directory / WEIGHTS, model.state_dict())
    atomic_write_json(directory / SPEC, {"spec": model.spec.to_dict(), **(extra or {})})


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> AnyOrderViT:
    """Rebuild a model from a directory written by `save_model`."""
    directory = Path(directory)
    for name in (WEIGHTS, SPEC):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"{directory / name}: missing; is {directory} a model "
                                    f"directory written by this project (run its training stage)?")
    spec = ModelSpec.from_dict(json.loads((directory / SPEC).read_text())["spec"])
    model = build_model(spec)
    model.load_state_dict(load_file(directory / WEIGHTS, device=str(map_location)))
    return model


def load_model_into(model: torch.nn.Module, directory: str | Path, strict: bool = True) -> list[str]:
    """Load weights of `directory` into an existing model; return the keys it did not have."""
    state = load_file(Path(directory) / WEIGHTS)
    result = model.load_state_dict(state, strict=strict)
    return list(result.missing_keys)


# -- training state (for resume) -------------------------------------------------------------------

def optimizer_state_to_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """Split an optimizer state dict into flat tensors and a JSON-able remainder."""
    state = optimizer.state_dict()
    tensors, scalars = {}, {}
    for param_id, param_state in state["state"].items():
        for key, value in param_state.items():
            name = f"{param_id}.{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def optimizer_state_from_tensors(tensors: dict, info: dict) -> dict:
    state: dict[int, dict] = {}
    for name, value in list(tensors.items()) + list(info["scalars"].items()):
        param_id, key = name.split(".", 1)
        state.setdefault(int(param_id), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}

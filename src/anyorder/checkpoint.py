"""Checkpoints: safetensors weights + a JSON of the model spec; never pickles.

Every file is written atomically (`anyorder.files`): a process killed mid-write leaves the
previous file intact.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file

from .errors import InputError
from .files import atomic_save_tensors, atomic_write_json
from .model import AnyOrderViT, ModelSpec, build_model

WEIGHTS = "model.safetensors"
SPEC = "model.json"


def save_model(model: AnyOrderViT, directory: str | Path, extra: Optional[dict] = None) -> None:
    """Write `model.safetensors` and `model.json` (the spec, plus `extra` facts) into directory."""
    directory = Path(directory)
    atomic_save_tensors(directory / WEIGHTS, model.state_dict())
    atomic_write_json(directory / SPEC, {"spec": model.spec.to_dict(), **(extra or {})})


class CheckpointError(InputError):
    """A model directory that is missing or not one this project wrote."""


def load_model(directory: str | Path, map_location: str | torch.device = "cpu") -> AnyOrderViT:
    """Rebuild a model from a directory written by `save_model`."""
    directory = Path(directory)
    for name in (WEIGHTS, SPEC):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory / name}: missing; is {directory} a model "
                                    f"directory written by this project (run its training stage)?")
    spec = ModelSpec.from_dict(json.loads((directory / SPEC).read_text())["spec"])
    model = build_model(spec)
    model.load_state_dict(load_file(directory / WEIGHTS, device=str(map_location)))
    return model


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of tensors (a state dict)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


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

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

from anyorder.errors import InputError
from anyorder.files import atomic_save_tensors, atomic_write_json
from anyorder.model.spec import ModelSpec
from anyorder.model.vit import AnyOrderViT, build_model

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


def training_record(directory: str | Path) -> dict:
    """What `model.json` records of how the model was trained (seed, settings, final epoch;
    empty for a model trained elsewhere)."""
    return json.loads((Path(directory) / SPEC).read_text()).get("training", {})


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes of a dict of tensors (a state dict)."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}\0".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def load_start_weights(model: AnyOrderViT, directory: str | Path) -> None:
    """Load the weights of a start model (the pre-trained model a fine-tune begins from) into
    `model`, strictly: every key of `model` must come from the start except the parts its variant
    adds (`AnyOrderViT.variant_parts`: LS-pos adapters and slot table, LS-pred heads), which keep
    their fresh initialisation; every key of the start must be used except the blocks a shallower
    model leaves out. Anything else (a key renamed by a timm upgrade, a start of another
    architecture) raises CheckpointError naming the keys, before any training."""
    directory = Path(directory)
    if not (directory / WEIGHTS).is_file():
        raise CheckpointError(f"{directory / WEIGHTS}: missing; run the stage that writes the "
                              f"start model first")
    state = load_file(directory / WEIGHTS)
    own = model.state_dict()
    fresh = tuple(model.variant_parts())
    missing = sorted(k for k in own if k not in state and not k.startswith(fresh))
    left_out = {k for k in state if k.startswith("vit.blocks.")
                and int(k.split(".")[2]) >= model.depth}  # a shallower model's missing blocks
    unexpected = sorted(k for k in state if k not in own and k not in left_out)
    wrong_shape = sorted(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
                         if k in state and state[k].shape != own[k].shape)
    problems = [f"{what} ({len(keys)}): {', '.join(keys[:5])}{' ...' if len(keys) > 5 else ''}"
                for what, keys in (("missing from the start", missing),
                                   ("not used by this model", unexpected),
                                   ("of another shape", wrong_shape)) if keys]
    if problems:
        raise CheckpointError(
            f"{directory / WEIGHTS} does not fit this {model.variant} model: "
            f"{'; '.join(problems)}. The start must be the same timm architecture written by "
            f"this project's code (a renamed key means another timm version or another model); "
            f"rerun the stage that writes it")
    model.load_state_dict({k: v for k, v in state.items() if k in own}, strict=False)


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

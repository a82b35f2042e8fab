"""Loading a local file of timm weights into a timm ViT, strictly.

timm's own loader (`pretrained=True` with a file) drops the classifier when the number of classes
differs and then loads with `strict=False`, so a file that lacks a block or carries keys of
another model loads silently. Here every tensor of the model must come from the file and every
tensor of the file must be used; the one exception is the classifier (`head.*`) when its shape
differs from the model's (another number of classes): it keeps its fresh initialisation, and the
report names it. Position and patch embeddings of another grid are resampled with timm's own
`checkpoint_filter_fn` (the same conversion timm applies), so the image size (`data.image_size`,
`model.overrides.img_size`) and `model.overrides.patch_size` may differ from the file's.
"""
from __future__ import annotations

from pathlib import Path

import torch.nn as nn

from anyorder.model.spec import ModelSettingsError

SHOWN = 8  # key names listed in an error before "and N more"


def _names(keys: list[str]) -> str:
    more = f" and {len(keys) - SHOWN} more" if len(keys) > SHOWN else ""
    return ", ".join(keys[:SHOWN]) + more


def load_timm_weights(vit: nn.Module, file: str | Path) -> dict:
    """Load the .safetensors file `file` of timm weights into `vit` (a timm VisionTransformer);
    ModelSettingsError naming `model.pretrained` and the keys if the file does not fit. Returns
    {"file", "loaded": tensors taken from the file, "new": classifier keys left fresh}."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from timm.models.vision_transformer import checkpoint_filter_fn

    where = f"model.pretrained: the weights {str(file)!r}"
    try:
        state = load_file(str(file))
    except (SafetensorError, OSError) as exc:
        raise ModelSettingsError(f"{where} cannot be read: {exc}") from exc
    own = vit.state_dict()
    try:
        state = checkpoint_filter_fn(state, vit)
    except (RuntimeError, ValueError, KeyError, IndexError) as exc:
        raise ModelSettingsError(f"{where} do not load into {type(vit).__name__}: "
                                 f"{str(exc).splitlines()[0][:300]}") from exc
    new = sorted(k for k in own if k.startswith("head.") and k in state
                 and state[k].shape != own[k].shape)
    for key in new:
        del state[key]
    missing = sorted(set(own) - set(state) - set(new))
    unexpected = sorted(set(state) - set(own))
    wrong = sorted(k for k in set(own) & set(state) if state[k].shape != own[k].shape)
    problems = []
    if missing:
        problems.append(f"the model's {_names(missing)} missing from the file")
    if unexpected:
        problems.append(f"the file's {_names(unexpected)} unknown to the model")
    if wrong:
        problems.append("shapes differ for " + _names(
            [f"{k} (file {tuple(state[k].shape)}, model {tuple(own[k].shape)})" for k in wrong]))
    if problems:
        raise ModelSettingsError(f"{where} do not load into this model strictly: "
                                 f"{'; '.join(problems)}; set the model's overrides to the shapes "
                                 f"the weights were trained with")
    vit.load_state_dict({**{k: own[k] for k in new}, **state}, strict=True)
    return {"file": str(file), "loaded": len(state), "new": new}

"""Picking the torch device a setting names, refused before any compute if this machine lacks it."""
from __future__ import annotations

import torch

from anyorder.settings import ConfigError, check_device


def resolve_device(name: str = "auto", key: str = "device") -> torch.device:
    """"auto" -> CUDA when available, else CPU; "cpu", "cuda" or "cuda:N" when torch sees it.

    Anything else, or a CUDA device this machine does not have, raises ConfigError naming `key`
    (the setting it came from), so a stage can refuse it before any compute.
    """
    check_device(name, key)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ConfigError(f"{key}: {name!r} asked for, but torch sees no CUDA device on this "
                              f"machine; use auto or cpu")
        if (device.index or 0) >= count:
            raise ConfigError(f"{key}: {name!r} asked for, but torch sees only {count} CUDA "
                              f"device(s) (cuda:0..cuda:{count - 1})")
    return device

"""The schema machinery every settings section builds on.

A section is a frozen dataclass deriving from `Section`. `build_section` reads a nested mapping
(parsed YAML) into one, strictly: every problem (an unknown or missing key, a wrong type, a number
that is not finite) raises `ConfigError` naming the dotted key; each section's `check` then
refuses out-of-range values the same way. Only the standard library is used, so settings load
where torch is not installed.

Sections also know which of their keys were read: once a stage restricts them to the keys it
declares (`anyorder.config.Settings.restrict_to`), reading any other raises `UndeclaredParamError`.
"""
from __future__ import annotations

import copy
import dataclasses
import math
import re
import types
import typing
from typing import Any, ClassVar, Literal, Optional

from anyorder.errors import InputError

_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class ConfigError(InputError):
    """A setting is unknown, missing, of the wrong type or out of range; the message names the
    key."""


class UndeclaredParamError(RuntimeError):
    """A stage read a setting its DVC stage does not declare (a bug in dvc.yaml or the stage)."""


# -- access tracking ---------------------------------------------------------------------------

class AccessLog:
    """The keys read from one settings tree, checked against the keys a stage declared."""

    def __init__(self, stage: str, declared: list[str]):
        self.stage, self.declared, self.read = stage, list(declared), set()

    def record(self, key: str) -> None:
        self.read.add(key)
        if not any(key == d or key.startswith(d + ".") for d in self.declared):
            raise UndeclaredParamError(
                f"stage {self.stage} reads the setting {key}, which its entry in dvc.yaml does not "
                f"list under params (declared: {', '.join(self.declared) or 'none'}); add it there, "
                f"or DVC will not rerun the stage when it changes")


class Section:
    """Base of every settings section: leaf reads are recorded once a stage restricts them."""

    # Keys a params file may leave out (their dataclass default applies); every other is required.
    OPTIONAL_KEYS: ClassVar[tuple[str, ...]] = ()

    def __getattribute__(self, name: str) -> Any:
        value = object.__getattribute__(self, name)
        if not name.startswith("_") and name in type(self).__dataclass_fields__:
            log = object.__getattribute__(self, "__dict__").get("_log")
            if log is not None and not isinstance(value, (Section, Entries)):
                log.record(f"{object.__getattribute__(self, '_key')}.{name}")
        return value

    def _attach(self, log: AccessLog, key: str) -> None:
        object.__setattr__(self, "_log", log)
        object.__setattr__(self, "_key", key)
        for f in dataclasses.fields(self):
            value = object.__getattribute__(self, f.name)
            if isinstance(value, (Section, Entries)):
                value._attach(log, f"{key}.{f.name}" if key else f.name)


class Entries(dict):
    """A mapping of named entries (finetune.runs, export.models): reading one entry records that
    entry; listing them records all of them."""

    _log: Optional[AccessLog] = None
    _key = ""

    def _attach(self, log: AccessLog, key: str) -> None:
        self._log, self._key = log, key
        for name, run in dict.items(self):
            run._attach(log, f"{key}.{name}")

    def _all(self) -> None:
        if self._log is not None:
            self._log.record(self._key)

    def __contains__(self, name: object) -> bool:
        if self._log is not None:
            self._log.record(f"{self._key}.{name}")
        return dict.__contains__(self, name)

    def __iter__(self):
        self._all()
        return dict.__iter__(self)

    def __len__(self) -> int:
        self._all()
        return dict.__len__(self)

    def keys(self):
        self._all()
        return dict.keys(self)

    def values(self):
        self._all()
        return dict.values(self)

    def items(self):
        self._all()
        return dict.items(self)


# -- checks ------------------------------------------------------------------------------------

def require(ok: bool, key: str, what: str, value: Any) -> None:
    """ConfigError `key: what, got value` unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}: {what}, got {value!r}")


def check_name(name: str, key: str) -> None:
    """ConfigError unless `name` can name a file (letters, digits, '_' and '-')."""
    require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_-]*", name) is not None, key,
            "names may hold only letters, digits, '_' and '-' (they name files)", name)


def check_device(name: str, key: str) -> None:
    """ConfigError unless `name` is auto, cpu, cuda or cuda:N (whether it exists is checked by
    `anyorder.device.resolve_device`, which needs torch)."""
    require(_DEVICE.fullmatch(name) is not None, key, "must be auto, cpu, cuda or cuda:N", name)


# -- reading -----------------------------------------------------------------------------------

def apply_overrides(raw: dict, overrides: dict[str, Any]) -> dict:
    """A copy of `raw` with dotted-key `overrides` set (a missing section is created)."""
    raw = copy.deepcopy(raw)
    for dotted, value in overrides.items():
        node = raw
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {dotted}: '{part}' is not a section")
        node[leaf] = value
    return raw


def build_section(cls: type, raw: Any, key: str) -> Any:
    """The section `cls` read from the mapping `raw` at dotted `key` ("" for the top level):
    every key of `cls` must be present, except its OPTIONAL_KEYS."""
    where = key or "top level"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: must be a mapping, got {type(raw).__name__} {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    prefix = f"{key}." if key else ""
    unknown = sorted(set(raw) - set(names))
    if unknown:
        raise ConfigError(f"{prefix}{unknown[0]}: unknown key (known keys here: "
                          f"{', '.join(sorted(names))})")
    missing = [name for name in names if name not in raw and name not in cls.OPTIONAL_KEYS]
    if missing:
        raise ConfigError(f"{prefix}{missing[0]}: missing; params.yaml must set it (the pipeline "
                          f"takes no default)")
    values = {name: _coerce(hints[name], raw[name], f"{prefix}{name}")
              for name in names if name in raw}
    return cls(**values)


def _coerce(hint: Any, value: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(inner[0], value, key)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{key}: must be one of {', '.join(map(str, args))}, got {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: must be a list, got {type(value).__name__} {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: must be a mapping, got {type(value).__name__}")
        return Entries({str(k): _coerce(args[1], v, f"{key}.{k}") for k, v in value.items()})
    if dataclasses.is_dataclass(hint):
        return build_section(hint, value if value is not None else {}, key)
    return _scalar(hint, value, key)


def _scalar(hint: Any, value: Any, key: str) -> Any:
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key}: must be true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key}: must be an integer, got {value!r}")
        return value
    if hint is float:
        return _finite_number(value, key)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{key}: must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported setting type {hint!r} for {key}")  # a bug here, not user input


def _finite_number(value: Any, key: str) -> float:
    """A YAML number (or numeric string: YAML reads 1e-3 as one) that is neither NaN nor inf."""
    number = None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        number = float(value)
    elif isinstance(value, str):
        try:
            number = float(value)
        except ValueError:
            pass
    if number is None:
        raise ConfigError(f"{key}: must be a number, got {value!r}")
    if not math.isfinite(number):
        raise ConfigError(f"{key}: must be a finite number, got {value!r}")
    return number

"""Where an export comes from: an export directory, or an MLflow model URI (models:/name@alias,
runs:/...) whose downloaded artifacts hold one; errors about a URI list what the registry holds.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Union

from anyorder.export.runtime import MANIFEST, ExportError


def resolve_source(source: str) -> Path:
    """An export directory, or an MLflow model URI (models:/name@alias, runs:/...) whose
    artifacts hold one (downloaded by MLflow, which must then be installed)."""
    if "://" not in source and not source.startswith(("models:/", "runs:/")):
        return Path(source)
    try:
        import mlflow
    except ImportError:
        raise ExportError(f"{source}: reading an MLflow model URI needs mlflow installed "
                          f"(pip install mlflow), or pass an export directory") from None
    try:
        local = Path(mlflow.artifacts.download_artifacts(source))
    except Exception as exc:
        raise ExportError(f"{source}: MLflow cannot resolve it ({str(exc).splitlines()[0]})"
                          f"{registry_contents(source)}") from None
    found = find_export(local)
    if found is None:
        raise ExportError(f"{source}: no {MANIFEST} in the model's artifacts ({local})")
    return found


def find_export(path: Union[str, Path]) -> Optional[Path]:
    """`path` if it is an export directory, else the first one below it (MLflow nests the
    logged export inside a model's artifacts); None if there is none."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    found = sorted(p.parent for p in path.rglob(MANIFEST))
    return found[0] if found else None


def registry_contents(uri: str) -> str:
    """What the registry holds, for an error about `uri` (models:/name@alias or models:/name/v):
    the registered models, or the named model's versions and aliases."""
    import mlflow

    if not uri.startswith("models:/"):
        return ""
    name = uri[len("models:/"):].split("@")[0].split("/")[0]
    client = mlflow.MlflowClient()
    try:
        models = {m.name: m for m in client.search_registered_models()}
    except Exception as exc:  # the registry itself is unreachable: say so, list nothing
        return f"; the registry cannot be listed ({str(exc).splitlines()[0][:200]})"
    if name not in models:
        known = ", ".join(sorted(models)) or "none"
        return f"; registered models: {known}"
    aliases = ", ".join(f"@{a}->v{v}" for a, v in sorted(models[name].aliases.items())) or "none"
    versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
    return f"; model {name!r} has versions {versions} and aliases {aliases}"

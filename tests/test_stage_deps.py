"""Every DVC stage declares exactly the project code it runs, so `dvc repro` reruns a stage when
(and only when) code it imports changes.

The closure is derived from the code: every `import` anywhere in a module (top level or inside a
function, since a lazy import runs too), followed transitively through the project's own modules
(the library under `src/` and the package `pipeline`). Package `__init__.py` files count:
importing a submodule runs them, and so does `python -m pipeline.stages.<stage>` for the packages
the stage's module is in.
"""
from __future__ import annotations

import ast
import os
import re
from pathlib import Path
from typing import Optional

import pytest
import yaml

from conftest import ROOT


def project_of(file: Path) -> Path:
    """The project a file of the package `pipeline` is in (the folder holding `pipeline/`)."""
    return next((folder.parent for folder in file.parents if folder.name == "pipeline"), ROOT)


def module_file(name: str, importer: Path) -> list[Path]:
    """Project files that importing the dotted module `name` from `importer` executes: a module
    of the library (`src/`) or of the package `pipeline` (in the importer's project)."""
    parts = name.split(".")
    bases = [ROOT / "src"] + ([project_of(importer)] if parts[0] == "pipeline" else [])
    for base in bases:
        files = []
        for depth in range(1, len(parts) + 1):
            package = base.joinpath(*parts[:depth])
            if (package / "__init__.py").is_file():
                files.append(package / "__init__.py")
            elif depth == len(parts) and package.with_suffix(".py").is_file():
                files.append(package.with_suffix(".py"))
            else:
                break
        if len(files) == len(parts):
            return files
    return []


def imported_files(file: Path) -> set[Path]:
    """Project files imported anywhere in `file` (relative imports resolved)."""
    found: set[Path] = set()
    for node in ast.walk(ast.parse(file.read_text())):
        if isinstance(node, ast.Import):
            for alias in node.names:
                found.update(module_file(alias.name, file))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                package = file.relative_to(ROOT / "src").parent.parts
                base = ".".join(package[:len(package) - node.level + 1])
                module = f"{base}.{node.module}" if node.module else base
            else:
                module = node.module or ""
            found.update(module_file(module, file))
            for alias in node.names:  # `from package import submodule`
                found.update(module_file(f"{module}.{alias.name}", file))
    return found


def packages_of(script: Path) -> list[Path]:
    """The `__init__.py` of every package `script` is in (run first by `python -m`)."""
    found = []
    for folder in script.parents:
        if not (folder / "__init__.py").is_file():
            break
        found.append(folder / "__init__.py")
    return found


def closure(script: Path) -> set[str]:
    """Project files that running `script` executes, as project-relative paths."""
    todo, seen = [script, *packages_of(script)], set()
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        todo.extend(imported_files(file) - seen)
    return {os.path.relpath(f, ROOT) for f in seen}


def stage_bodies(dvc_yaml: Path = ROOT / "dvc.yaml") -> dict[str, dict]:
    stages = yaml.safe_load(dvc_yaml.read_text())["stages"]
    return {name: entry.get("do", entry) for name, entry in stages.items()}


def stage_script(body: dict) -> Optional[Path]:
    """The file a stage's command runs: `python -m pipeline.stages.<stage>` (or a script path)."""
    module = re.search(r"python3?\s+-m\s+([\w.]+)", body["cmd"])
    if module:
        return ROOT.joinpath(*module.group(1).split(".")).with_suffix(".py")
    match = re.search(r"python3?\s+(\S+\.py)", body["cmd"])
    return ROOT / match.group(1) if match else None


def code_problems(bodies: dict[str, dict]) -> list[str]:
    """'stage: missing/extra file' for every stage whose declared code is not its closure."""
    problems = []
    for name, body in bodies.items():
        script = stage_script(body)
        assert script is not None and script.is_file(), f"{name}: no python entry point in cmd"
        used = closure(script)
        declared = {d for d in body.get("deps", []) if d.endswith(".py")}
        problems += [f"{name}: missing {f}" for f in sorted(used - declared)]
        problems += [f"{name}: declares {f}, which it does not import" for f in
                     sorted(declared - used)]
        problems += [f"{name}: directory dep {d} hides which code the stage runs" for d in
                     body.get("deps", []) if d.rstrip("/") in ("src", "src/anyorder", "pipeline",
                                                                "pipeline/stages")]
    return problems


def test_every_stage_declares_exactly_the_code_it_imports():
    problems = code_problems(stage_bodies())
    assert not problems, "dvc.yaml deps do not match the code each stage imports:\n  " + \
        "\n  ".join(problems)


def test_closure_follows_lazy_and_package_imports(tmp_path):
    package = tmp_path / "pipeline"
    (package / "stages").mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "stages" / "__init__.py").write_text("")
    (package / "helper.py").write_text("from anyorder import report\n")
    (package / "stages" / "stage.py").write_text(
        "from pipeline import helper\n\ndef main():\n"
        "    from anyorder.training.loop import train_model\n")
    found = closure(package / "stages" / "stage.py")
    for expected in ("src/anyorder/training/loop.py",      # lazy, inside a function
                     "src/anyorder/training/__init__.py",  # the subpackage the module lives in
                     "src/anyorder/model/vit.py",          # what the loop imports in turn
                     "src/anyorder/report.py",             # `from anyorder import report`, a helper's
                     "src/anyorder/__init__.py"):          # run by every submodule import
        assert expected in found, expected
    for file in ("helper.py",                              # `from pipeline import helper`
                 "__init__.py", "stages/__init__.py"):     # run by `python -m pipeline.stages.stage`
        assert os.path.relpath(package / file, ROOT) in found, file
    assert stage_script({"cmd": "python -m pipeline.stages.prepare"}) == \
        ROOT / "pipeline/stages/prepare.py"


def test_user_inputs_are_dependencies():
    """The data set and local pre-trained weights are hashed by DVC, not just their names."""
    bodies = stage_bodies()
    assert "${data.path}" in bodies["prepare"]["deps"]
    assert "models/weights" in bodies["pretrain"]["deps"]


def test_training_stages_declare_only_params_that_change_what_they_compute():
    bodies = stage_bodies()
    assert bodies["pretrain"]["params"] == ["compute", "model", "train", "pretrain"]
    # data.image_size null: the images are prepared at the model's input size
    assert bodies["prepare"]["params"] == ["data", "model.arch", "model.overrides"]
    assert bodies["finetune"]["params"][:3] == ["compute", "train", "finetune.train"]
    finetune = bodies["finetune"]["params"]
    assert "finetune.runs.${key}" in finetune and "finetune.runs" not in finetune
    assert "model" not in finetune  # the architecture comes with the pre-trained model


def test_stage_code_helper_resolves_deps_as_dvc_does():
    """pipeline.stage.declared (used for resume fingerprints) interpolates deps exactly like DVC."""
    from pipeline import stage as plumbing
    from dvc.dependency.param import ParamsDependency
    from dvc.repo import Repo

    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    with Repo(str(ROOT)) as repo:
        for stage in repo.index.stages:
            if not hasattr(stage, "cmd"):
                continue
            ours = sorted(os.path.normpath(p) for p in plumbing.declared(
                stage.addressing, "deps", params, ROOT / "dvc.yaml"))
            theirs = sorted(os.path.relpath(d.fs_path, ROOT) for d in stage.deps
                            if not isinstance(d, ParamsDependency))
            assert ours == theirs, stage.addressing


def test_stage_that_reads_an_undeclared_param_is_stopped(tmp_path):
    """The guard behind the declared params: reading outside them raises, naming the key."""
    from anyorder.config import load_settings
    from anyorder.settings import UndeclaredParamError

    settings = load_settings(ROOT / "params.yaml").restrict_to(
        ["evaluate", "finetune.runs.ls_s0"], "evaluate@ls_s0")
    assert settings.evaluate.num_orders >= 1
    assert settings.finetune.runs["ls_s0"].variant == "ls"
    assert "ls_s0" in settings.finetune.runs
    with pytest.raises(UndeclaredParamError, match=r"reads the setting finetune.train.lr"):
        settings.finetune.train.lr
    with pytest.raises(UndeclaredParamError, match=r"reads the setting finetune.runs\b"):
        list(settings.finetune.runs)
    with pytest.raises(UndeclaredParamError, match="model.arch"):
        settings.model.arch
    with pytest.raises(UndeclaredParamError, match="model.overrides.depth"):
        settings.model.overrides.depth
    assert settings.keys_read() >= {"evaluate.num_orders", "finetune.runs.ls_s0.variant"}


@pytest.mark.parametrize("arch,size", [("cpu_tiny", 32), ("vit_small_patch16_224", 224)])
def test_prepare_resolves_the_image_size_from_the_params_it_declares(arch, size):
    """data.image_size null: prepare asks the model, reading only model.arch and
    model.overrides (what its stage declares besides data)."""
    from anyorder.config import settings_from_dict
    from anyorder.model.spec import resolve_image_size
    from conftest import shipped_params

    declared = stage_bodies()["prepare"]["params"]
    settings = settings_from_dict(shipped_params({"model": {"arch": arch}})).restrict_to(
        declared, "prepare")
    assert settings.data.image_size is None
    assert resolve_image_size(settings.model, settings.data.image_size) == size
    assert {key.rsplit(".", 1)[0] for key in settings.keys_read()} <= {"data", "model",
                                                                       "model.overrides"}

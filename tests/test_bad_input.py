"""Bad input to a stage: a clear message naming the key or file, exit code 2 (1 for a run that
diverged), before any compute, and nothing written. Each case runs the real stage script in a
tiny copy of the project whose data is prepared and whose other outputs do not exist yet (in a
forked process: see `stage`; two cases start a fresh interpreter, as DVC does)."""
from __future__ import annotations

import os
import runpy
import shutil
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import torch
import yaml

from conftest import ROOT, copy_tiny_project


@pytest.fixture(scope="module")
def prepared_project(tmp_path_factory):
    """A tiny project after `prepare` (run directly: no DVC needed to test one stage)."""
    root = copy_tiny_project(tmp_path_factory.mktemp("bad-input") / "p")
    proc = stage(root, "prepare")
    assert proc.returncode == 0, proc.stderr
    return root


@pytest.fixture()
def project(prepared_project, tmp_path):
    root = tmp_path / "p"
    shutil.copytree(prepared_project, root, symlinks=True)
    return root


def stage(root: Path, name: str, *args: str, edit=None, env: dict | None = None,
          fresh_interpreter: bool = False):
    """Run the stage `name` in `root`, with params.yaml edited by `edit(params)` first.

    The stage runs in a child process forked from this one (torch, timm and MLflow already
    imported, the project's own modules imported afresh from `root`), with its own working
    directory, arguments, environment, exit code and output: the stage as `python -m
    pipeline.stages.<name>` runs it, without paying the interpreter's start each time.
    `fresh_interpreter` starts a real `python` instead (for what needs one: sitecustomize)."""
    if edit is not None:
        params = yaml.safe_load((root / "params.yaml").read_text())
        edit(params)
        (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    environ = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}",
               **(env or {})}
    module, argv = f"pipeline.stages.{name}", ["-m", f"pipeline.stages.{name}", *args]
    if fresh_interpreter:
        return subprocess.run([sys.executable, *argv], cwd=root, env=environ,
                              capture_output=True, text=True, timeout=300)
    out, err = root / f".stage-{name}.out", root / f".stage-{name}.err"
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        _run_forked(root, module, list(args), environ, out, err)
    _, status = os.waitpid(pid, 0)
    proc = subprocess.CompletedProcess(argv, os.waitstatus_to_exitcode(status),
                                       out.read_text(), err.read_text())
    out.unlink()
    err.unlink()
    return proc


def _run_forked(root: Path, module: str, args: list[str], environ: dict, out: Path,
                err: Path) -> None:
    code = 1
    try:
        os.chdir(root)
        os.environ.clear()
        os.environ.update(environ)
        for stream, path in ((1, out), (2, err)):
            os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), stream)
        sys.stdout = open(1, "w", closefd=False)
        sys.stderr = open(2, "w", closefd=False)
        pipeline = str(ROOT / "pipeline")
        for name in [m for m, mod in sys.modules.items()
                     if (getattr(mod, "__file__", None) or "").startswith(pipeline)]:
            del sys.modules[name]  # the stage imports its plumbing from `root`
        sys.path[:] = [str(root)] + [p for p in sys.path if p not in (str(ROOT), "")]
        sys.argv = [module, *args]  # argv[0]: the module's file once it runs, as under `-m`
        try:
            runpy.run_module(module, run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as exc:
            if isinstance(exc.code, int) or exc.code is None:
                code = exc.code or 0
            else:
                print(exc.code, file=sys.stderr)
    except BaseException:
        traceback.print_exc()
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def refused(proc, message: str, code: int = 2) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert message in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr


def nothing_trained(root: Path) -> None:
    assert not (root / "models/pretrain").exists()
    assert not (root / "plots/train").exists()
    assert not list((root / ".anyorder/state").glob("*/*/*.safetensors"))


def mlflow_runs(root: Path, stage_name: str) -> int:
    import mlflow
    client = mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    ids = [e.experiment_id for e in client.search_experiments()]
    return len(client.search_runs(ids, f"tags.`anyorder.stage` = '{stage_name}'"))


def section(name: str, **values):
    return lambda params: params[name].update(values)


def timm_model(pretrained: str = "none", **overrides):
    """model.arch timm's vit_tiny_patch16_224 (not the preset), the tiny overrides changed by
    `overrides`."""
    def edit(params):
        params["model"].update(arch="vit_tiny_patch16_224", pretrained=pretrained)
        params["model"]["overrides"].update(overrides)
    return edit


def training(name: str, **values):
    """An edit of a training section's own `train:` settings."""
    return lambda params: params[name]["train"].update(values)


@pytest.mark.parametrize("edit,message", [
    (section("model", arch="vit_tiny_patch16_244"),
     "model.arch: timm has no model named 'vit_tiny_patch16_244'; did you mean "
     "vit_tiny_patch16_224"),
    (section("model", arch="resnet18"), "model.arch: 'resnet18' is not a timm VisionTransformer"),
    (timm_model(num_heads=None),  # timm's 3 heads do not divide the tiny width 16
     "model.overrides.embed_dim: model.overrides.num_heads=null (timm's for "
     "vit_tiny_patch16_224: 3) must divide model.overrides.embed_dim=16"),
    (timm_model(pretrained="/elsewhere/vit.safetensors"),
     "model.pretrained: '/elsewhere/vit.safetensors' is not inside models/weights/"),
    (timm_model(pretrained="models/weights/missing.safetensors"),
     "model.pretrained: no such weights file 'models/weights/missing.safetensors'"),
    (section("model", pretrained="timm"),  # the tiny pipeline's preset has no weights
     "model.pretrained: cpu_tiny is a from-scratch preset of this project"),
    (timm_model(pretrained="timm"),
     "model.pretrained: timm's weights for vit_tiny_patch16_224 cannot load with "
     "model.overrides.embed_dim=16 (timm: 192)"),
    (training("pretrain", device="gpu"),
     "pretrain.train.device: must be auto, cpu, cuda or cuda:N"),
    (training("pretrain", lr=float("inf")), "pretrain.train.lr: must be a finite number"),
])
def test_pretrain_refuses_bad_model_settings_before_training(project, edit, message):
    refused(stage(project, "pretrain", edit=edit), message)
    nothing_trained(project)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_asking_for_cuda_without_a_gpu_stops_before_mlflow_and_compute(project):
    proc = stage(project, "pretrain", edit=training("pretrain", device="cuda"))
    refused(proc, "pretrain.train.device: 'cuda' asked for, but torch sees no CUDA device")
    nothing_trained(project)
    assert mlflow_runs(project, "pretrain") == 0  # refused before the stage's MLflow run


def test_a_diverging_training_fails_and_saves_nothing(project):
    proc = stage(project, "pretrain", edit=training("pretrain", lr=1e30, grad_clip=None),
                 fresh_interpreter=True)
    refused(proc, "pretrain: the training loss became", code=1)
    assert "lower the learning rate" in proc.stderr
    assert not (project / "models/pretrain").exists()


@pytest.mark.parametrize("edit,message", [
    (section("evaluate", device="gpu"), "evaluate.device: must be auto, cpu, cuda or cuda:N"),
    (section("evaluate", device="cuda:x"), "evaluate.device: must be auto, cpu, cuda or cuda:N"),
])
def test_evaluate_refuses_a_bad_device(project, edit, message):
    refused(stage(project, "evaluate", "--run", "seq", edit=edit), message)
    assert not (project / "metrics").exists()


def test_an_unknown_run_is_refused(project):
    refused(stage(project, "evaluate", "--run", "nope", fresh_interpreter=True),
            "finetune.runs has no entry 'nope' (known: seq, ls, ls1)")


@pytest.mark.parametrize("name,args,edit,message", [
    ("export", ["--model", "nope"], None, "export.models has no entry 'nope' (known: ls_best)"),
    ("export", ["--model", "ls_best"], section("export", opset=21),
     "export.opset: must be in 14..20"),
    ("export", ["--model", "ls_best"], None, "models/selected/ls_best"),  # not selected yet
    ("register", [], section("register", export="seq"),
     "register.export: must name an entry of export.models (ls_best)"),
    ("register", [], section("register", alias="2nd"), "register.alias: use letters"),
    ("register", [], None, "exports/ls_best/manifest.json: no such file"),  # not exported yet
])
def test_export_and_register_refuse_bad_input(project, name, args, edit, message):
    refused(stage(project, name, *args, edit=edit), message)
    assert not (project / "exports").exists() and not (project / "metrics").exists()
    assert mlflow_runs(project, name) == 0


def test_missing_data_is_refused_and_the_prepared_data_kept(project):
    before = (project / "data/prepared/train_x.npy").read_bytes()
    proc = stage(project, "prepare", edit=section("data", path="data/missing.npz"))
    refused(proc, "data/missing.npz: no such file for source 'npz'")
    assert (project / "data/prepared/train_x.npy").read_bytes() == before


def test_a_run_id_that_would_break_mlflow_searches_is_refused(project):
    proc = stage(project, "prepare", env={"ANYORDER_PIPELINE_RUN_ID": "nightly' or '1'='1"})
    refused(proc, "ANYORDER_PIPELINE_RUN_ID=\"nightly' or '1'='1\": use 1-200 letters")
    assert mlflow_runs(project, "prepare") == 1  # the fixture's run only


def test_an_unreachable_mlflow_store_stops_the_stage_before_compute(project):
    meta = (project / "data/prepared/meta.json").read_text()
    proc = stage(project, "prepare", edit=section("data", val_fraction=0.3),
                 env={"MLFLOW_TRACKING_URI": "http://127.0.0.1:9"})
    refused(proc, "MLflow tracking store http://127.0.0.1:9 cannot be used")
    assert "Nothing was computed" in proc.stderr
    assert (project / "data/prepared/meta.json").read_text() == meta  # not replaced


def test_mlflow_failing_mid_stage_is_a_warning_and_the_outputs_are_written(project, tmp_path):
    """MLflow mirrors; DVC's outputs are the truth: a store that dies after the stage started
    must not throw away its work, nor leave half of it."""
    hooks = tmp_path / "hooks"
    hooks.mkdir()
    (hooks / "sitecustomize.py").write_text(
        "import mlflow\n"
        "def gone(*args, **kwargs):\n"
        "    raise ConnectionError('tracking server went away')\n"
        "mlflow.log_metrics = gone\n")
    proc = stage(project, "prepare", edit=section("data", val_fraction=0.3),
                 env={"PYTHONPATH": str(hooks)}, fresh_interpreter=True)
    assert proc.returncode == 0, proc.stderr
    assert "prepare: MLflow stopped answering (ConnectionError: tracking server went away)" in \
        proc.stderr
    assert '"val_fraction": 0.3' in (project / "data/prepared/meta.json").read_text()


def test_a_stage_is_refused_while_a_flow_run_holds_the_workspace(project):
    from pipeline.orchestration import workspace
    with workspace.exclusive(project, "flow-run-123"):
        proc = stage(project, "prepare")
        refused(proc, "Prefect flow run flow-run-123")
        assert "is running the pipeline in this workspace" in proc.stderr
        # The flow run's own stages go on.
        own = stage(project, "prepare", env={workspace.OWNER_ENV: "flow-run-123"})
        assert own.returncode == 0, own.stderr
    assert stage(project, "prepare").returncode == 0  # released


def test_a_stage_warns_about_overrides_a_killed_flow_run_left(project):
    from pipeline.orchestration import workspace
    backup = project / workspace.PARAMS_BACKUP
    backup.parent.mkdir(parents=True, exist_ok=True)
    backup.write_text((project / "params.yaml").read_text())
    (project / workspace.LOCK_FILE).touch()  # the killed run's lock file, now free
    proc = stage(project, "prepare")
    assert proc.returncode == 0, proc.stderr
    assert "warning: params.yaml holds the overrides of a flow run that was killed" in proc.stderr


def synthesis(**values):
    return lambda params: params["nullspace"]["synthesis"].update(values)


@pytest.mark.parametrize("name,args,edit,message", [
    ("nullspace", ["--arm", "nope"], None,
     "nullspace.arms has no entry 'nope' (known: seq_null, ls_plain)"),
    ("nullspace", ["--arm", "seq_null"], None,
     "nullspace.arms.seq_null.start: seq (models/finetune/seq) holds no model"),
    ("nullspace", ["--arm", "seq_null"], synthesis(epsilon=0.0),
     "nullspace.synthesis.epsilon: must be > 0"),
    ("evaluate", ["--run", "seq"], synthesis(steps=0),
     "nullspace.synthesis.steps: must be >= 1"),
    ("evaluate", ["--run", "seq"], None,
     "data/corrupted/manifest.json: no such file; the corrupt stage writes it"),
    ("corrupt", [], lambda p: p["robustness"]["corruptions"].update(names=["rain"]),
     "robustness.corruptions.names: unknown corruption"),
    ("corrupt", [], lambda p: p["robustness"]["attacks"].update(eps=[0.5, 8]),
     "robustness.attacks.eps: every budget must be in (0, 1]"),
])
def test_robustness_stages_refuse_bad_input(project, name, args, edit, message):
    refused(stage(project, name, *args, edit=edit), message)
    assert not (project / "models/nullspace").exists() and not (project / "metrics").exists()
    assert not (project / "data/corrupted").exists()
    assert mlflow_runs(project, name) == 0

"""The MLflow registry: an export logged as a pyfunc model that runs the order-agnostic runtime,
loaded in a fresh process and served over HTTP with nothing from this project but the installed
package; the alias moves only when the gates pass; unknown names list what exists."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import mlflow
import numpy as np
import pytest

from anyorder.evaluation.gates import Gates, check_gates
from anyorder.export.blocks import export_model
from anyorder.export.runtime import BlockRuntime, ExportError
from anyorder.export.sources import resolve_source
from pipeline.tracking import register_export
from anyorder.export.runtime import read_manifest
from anyorder.pyfunc import PARAMS

from conftest import tiny_model

NAME = "tiny-vit"
PASSING = {"passed": True, "gates": {}, "failed": []}


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    """An MLflow store with one export registered twice: v1 passes its gates (champion), v2
    fails them (registered, alias left on v1)."""
    root = tmp_path_factory.mktemp("registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    export_dir = root / "export"
    export_model(tiny_model("ls", depth=4, seed=3).eval(), export_dir, "tiny",
                 accuracies={"sequential": 0.95, "arbitrary": {"mean": 0.5}})
    previous = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("registry-test")
    failing = check_gates(Gates(), json.loads((export_dir / "manifest.json").read_text()),
                          {"max_abs_error": 1e-6})
    versions = {}
    for label, verdict in (("pass", PASSING), ("fail", failing)):
        with mlflow.start_run():
            versions[label] = register_export(export_dir, read_manifest(export_dir),
                                              "anyorder.pyfunc", PARAMS, NAME, "champion",
                                              verdict, {"git.commit": "abc"})
    yield {"uri": uri, "export": export_dir, "versions": versions, "failing": failing,
           "root": root}
    mlflow.set_tracking_uri(previous)


def uint8_images(n=4, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8)


def test_a_failed_gate_registers_but_leaves_the_alias(registry):
    client = mlflow.MlflowClient()
    assert registry["versions"] == {"pass": "1", "fail": "2"}
    assert registry["failing"]["failed"] == [
        "min_arbitrary_accuracy: 0.5 is not >= 0.9"]
    assert str(client.get_model_version_by_alias(NAME, "champion").version) == "1"
    tags = client.get_model_version(NAME, "2").tags
    assert tags["anyorder.gates"].startswith("failed: min_arbitrary_accuracy")
    assert tags["git.commit"] == "abc" and tags["metric.min_arbitrary_accuracy"] == "0.5"
    assert client.get_model_version(NAME, "1").tags["anyorder.gates"] == "passed"


def test_the_logged_model_has_a_signature_with_the_runtime_params(registry):
    info = mlflow.models.get_model_info(f"models:/{NAME}@champion")
    params = {p.name: p.default for p in info.signature.params.params}
    assert params == {"order": "sequential", "seed": 0, "policy": "skip", "exclude": ""}
    assert tuple(info.signature.inputs.to_dict()[0]["tensor-spec"]["shape"]) == (-1, 16, 16, 3)
    assert info.saved_input_example_info is not None


LOAD_AND_PREDICT = """
import json, sys
import numpy as np
import mlflow
mlflow.set_tracking_uri(sys.argv[1])
model = mlflow.pyfunc.load_model("models:/%s@champion")
images = np.load(sys.argv[2])
out = model.predict(images, params={"order": "3,0,2"})
print(json.dumps({"logits": out["logits"].tolist(), "order": out["executed_order"].tolist()}))
""" % NAME


def test_a_fresh_process_loads_the_champion_and_predicts_what_the_export_predicts(registry,
                                                                                   tmp_path):
    images = uint8_images(6)
    np.save(tmp_path / "images.npy", images)
    proc = subprocess.run([sys.executable, "-c", LOAD_AND_PREDICT, registry["uri"],
                           str(tmp_path / "images.npy")], capture_output=True, text=True,
                          timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = BlockRuntime(registry["export"]).predict(images, [3, 0, 2])
    assert got["order"] == [[3, 0, 2]] * 6
    np.testing.assert_array_equal(np.asarray(got["logits"], np.float32), expected.logits)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url, payload):
    request = urllib.request.Request(url, json.dumps(payload).encode(),
                                     {"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        return json.loads(response.read())


@pytest.mark.slow
def test_mlflow_models_serve_answers_with_the_order_sent(registry, tmp_path):
    """`mlflow models serve` (local env, no conda): a real HTTP request, and the order sent as an
    inference param really changes the executed order (MLflow 3 has bugs that drop params)."""
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "MLFLOW_TRACKING_URI": registry["uri"],
           "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    log = open(tmp_path / "serve.log", "w")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m",
                               f"models:/{NAME}@champion", "--env-manager", "local",
                               "--host", "127.0.0.1", "-p", str(port), "-w", "1"],
                              env=env, stdout=log, stderr=subprocess.STDOUT,
                              start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
                break
            except OSError:
                assert server.poll() is None, (tmp_path / "serve.log").read_text()
                assert time.monotonic() < deadline, "the server never became ready"
                time.sleep(0.5)
        images = uint8_images(3, seed=4)
        runtime = BlockRuntime(registry["export"])
        for order, executed in (("sequential", [0, 1, 2, 3]), ("2,1", [2, 1])):
            answer = post(f"http://127.0.0.1:{port}/invocations",
                          {"inputs": images.tolist(), "params": {"order": order}})
            rows = answer["predictions"]
            rows = rows if isinstance(rows, list) else [dict(zip(rows, v))
                                                        for v in zip(*rows.values())]
            assert [row["executed_order"] for row in rows] == [executed] * 3
            expected = runtime.predict(images, executed)
            assert [row["class_index"] for row in rows] == expected.predictions.tolist()
            np.testing.assert_allclose(np.asarray([row["logits"] for row in rows]),
                                       expected.logits, atol=1e-6)
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        log.close()


def test_an_unknown_model_or_alias_lists_what_exists(registry):
    with pytest.raises(ExportError, match=r"registered models: tiny-vit"):
        resolve_source("models:/nope@champion")
    with pytest.raises(ExportError, match=r"'tiny-vit' has versions \[1, 2\] and aliases "
                                          r"@champion->v1"):
        resolve_source(f"models:/{NAME}@staging")
    found = resolve_source(f"models:/{NAME}@champion")
    assert json.loads((found / "manifest.json").read_text())["name"] == "tiny"

"""bench/pipeline_device.py: the pipeline's stages without DVC (for a machine that only has the
library's packages), ordered and run as `dvc repro` would."""
import sys

import yaml

from conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import pipeline_device  # noqa: E402


def test_the_stage_graph_is_dvc_yaml_expanded_and_ordered_by_what_stages_read():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    graph = pipeline_device.stages(ROOT / "dvc.yaml", params)
    runs = params["finetune"]["runs"]
    assert {f"finetune@{run}" for run in runs} | {f"evaluate@{run}" for run in runs} <= set(graph)
    assert graph["finetune@ls_s0"]["cmd"] == "python -m pipeline.stages.finetune --run ls_s0"
    needs = pipeline_device.needs(graph)
    assert needs["prepare"] == set()
    assert needs["pretrain"] == {"prepare"}
    assert {"finetune@ls_s0", "corrupt", "prepare"} <= needs["evaluate@ls_s0"]
    assert "finetune@ls_s1" not in needs["evaluate@ls_s0"]
    assert {f"evaluate@{run}" for run in runs} <= needs["select"]
    assert needs["register"] == {"export@ls_best"}


def test_a_failed_stage_stops_its_dependants_only_and_a_deadline_stops_the_rest(tmp_path):
    fail = f"{sys.executable} -c 'raise SystemExit(3)'"
    ok = f"{sys.executable} -c 'print(1)'"
    slow = f"{sys.executable} -c 'import time; time.sleep(60)'"
    graph = {"a": {"cmd": fail, "deps": [], "outs": ["out/a"]},
             "b": {"cmd": ok, "deps": ["out/a/x"], "outs": ["out/b"]},
             "c": {"cmd": ok, "deps": [], "outs": ["out/c"]},
             "d": {"cmd": ok, "deps": ["out/c"], "outs": ["out/d"]}}
    done = pipeline_device.run_all(graph, workers=2, logs=tmp_path)
    assert done["a"]["returncode"] == 3 and "log_tail" in done["a"]
    assert done["b"] == {"skipped": "an input's stage failed"}
    assert done["c"]["returncode"] == 0 and done["d"]["returncode"] == 0
    late = pipeline_device.run_all({"s": {"cmd": slow, "deps": [], "outs": ["s"]},
                                    "t": {"cmd": ok, "deps": ["s"], "outs": ["t"]}},
                                   workers=1, logs=tmp_path, deadline=2)
    assert late == {"s": {"skipped": "stopped at the 2 s deadline"},
                    "t": {"skipped": "not started by the 2 s deadline"}}

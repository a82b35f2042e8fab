"""The Prefect flow's schedule and command line (pipeline/orchestration/flow.py, scheduler.py):
bad cron expressions, schedule settings and flags are refused by name before any server starts;
the shipped schedule is valid. No Prefect server or DVC project is needed."""
from __future__ import annotations

import re

import pytest
import yaml

from pipeline.orchestration import dvc_graph  # the quiet environment applied (conftest)
from pipeline.orchestration import flow as pflow


@pytest.mark.parametrize("cron", ["61 * * * *", "every night", "* * *"])
def test_bad_cron_refused(tmp_path, capsys, cron):
    config = tmp_path / "schedule.yaml"
    config.write_text(yaml.safe_dump({"deployment": "nightly", "cron": cron}))
    with pytest.raises(dvc_graph.ScheduleError, match=re.escape(f"cron expression '{cron}'")):
        dvc_graph.load_schedule(config)
    assert pflow.main(["serve", "--config", str(config)]) == 2  # refused before any server
    assert cron in capsys.readouterr().err
    assert pflow.main(["serve", "--cron", cron]) == 2
    config.write_text(yaml.safe_dump({"deployment": "nightly", "cron": "0 2 * * *",
                                      "timezone": "Mars/Olympus"}))
    with pytest.raises(dvc_graph.ScheduleError, match="timezone 'Mars/Olympus'"):
        dvc_graph.load_schedule(config)


def test_shipped_schedule_is_valid():
    dvc_graph.load_schedule(pflow.SCHEDULE_FILE)  # raises ScheduleError naming the key otherwise


@pytest.mark.parametrize("change, named", [
    ({"server": {"host": "127.0.0.1", "port": 99999}}, "server.port: must be an integer in 1..65535"),
    ({"server": {"port": "4200"}}, "server.port: must be an integer in 1..65535, got '4200'"),
    ({"server": {"hots": "x"}}, "server.hots: unknown key"),
    ({"parameters": {"retries": -1}}, "parameters.retries: must be an integer >= 0, got -1"),
    ({"parameters": {"retries": "2"}}, "parameters.retries: must be an integer >= 0, got '2'"),
    ({"parameters": {"retry_delay_seconds": "soon"}}, "parameters.retry_delay_seconds: must be"),
    ({"parameters": {"set_params": "pretrain.epochs=1"}}, "parameters.set_params: must be a list"),
    ({"parameters": {"set_params": ["pretrain.epochs"]}}, "parameters.set_params: override"),
    ({"parameters": {"retires": 2}}, "parameters.retires: unknown key"),
    ({"deployment": ""}, "deployment: must be a name"),
    ({"crons": "* * * * *"}, "crons: unknown key"),
])
def test_bad_schedule_settings_refused_before_anything_starts(tmp_path, capsys, change, named):
    config = yaml.safe_load(pflow.SCHEDULE_FILE.read_text())
    config.update(change)
    path = tmp_path / "schedule.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(dvc_graph.ScheduleError, match=re.escape(named)):
        dvc_graph.load_schedule(path)
    from pipeline.orchestration import scheduler
    assert scheduler.main(["--config", str(path)]) == 2  # refused before any server starts
    assert named in capsys.readouterr().err


@pytest.mark.parametrize("argv, named", [
    (["trigger", "--retries", "-3"], "parameters.retries: must be an integer >= 0, got -3"),
    (["run", "--cron", "* * * * *"], "--cron only applies to serve"),
])
def test_bad_command_line_flags_refused(capsys, argv, named):
    assert pflow.main(argv) == 2
    assert named in capsys.readouterr().err

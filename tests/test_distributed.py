"""Training under torchrun: 2 processes (gloo, CPU) keep identical weights after every step,
end where 1 process with the same global batch ends (LS-pred with LayerDrop: extra heads and
unused parameters), and a killed 2-process run resumes."""
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from anyorder.training.settings import TrainConfig
from anyorder.training.distributed import Dist
from anyorder.training.loop import train_and_save

from conftest import ROOT, tiny_model

SCRIPT = textwrap.dedent("""
    import os, signal, sys
    import torch
    import torch.distributed as td
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[4])  # the tests folder, for conftest's tiny model
    from conftest import tiny_model
    from anyorder.training.settings import TrainConfig
    from anyorder.training.loop import train_and_save

    steps = [0]
    original = torch.optim.AdamW.step

    def checked_step(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        flat = torch.cat([p.detach().flatten() for g in self.param_groups for p in g["params"]])
        gathered = [torch.empty_like(flat) for _ in range(td.get_world_size())]
        td.all_gather(gathered, flat)
        assert all(torch.equal(gathered[0], other) for other in gathered), \\
            f"the ranks' weights differ after step {steps[0]}"
        steps[0] += 1
        return out

    torch.optim.AdamW.step = checked_step
    prepared, out, state = sys.argv[1:4]
    kill_after = int(os.environ.get("KILL_AFTER_EPOCH", "0"))

    def on_epoch_end(epoch, record, seconds):
        if epoch == kill_after:
            os.kill(os.getpid(), signal.SIGKILL)  # rank 0 dies mid-run

    model = tiny_model("ls_pred", depth=3, seed=5)
    cfg = TrainConfig(**{**__CFG__, "nproc": 2})
    # LayerDrop leaves a step's skipped blocks (and their heads) without gradients: DDP must
    # be told of unused parameters, and still agree with one process.
    result = train_and_save(model, prepared, cfg, 7, out, state, on_epoch_end=on_epoch_end,
                            layerdrop=[0.3, 0.3, 0.3])
    print(f"rank {td.get_rank()} steps {steps[0]} resumed_from {result.resumed_from_epoch}",
          flush=True)
""")

CFG = dict(epochs=3, batch_size=16, lr=2e-3, shift_pixels=1, device="cpu")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A small prepared data set (48 training images: 3 steps of 16 per epoch)."""
    from anyorder.data.prepare import prepare_dataset
    from conftest import EMBEDDED
    out = tmp_path_factory.mktemp("dist") / "prepared"
    prepare_dataset("npz", str(EMBEDDED), 16, 0.15, 0.2, 0, out)
    from anyorder.data.prepared import split_files
    for split, keep in (("train", 48), ("val", 24)):
        for file in split_files(out, split).values():
            np.save(file, np.load(file)[:keep])
    return out


def torchrun(tmp_path, prepared, out, state, kill_after=0):
    script = tmp_path / "train_script.py"
    script.write_text(SCRIPT.replace("__CFG__", repr(CFG)))
    tests = os.path.dirname(__file__)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "KILL_AFTER_EPOCH": str(kill_after)}
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node", "2", "--monitor-interval", "0.2", str(script),
                           str(prepared), str(out), str(state), tests],
                          capture_output=True, text=True, timeout=300, env=env)


def test_shards_cover_the_global_batch_once():
    for size in (1, 5, 16, 17):
        for world in (1, 2, 3):
            parts = [Dist(rank, world).shard(size) for rank in range(world)]
            covered = [i for part in parts for i in range(size)[part]]
            assert covered == list(range(size))
            assert max(map(len, (range(size)[p] for p in parts))) - \
                min(map(len, (range(size)[p] for p in parts))) <= 1


@pytest.mark.slow
def test_two_processes_train_like_one_and_a_killed_run_resumes(tmp_path, prepared):
    out, state = tmp_path / "two", tmp_path / "state"
    killed = torchrun(tmp_path, prepared, out, state, kill_after=1)
    assert killed.returncode != 0, killed.stdout + killed.stderr
    assert not (out / "model.safetensors").exists()
    assert list(state.rglob("state.safetensors")), "the first epoch's state was not saved"

    resumed = torchrun(tmp_path, prepared, out, state)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-3000:]
    # Each rank checked its weights against the other's after each of the 6 remaining steps.
    assert "rank 0 steps 6 resumed_from 1" in resumed.stdout, resumed.stdout
    assert "rank 1 steps 6 resumed_from 1" in resumed.stdout, resumed.stdout

    torch.manual_seed(0)
    single = tiny_model("ls_pred", depth=3, seed=5)
    train_and_save(single, prepared, TrainConfig(**CFG), 7, tmp_path / "one",
                   tmp_path / "state_one", layerdrop=[0.3, 0.3, 0.3])
    two, one = load_file(str(out / "model.safetensors")), \
        load_file(str(tmp_path / "one" / "model.safetensors"))
    assert two.keys() == one.keys()
    for name in one:
        torch.testing.assert_close(two[name], one[name], atol=2e-5, rtol=1e-4, msg=name)
    import json
    recipe = json.loads((out / "train_orders.json").read_text())
    assert recipe["world_size"] == 2 and recipe["order_scope"] == "shared"
    assert any(len(order) < 3 for order in recipe["orders"])  # LayerDrop did skip blocks
    assert recipe["orders"] == json.loads(
        (tmp_path / "one" / "train_orders.json").read_text())["orders"]


def test_threads_apply_to_torch_and_to_onnx_runtime_sessions(monkeypatch):
    from anyorder import threads as compute
    from anyorder.export.runtime import session_options

    before = torch.get_num_threads()
    try:
        assert compute.apply_threads(1) == 1
        assert torch.get_num_threads() == 1 and session_options().intra_op_num_threads == 1
        monkeypatch.setenv("OMP_NUM_THREADS", "1")  # the environment's word counts...
        assert compute.threads_for(0) == 1
        monkeypatch.delenv("OMP_NUM_THREADS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # ...else torchrun's processes share cores
        assert compute.threads_for(0) == max(1, (os.cpu_count() or 1) // 2)
        assert compute.threads_for(3) == 3  # an explicit count is per process
    finally:
        torch.set_num_threads(before)
        compute._applied = 0


def test_nproc_needs_a_global_batch_every_process_can_share():
    from anyorder.config import load_settings
    from anyorder.settings import ConfigError

    with pytest.raises(ConfigError, match=r"finetune.train.batch_size: must be >= nproc \(4\)"):
        load_settings(ROOT / "params.yaml", {"finetune.train.nproc": 4,
                                             "finetune.train.batch_size": 2})
    with pytest.raises(ConfigError, match="compute.threads"):
        load_settings(ROOT / "params.yaml", {"compute.threads": -1})

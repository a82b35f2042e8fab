"""Training: the paper's phenomenon on tiny data, resume after a kill, recorded orders."""
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from anyorder.training.settings import TrainConfig
from anyorder.evaluation.accuracy import evaluate_orders
from anyorder.evaluation.orders import epoch_orders
from anyorder.training.loop import STATE_FILE, TrainingDiverged, lr_factor, train_model

from conftest import tiny_model

FAST = TrainConfig(epochs=25, batch_size=64, lr=3e-3, weight_decay=0.05, warmup_epochs=1,
                   schedule="cosine", device="cpu")


@pytest.fixture(scope="module")
def trained_pair(digits16):
    """A sequential model and an LS fine-tune of it, on real digits at 16x16 (seconds each)."""
    sequential = tiny_model("sequential")
    train_model(sequential, digits16["train"], digits16["val"], FAST, seed=0, progress=False)
    shuffled = tiny_model("ls")
    shuffled.load_state_dict(sequential.state_dict())
    result = train_model(shuffled, digits16["train"], digits16["val"],
                         replace(FAST, epochs=10, lr=2e-3, schedule="linear", warmup_epochs=0), seed=0,
                         progress=False)
    return sequential, shuffled, result


def test_sequential_model_collapses_when_shuffled_and_layershuffle_does_not(trained_pair, digits16):
    sequential, shuffled, _ = trained_pair
    test = digits16["test"]
    seq = evaluate_orders(sequential, *test, num_orders=20, seed=7)
    ls = evaluate_orders(shuffled, *test, num_orders=20, seed=7)
    assert seq["sequential"] >= 0.85, seq["sequential"]
    # The phenomenon of the paper: order matters to a sequentially trained model...
    assert seq["arbitrary"]["mean"] <= seq["sequential"] - 0.15, seq["arbitrary"]
    # ...and LayerShuffle removes that dependence at little cost.
    assert ls["arbitrary"]["mean"] >= seq["sequential"] - 0.08, ls["arbitrary"]
    assert ls["arbitrary"]["min"] >= seq["arbitrary"]["mean"] + 0.15


def test_layershuffle_training_records_one_order_per_step(trained_pair, digits16):
    _, _, result = trained_pair
    steps = 10 * int(np.ceil(len(digits16["train"][1]) / 64))
    assert len(result.orders) == steps
    assert all(sorted(order) == [0, 1, 2, 3] for order in result.orders)
    assert len({tuple(o) for o in result.orders}) > 10  # really random, not one order


def test_orders_are_reproducible_from_the_seed(digits16):
    small = (digits16["train"][0][:128], digits16["train"][1][:128])
    runs = []
    for seed in (0, 0, 1):
        model = tiny_model("ls")
        runs.append(train_model(model, small, digits16["val"], replace(FAST, epochs=2), seed=seed,
                                progress=False).orders)
    assert runs[0] == runs[1] and runs[0] != runs[2]


def test_ls_pred_learns_to_predict_slots(digits16):
    model = tiny_model("ls_pred")
    result = train_model(model, digits16["train"], digits16["val"], replace(FAST, epochs=4),
                         seed=0, progress=False)
    losses = [r["train_position_loss"] for r in result.history]
    assert losses[-1] < losses[0] * 0.7, losses  # chance is log(4) = 1.39


def test_per_sample_orders_are_the_ones_epoch_orders_regenerates(digits16, monkeypatch):
    """Per-sample orders are not listed beside the model; train_orders.json says how to
    regenerate them, and this is that regeneration, checked against what really ran."""
    small = (digits16["train"][0][:100], digits16["train"][1][:100])
    model = tiny_model("ls")
    used = []
    forward = type(model).forward_detailed

    def record(self, images, execution_order=None, patch_noise=None):
        used.append(torch.as_tensor(execution_order).clone())
        return forward(self, images, execution_order, patch_noise)

    monkeypatch.setattr(type(model), "forward_detailed", record)
    result = train_model(model, small, digits16["val"], replace(FAST, epochs=2, batch_size=32),
                         seed=3, progress=False, order_sampling="sample")
    assert result.orders == [] and np.isfinite(result.history[-1]["train_loss"])
    regenerated = [order for epoch in range(2)
                   for order in epoch_orders(3, epoch, 100, 32, 4, shuffle=True, per_sample=True)]
    assert len(used) == len(regenerated) == 2 * 4  # 100 images in batches of 32: 4 steps
    assert all(torch.equal(a, b) for a, b in zip(used, regenerated))
    assert used[0].shape == (32, 4) and used[-1].shape == (4, 4)  # one order per sample
    assert len({tuple(row.tolist()) for row in used[0]}) > 5


def test_lr_schedule_warms_up_then_decays():
    factors = [lr_factor(step, 100, 10, "cosine") for step in range(100)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[10] == pytest.approx(1.0) and factors[-1] < 0.01
    assert lr_factor(50, 100, 0, "linear") == pytest.approx(0.5)
    assert lr_factor(99, 100, 0, "constant") == 1.0


KILLED_RUN = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    sys.path.insert(0, {tests!r})
    from conftest import tiny_model
    from anyorder.training.settings import TrainConfig
    from anyorder.training.loop import train_model
    data = np.load({data!r})
    train, val = (data["x"], data["y"]), (data["vx"], data["vy"])
    def die(epoch, record, seconds):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGKILL)  # no clean-up, as a crash or OOM kill
    train_model(tiny_model("ls", drop_path_rate=0.25), train, val, TrainConfig(**{cfg!r}),
                seed=5, state_dir={state!r}, on_epoch_end=die, progress=False)
""")


# Augmentation (random shifts) and stochastic depth on: every random draw must be seeded.
RESUME_CFG = dict(epochs=4, lr=2e-3, device="cpu", shift_pixels=2)


def state_file(state_dir) -> "Path":
    files = list(Path(state_dir).glob(f"*/{STATE_FILE}"))
    assert len(files) == 1, files
    return files[0]


@pytest.fixture(scope="module")
def killed_run(digits16, tmp_path_factory):
    """A training run SIGKILLed after its second epoch, and the data it ran on."""
    tmp_path = tmp_path_factory.mktemp("killed")
    train = (digits16["train"][0][:256], digits16["train"][1][:256])
    data = tmp_path / "data.npz"
    np.savez(data, x=train[0], y=train[1], vx=digits16["val"][0], vy=digits16["val"][1])
    state = tmp_path / "state"
    script = KILLED_RUN.format(tests=os.path.dirname(__file__), data=str(data), state=str(state),
                               cfg=RESUME_CFG)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    return train, digits16["val"], state


def test_training_killed_midway_resumes_and_matches_an_uninterrupted_run(killed_run, tmp_path):
    train, val, killed_state = killed_run
    state = tmp_path / "state"
    shutil.copytree(killed_state, state)
    assert state_file(state).is_file()
    assert not list(state.rglob("*.tmp"))

    cfg = TrainConfig(**RESUME_CFG)
    resumed_model = tiny_model("ls", drop_path_rate=0.25)
    resumed = train_model(resumed_model, train, val, cfg, seed=5, state_dir=state, progress=False)
    assert resumed.resumed_from_epoch == 2
    assert [r["epoch"] for r in resumed.history] == [1, 2, 3, 4]

    fresh_model = tiny_model("ls", drop_path_rate=0.25)
    fresh = train_model(fresh_model, train, val, cfg, seed=5, progress=False)
    assert fresh.orders == resumed.orders and fresh.history == resumed.history
    for (name, a), b in zip(fresh_model.state_dict().items(), resumed_model.state_dict().values()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "garbage"])
def test_a_damaged_state_file_is_discarded_with_a_warning(killed_run, tmp_path, damage):
    """Power loss mid-write, a bad sector, a stray file: rerun from scratch, never crash."""
    train, val, killed_state = killed_run
    state = tmp_path / "state"
    shutil.copytree(killed_state, state)
    path = state_file(state)
    blob = bytearray(path.read_bytes())
    if damage == "truncate":
        blob = blob[:len(blob) // 2]
    elif damage == "flip_a_byte":
        blob[-100] ^= 0xFF  # inside the tensor data: safetensors itself cannot tell
    else:
        blob = bytearray(b"not a safetensors file")
    path.write_bytes(bytes(blob))
    with pytest.warns(UserWarning, match="starting fresh"):
        result = train_model(tiny_model("ls", drop_path_rate=0.25), train, val,
                             TrainConfig(**RESUME_CFG), seed=5, state_dir=state, progress=False)
    assert result.resumed_from_epoch == 0 and len(result.history) == 4


def test_state_written_by_other_code_is_not_resumed(killed_run, tmp_path, monkeypatch):
    """Killed, then train.py fixed, then rerun: the fix must not continue the old code's run."""
    import anyorder.training.loop as train_module
    train, val, killed_state = killed_run
    state = tmp_path / "state"
    shutil.copytree(killed_state, state)
    monkeypatch.setattr(train_module, "code_digest", lambda: "a different train.py")
    result = train_model(tiny_model("ls", drop_path_rate=0.25), train, val,
                         TrainConfig(**RESUME_CFG), seed=5, state_dir=state, progress=False)
    assert result.resumed_from_epoch == 0


def test_state_from_other_settings_is_not_resumed(digits16, tmp_path):
    train = (digits16["train"][0][:128], digits16["train"][1][:128])
    cfg = TrainConfig(epochs=1, lr=2e-3, device="cpu")
    first = train_model(tiny_model("ls"), train, digits16["val"], cfg, seed=0, state_dir=tmp_path,
                        progress=False)
    other = train_model(tiny_model("ls"), train, digits16["val"], replace(cfg, lr=1e-3, epochs=2),
                        seed=0, state_dir=tmp_path, progress=False)
    assert other.resumed_from_epoch == 0 and len(other.history) == 2
    # Each fingerprint has its own directory: runs of different settings never clobber each other.
    assert first.state_dir != other.state_dir
    assert (first.state_dir / STATE_FILE).is_file() and (other.state_dir / STATE_FILE).is_file()


def test_a_diverging_run_stops_instead_of_saving_nan_weights(digits16):
    small = (digits16["train"][0][:128], digits16["train"][1][:128])
    with pytest.raises(TrainingDiverged, match="lower the learning rate"):
        train_model(tiny_model("ls"), small, digits16["val"],
                    TrainConfig(epochs=2, lr=1e30, grad_clip=None, device="cpu"), seed=0,
                    progress=False)

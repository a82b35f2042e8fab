"""params.yaml is validated once, before any compute, with messages that name the key."""
import pytest
import yaml

from anyorder.config import MergeModel, Settings, load_settings, settings_from_dict
from anyorder.model.settings import FinetuneRun
from anyorder.settings import ConfigError
from conftest import shipped_params


def test_the_project_params_file_is_valid():
    load_settings("params.yaml")  # raises ConfigError naming the key otherwise


def test_types_and_knob_defaults_are_parsed():
    settings = settings_from_dict(shipped_params({
        "pretrain": {"lr": "1e-3"}, "report": {"baseline": "a"},
        "finetune": {"runs": {"a": {"variant": "ls_pos", "seed": 3},
                              "b": {"variant": "ls_pred", "seed": 0,
                                    "position_loss_weight": 0.5}}}}))
    assert settings.pretrain.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string
    assert settings.finetune.runs["a"].variant == "ls_pos"
    assert isinstance(settings, Settings)
    # Variant knobs: the default where unset, the value where set, None where not applicable.
    runs = settings.finetune.runs
    assert runs["a"].knob("position_embedding_dim") == 32
    assert runs["a"].knob("order_sampling") == "batch"
    assert runs["a"].knob("position_loss_weight") is None
    assert runs["b"].knob("position_loss_weight") == 0.5


def test_a_run_may_have_its_own_schedule_length_and_learning_rate():
    settings = settings_from_dict(shipped_params({"report": {"baseline": "seq"}, "finetune": {
        "epochs": 8, "lr": 1e-3, "runs": {"seq": {"variant": "sequential", "seed": 0},
                                          "ls": {"variant": "ls", "seed": 0, "epochs": 16,
                                                 "lr": 2e-3}}}}))
    shared, runs = settings.finetune, settings.finetune.runs
    assert (runs["seq"].training(shared).epochs, runs["seq"].training(shared).lr) == (8, 1e-3)
    own = runs["ls"].training(shared)
    assert (own.epochs, own.lr) == (16, 2e-3)
    assert own.batch_size == shared.batch_size and type(own).__name__ == "TrainConfig"


@pytest.mark.parametrize("raw,key,fragment", [
    ({"model": {"depht": 4}}, "model.depht", "unknown key"),
    ({"report": {"baseline": "base"}}, "report.baseline",
     "must name a run of finetune.runs (sequential, ls_s0, ls_s1"),
    ({"data": {"split": "official_test"}}, "data.split", "must be one of"),
    ({"colour": 1}, "colour", "unknown key"),
    ({"finetune": {"runs": {"x": {"variant": "ls", "sead": 1}}}}, "finetune.runs.x.sead",
     "unknown key"),
    ({"model": {"depth": "eight"}}, "model.depth", "must be an integer"),
    ({"model": {"depth": 2.5}}, "model.depth", "must be an integer"),
    ({"pretrain": {"lr": "fast"}}, "pretrain.lr", "must be a number"),
    ({"pretrain": {"epochs": True}}, "pretrain.epochs", "must be an integer"),
    ({"data": {"source": "mnist"}}, "data.source", "must be one of"),
    ({"finetune": {"runs": {"x": {"variant": "shuffle", "seed": 0}}}}, "finetune.runs.x.variant",
     "must be one of"),
    ({"model": {"depth": 0}}, "model.depth", "must be >= 1"),
    ({"pretrain": {"lr": -0.1}}, "pretrain.lr", "must be > 0"),
    ({"finetune": {"batch_size": 0}}, "finetune.batch_size", "must be >= 1"),
    ({"model": {"patch_size": 5}}, "model.patch_size", "must divide data.image_size=32"),
    ({"model": {"num_heads": 3}}, "model.num_heads", "must divide model.embed_dim=64"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "must be in (0, 1)"),
    ({"data": {"path": " "}}, "data.path", "must name a file or directory"),
    ({"pretrain": {"lr": "inf"}}, "pretrain.lr", "must be a finite number"),
    ({"pretrain": {"lr": float("inf")}}, "pretrain.lr", "must be a finite number"),
    ({"finetune": {"weight_decay": float("nan")}}, "finetune.weight_decay",
     "must be a finite number"),
    ({"finetune": {"grad_clip": "-inf"}}, "finetune.grad_clip", "must be a finite number"),
    ({"evaluate": {"device": "gpu"}}, "evaluate.device", "must be auto, cpu, cuda or cuda:N"),
    ({"evaluate": {"device": "cuda:x"}}, "evaluate.device", "must be auto, cpu, cuda or cuda:N"),
    ({"pretrain": {"device": "CUDA"}}, "pretrain.device", "must be auto, cpu, cuda or cuda:N"),
    ({"pretrain": {"order_sampling": "sample"}}, "pretrain.order_sampling", "unknown key"),
    ({"finetune": {"runs": {"s": {"variant": "sequential", "seed": 0,
                                  "order_sampling": "sample"}}}},
     "finetune.runs.s.order_sampling", "has no effect for variant sequential"),
    ({"finetune": {"runs": {"s": {"variant": "ls", "seed": 0, "position_loss_weight": 2.0}}}},
     "finetune.runs.s.position_loss_weight", "has no effect for variant ls"),
    ({"finetune": {"runs": {"s": {"variant": "ls_pred", "seed": 0,
                                  "position_loss_weight": -1}}}},
     "finetune.runs.s.position_loss_weight", "must be >= 0"),
    ({"finetune": {"runs": {"s": {"variant": "ls_pos", "seed": 0,
                                  "position_embedding_dim": 0}}}},
     "finetune.runs.s.position_embedding_dim", "must be >= 1"),
    ({"evaluate": {"num_orders": 0}}, "evaluate.num_orders", "must be >= 1"),
    ({"finetune": {"runs": {"s": {"variant": "ls", "seed": 0, "epochs": 0}}}},
     "finetune.runs.s.epochs", "must be >= 1"),
    ({"finetune": {"runs": {"s": {"variant": "ls", "seed": 0, "lr": 0}}}}, "finetune.runs.s.lr",
     "must be > 0"),
    ({"finetune": {"warmup_epochs": 3, "runs": {"s": {"variant": "ls", "seed": 0, "epochs": 2}}}},
     "finetune.runs.s.epochs", "must be > finetune.warmup_epochs"),
    ({"pretrain": {"warmup_epochs": 100}}, "pretrain.warmup_epochs", "must be in [0, epochs"),
    ({"finetune": {"runs": {"a/b": {"variant": "ls", "seed": 0}}}}, "finetune.runs.a/b",
     "names may hold only letters"),
    ({"export": {"opset": 21}}, "export.opset", "must be in 14..20"),
    ({"export": {"models": {"x y": {"model": "m", "metrics": "n"}}}}, "export.models.x y",
     "names may hold only letters"),
    ({"export": {"models": {"m": {"model": "", "metrics": "n"}}}}, "export.models.m.model",
     "must name a path"),
    ({"register": {"export": "nope"}}, "register.export", "must name an entry of export.models"),
    ({"register": {"alias": "1st"}}, "register.alias", "starting with a letter"),
    ({"register": {"gates": {"min_arbitrary_accuracy": 1.5}}},
     "register.gates.min_arbitrary_accuracy", "must be in [0, 1]"),
    ({"select": {"variant": "ls_mega"}}, "select.variant", "must be one of"),
    ({"model": "big"}, "model", "must be a mapping"),
])
def test_bad_settings_name_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        settings_from_dict(shipped_params(raw))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert fragment in message, message


def test_load_settings_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shipped_params({"model": {"depth": -1}})))
    with pytest.raises(ConfigError, match=r"params.yaml: model.depth: must be >= 1"):
        load_settings(path)
    with pytest.raises(ConfigError, match="no such parameters file"):
        load_settings(tmp_path / "missing.yaml")
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)


def test_yaml_infinity_and_nan_are_refused(tmp_path):
    """`lr: .inf` in YAML is a float, and trained to NaN while the stage reported success."""
    path = tmp_path / "params.yaml"
    for edit, key, literal in (({"pretrain": {"lr": float("inf")}}, "pretrain.lr", ".inf"),
                               ({"finetune": {"weight_decay": float("inf")}},
                                "finetune.weight_decay", ".inf"),
                               ({"model": {"mlp_ratio": float("nan")}}, "model.mlp_ratio", ".nan")):
        text = yaml.safe_dump(shipped_params(edit))
        assert f"{key.split('.')[1]}: {literal}" in text  # YAML's own spelling of inf / nan
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
            load_settings(path)


def test_overrides_are_validated_like_the_file():
    settings = settings_from_dict(shipped_params(), {"model.depth": 3, "finetune.epochs": 2})
    assert settings.model.depth == 3 and settings.finetune.epochs == 2
    with pytest.raises(ConfigError, match="model.depth: must be >= 1"):
        settings_from_dict(shipped_params(), {"model.depth": 0})
    with pytest.raises(ConfigError, match="model.nope: unknown key"):
        settings_from_dict(shipped_params(), {"model.nope": 1})


def _leaves(tree: dict, path: tuple = ()):
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from _leaves(value, path + (key,))
        else:
            yield path + (key,)


@pytest.mark.parametrize("path", list(_leaves(shipped_params())), ids=".".join)
def test_every_key_of_the_shipped_params_must_be_set(path):
    """params.yaml is the one source of the pipeline's values: leaving a key out is refused,
    naming it, except a run's knobs (left out: the variant's default)."""
    raw = shipped_params()
    node = raw
    for part in path[:-1]:
        node = node[part]
    del node[path[-1]]
    key = ".".join(path)
    if path[:2] == ("finetune", "runs") and path[-1] in FinetuneRun.OPTIONAL_KEYS:
        settings_from_dict(raw)
        return
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    message = str(info.value)
    assert message.startswith(key + ":"), message
    if path[:2] == ("merge", "models") and path[-1] in MergeModel.OPTIONAL_KEYS:
        assert "needs at least two model directories" in message  # a generator without sources
    else:
        assert "params.yaml must set it" in message, message


def test_a_missing_section_is_refused_naming_it(tmp_path):
    raw = shipped_params()
    del raw["compute"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params.yaml: compute: missing; params.yaml must set"):
        load_settings(path)

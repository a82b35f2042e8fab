"""params.yaml is validated once, before any compute, with messages that name the key."""
import pytest
import yaml

from anyorder.config import (TRAINING_SECTIONS, MergeModel, Settings, load_settings,
                             settings_from_dict)
from anyorder.model.settings import FinetuneRun
from anyorder.settings import ConfigError
from conftest import shipped_params


# The shipped runs: the models that params.yaml names elsewhere (nullspace, merge, analysis).
SHIPPED_RUNS = shipped_params()["finetune"]["runs"]

def test_the_project_params_file_is_valid():
    load_settings("params.yaml")  # raises ConfigError naming the key otherwise


def test_types_and_knob_defaults_are_parsed():
    settings = settings_from_dict(shipped_params({
        "pretrain": {"train": {"lr": "1e-3"}}, "report": {"baseline": "a"},
        "finetune": {"runs": {**SHIPPED_RUNS, "a": {"variant": "ls_pos", "seed": 3},
                              "b": {"variant": "ls_pred", "seed": 0,
                                    "position_loss_weight": 0.5}}}}))
    assert settings.pretrain.train.lr == pytest.approx(1e-3)  # YAML reads 1e-3 as a string
    assert settings.finetune.runs["a"].variant == "ls_pos"
    assert isinstance(settings, Settings)
    # Variant knobs: the default where unset, the value where set, None where not applicable.
    runs = settings.finetune.runs
    assert runs["a"].knob("position_embedding_dim") == 32
    assert runs["a"].knob("order_sampling") == "batch"
    assert runs["a"].knob("position_loss_weight") is None
    assert runs["b"].knob("position_loss_weight") == 0.5


def test_training_settings_take_the_run_then_the_section_then_the_shared_value():
    settings = settings_from_dict(shipped_params({
        "train": {"epochs": 7, "batch_size": 32, "shift_pixels": 0},
        "pretrain": {"train": {"epochs": 90, "lr": 0.002}},
        "finetune": {"train": {"batch_size": 16}, "runs": {
            **SHIPPED_RUNS, "long": {"variant": "ls", "seed": 0, "epochs": 11}}}}))
    pretrain, finetune = settings.pretrain.train, settings.finetune.train
    assert (pretrain.epochs, pretrain.lr, pretrain.batch_size) == (90, 0.002, 32)
    assert (finetune.epochs, finetune.batch_size, finetune.shift_pixels) == (7, 16, 0)
    assert settings.finetune.runs["long"].training(finetune).epochs == 11
    assert settings.finetune.runs["ls_s0"].training(finetune).epochs == 7
    nullspace = settings.nullspace.train  # its own epochs, the shared batch size
    assert (nullspace.epochs, nullspace.batch_size) == (4, 32)


def test_a_run_may_have_its_own_schedule_length_and_learning_rate():
    settings = settings_from_dict(shipped_params({"report": {"baseline": "seq"}, "finetune": {
        "train": {"epochs": 8, "lr": 1e-3}, "runs": {**SHIPPED_RUNS,
                                          "seq": {"variant": "sequential", "seed": 0},
                                          "ls": {"variant": "ls", "seed": 0, "epochs": 16,
                                                 "lr": 2e-3}}}}))
    shared, runs = settings.finetune.train, settings.finetune.runs
    assert (runs["seq"].training(shared).epochs, runs["seq"].training(shared).lr) == (8, 1e-3)
    own = runs["ls"].training(shared)
    assert (own.epochs, own.lr) == (16, 2e-3)
    assert own.batch_size == shared.batch_size and type(own).__name__ == "TrainConfig"


# Every settings error the params file can hold, in one table: the key it names, what it says.
@pytest.mark.parametrize("raw,key,fragment", [
    ({"model": {"depht": 4}}, "model.depht", "unknown key"),
    ({"report": {"baseline": "base"}}, "report.baseline",
     "must name a run of finetune.runs (sequential, ls_s0, ls_s1"),
    ({"data": {"split": "official_test"}}, "data.split", "must be one of"),
    ({"colour": 1}, "colour", "unknown key"),
    ({"finetune": {"runs": {"x": {"variant": "ls", "sead": 1}}}}, "finetune.runs.x.sead",
     "unknown key"),
    ({"model": {"overrides": {"depth": "eight"}}}, "model.overrides.depth", "must be an integer"),
    ({"model": {"overrides": {"depth": 2.5}}}, "model.overrides.depth", "must be an integer"),
    ({"model": {"depth": 8}}, "model.depth", "unknown key (known keys here: arch, drop_path_rate, "
     "overrides, pretrained)"),
    ({"model": {"overrides": {"img_sise": 64}}}, "model.overrides.img_sise", "unknown key"),
    ({"pretrain": {"train": {"lr": "fast"}}}, "pretrain.train.lr", "must be a number"),
    ({"pretrain": {"train": {"epochs": True}}}, "pretrain.train.epochs", "must be an integer"),
    ({"data": {"source": "mnist"}}, "data.source", "must be one of"),
    ({"finetune": {"runs": {"x": {"variant": "shuffle", "seed": 0}}}}, "finetune.runs.x.variant",
     "must be one of"),
    ({"model": {"overrides": {"depth": 0}}}, "model.overrides.depth", "must be >= 1"),
    ({"pretrain": {"train": {"lr": -0.1}}}, "pretrain.train.lr", "must be > 0"),
    ({"finetune": {"train": {"batch_size": 0}}}, "finetune.train.batch_size", "must be >= 1"),
    ({"model": {"overrides": {"patch_size": 5}}}, "model.overrides.patch_size",
     "model.overrides.patch_size=5 must divide the model's input size (model.overrides.img_size="
     "null (preset cpu_tiny's 32)"),
    ({"data": {"image_size": 36}}, "data.image_size", "must be divisible by the patch size "
     "(model.overrides.patch_size=null (preset cpu_tiny's 8)), got 36"),
    ({"model": {"overrides": {"num_heads": 3}}}, "model.overrides.num_heads",
     "model.overrides.num_heads=3 must divide model.overrides.embed_dim=null (preset cpu_tiny's "
     "64)"),
    ({"model": {"overrides": {"mean": [0.5, 0.5]}}}, "model.overrides.mean",
     "needs one value per channel"),
    ({"model": {"overrides": {"std": [0.5, 0, 0.5]}}}, "model.overrides.std", "must be > 0"),
    ({"model": {"overrides": {"img_size": 2}}}, "model.overrides.img_size", "must be >= 4"),
    ({"model": {"pretrained": "timm"}}, "model.pretrained",
     "cpu_tiny is a from-scratch preset of this project"),
    ({"data": {"image_size": 2}}, "data.image_size", "must be >= 4 (or null"),
    ({"data": {"test_fraction": 1.5}}, "data.test_fraction", "must be in (0, 1)"),
    ({"data": {"path": " "}}, "data.path", "must name a file or directory"),
    ({"pretrain": {"train": {"lr": "inf"}}}, "pretrain.train.lr", "must be a finite number"),
    ({"pretrain": {"train": {"lr": float("inf")}}}, "pretrain.train.lr", "must be a finite number"),
    ({"finetune": {"train": {"weight_decay": float("nan")}}}, "finetune.train.weight_decay",
     "must be a finite number"),
    ({"finetune": {"train": {"grad_clip": "-inf"}}}, "finetune.train.grad_clip",
     "must be a finite number"),
    ({"evaluate": {"device": "gpu"}}, "evaluate.device", "must be auto, cpu, cuda or cuda:N"),
    ({"evaluate": {"device": "cuda:x"}}, "evaluate.device", "must be auto, cpu, cuda or cuda:N"),
    ({"pretrain": {"train": {"device": "CUDA"}}}, "pretrain.train.device",
     "must be auto, cpu, cuda or cuda:N"),
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
    ({"finetune": {"train": {"warmup_epochs": 3},
                   "runs": {"s": {"variant": "ls", "seed": 0, "epochs": 2}}}},
     "finetune.runs.s.epochs", "must be > the fine-tunes' warmup_epochs (3"),
    ({"train": {"epochs": 0}}, "train.epochs", "must be >= 1"),
    ({"train": {"epoch": 3}}, "train.epoch", "unknown key"),
    ({"nullspace": {"train": {"seed": 3}}}, "nullspace.train.seed", "unknown key"),
    ({"pretrain": {"train": {"warmup_epochs": 100}}}, "pretrain.train.warmup_epochs",
     "must be in [0, epochs"),
    ({"finetune": {"runs": {"a/b": {"variant": "ls", "seed": 0}}}}, "finetune.runs.a/b",
     "names may hold only letters"),
    ({"export": {"opset": 21}}, "export.opset", "must be in 14..20"),
    ({"export": {"models": ["ls_best", "nope"]}}, "export.models",
     "must name a model of finetune.runs or select.name (sequential, ls_s0"),
    ({"export": {"models": ["ls_pos", "ls_pos"]}}, "export.models", "names a model twice"),
    ({"nullspace": {"arms": {"a": {"start": "models/finetune/ls_s0", "noise": "none",
                                   "seed": 0}}}}, "nullspace.arms.a.start", "must name a model"),
    ({"nullspace": {"study_arms": {"a": {"start": "ls_s9", "noise": "random", "seed": 0}}}},
     "nullspace.study_arms.a.start", "must name a model of finetune.runs or select.name"),
    ({"merge": {"models": {"m": {"generator": "random", "sources": ["ls_s0", "ls_best"],
                                 "seed": 0}}}}, "merge.models.m.sources",
     "must name a model of finetune.runs (sequential"),
    ({"analysis": {"models": ["ls_s0", "nope"]}}, "analysis.models",
     "must name a model of finetune.runs"),
    ({"select": {"name": "ls_s0"}}, "select.name", "must differ from every run"),
    ({"register": {"export": "nope"}}, "register.export", "must name an entry of export.models"),
    ({"register": {"alias": "1st"}}, "register.alias", "starting with a letter"),
    ({"register": {"gates": {"min_arbitrary_accuracy": 1.5}}},
     "register.gates.min_arbitrary_accuracy", "must be in [0, 1]"),
    ({"select": {"variant": "ls_mega"}}, "select.variant", "must be one of"),
    ({"model": "big"}, "model", "must be a mapping"),
    # merge entries
    ({"merge": {"models": {"m": {"generator": "random", "sources": ["ls_s0"], "seed": 0}}}},
     "merge.models.m.sources", "needs at least two runs"),
    ({"merge": {"models": {"m": {"generator": "random", "sources": ["ls_s0", "ls_s0"],
                                 "seed": 0}}}}, "merge.models.m.sources", "names a run twice"),
    ({"merge": {"models": {"m": {"generator": "greedy", "sources": ["ls_s0", "ls_s1"],
                                 "base": "ls_s2", "seed": 0}}}}, "merge.models.m.base",
     "must be one of the sources"),
    ({"merge": {"models": {"m": {"generator": "manual", "seed": 0}}}}, "merge.models.m.recipe",
     "the manual generator needs a recipe file"),
    ({"merge": {"models": {"m": {"generator": "random", "sources": ["ls_s0", "ls_s1"],
                                 "recipe": "r.yaml", "seed": 0}}}}, "merge.models.m.recipe",
     "only the manual generator reads a recipe"),
    # robustness and nullspace
    ({"nullspace": {"synthesis": {"epsilon": 0}}}, "nullspace.synthesis.epsilon", "must be > 0"),
    ({"nullspace": {"synthesis": {"steps": 0}}}, "nullspace.synthesis.steps", "must be >= 1"),
    ({"nullspace": {"synthesis": {"batch_size": 0}}}, "nullspace.synthesis.batch_size",
     "must be"),
    ({"nullspace": {"synthesis": {"rounds": 3}}}, "nullspace.synthesis.rounds", "unknown key"),
    ({"nullspace": {"arms": {"a": {"start": "sequential", "noise": "gaussian", "seed": 0}}}},
     "nullspace.arms.a.noise", "must be one"),
    ({"robustness": {"attacks": {"eps": [0.5, 2]}}}, "robustness.attacks.eps", "every budget"),
    ({"robustness": {"attacks": {"eps": [-0.01]}}}, "robustness.attacks.eps", "every budget"),
    ({"robustness": {"attacks": {"names": ["cw"]}}}, "robustness.attacks.names",
     "unknown attack"),
    ({"robustness": {"corruptions": {"names": ["rain"]}}}, "robustness.corruptions.names",
     "unknown corruption"),
    ({"robustness": {"corruptions": {"severities": [0]}}}, "robustness.corruptions.severities",
     ""),
    ({"robustness": {"attacks": {"pgd_random_start": "yes"}}},
     "robustness.attacks.pgd_random_start", "must be true or false"),
])
def test_bad_settings_name_the_key(raw, key, fragment):
    with pytest.raises(ConfigError) as info:
        settings_from_dict(shipped_params(raw))
    message = str(info.value)
    assert message.startswith(key + ":"), message
    assert fragment in message, message


def test_load_settings_names_the_file(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(shipped_params({"model": {"overrides": {"depth": -1}}})))
    with pytest.raises(ConfigError, match=r"params.yaml: model.overrides.depth: must be >= 1"):
        load_settings(path)
    with pytest.raises(ConfigError, match="no such parameters file"):
        load_settings(tmp_path / "missing.yaml")
    path.write_text("model: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_settings(path)


def test_yaml_infinity_and_nan_are_refused(tmp_path):
    """`lr: .inf` in YAML is a float, and trained to NaN while the stage reported success."""
    path = tmp_path / "params.yaml"
    for edit, key, literal in (({"pretrain": {"train": {"lr": float("inf")}}},
                                "pretrain.train.lr", ".inf"),
                               ({"finetune": {"train": {"weight_decay": float("inf")}}},
                                "finetune.train.weight_decay", ".inf"),
                               ({"model": {"overrides": {"mlp_ratio": float("nan")}}},
                                "model.overrides.mlp_ratio", ".nan")):
        text = yaml.safe_dump(shipped_params(edit))
        assert f"{key.split('.')[-1]}: {literal}" in text  # YAML's own spelling of inf / nan
        path.write_text(text)
        with pytest.raises(ConfigError, match=rf"{key}: must be a finite number"):
            load_settings(path)


def test_overrides_are_validated_like_the_file():
    settings = settings_from_dict(shipped_params(), {"model.overrides.depth": 3,
                                                    "finetune.train.epochs": 2})
    assert settings.model.overrides.depth == 3 and settings.finetune.train.epochs == 2
    with pytest.raises(ConfigError, match="model.overrides.depth: must be >= 1"):
        settings_from_dict(shipped_params(), {"model.overrides.depth": 0})
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
    if path[0] in TRAINING_SECTIONS and path[1:2] == ("train",) and len(path) == 3:
        # A section's own training setting left out: the shared one applies.
        assert getattr(getattr(settings_from_dict(raw), path[0]).train, path[2]) == \
            shipped_params()["train"][path[2]]
        return
    with pytest.raises(ConfigError) as info:
        settings_from_dict(raw)
    message = str(info.value)
    assert message.startswith(key + ":"), message
    if path[:2] == ("merge", "models") and path[-1] in MergeModel.OPTIONAL_KEYS:
        assert "needs at least two runs" in message  # a generator without sources
    else:
        assert "params.yaml must set it" in message, message


def test_a_missing_section_is_refused_naming_it(tmp_path):
    raw = shipped_params()
    del raw["compute"]
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(ConfigError, match=r"params.yaml: compute: missing; params.yaml must set"):
        load_settings(path)


def test_the_documented_real_scale_recipe_is_valid_settings():
    """docs/pipeline.md's real-scale command (the paper's setting on a GPU) stays valid: its
    overrides build settings, name a timm ViT at 224 px with timm's weights, and the paper's
    schedule reaches every training section."""
    from pathlib import Path
    from anyorder.model.spec import resolve_image_size
    docs = (Path(__file__).resolve().parents[1] / "docs/pipeline.md").read_text()
    block = docs.split("<!-- real-scale -->")[1].split("<!-- /real-scale -->")[0]
    pairs = [arg.split("=", 1) for arg in block.replace("\\\n", " ").split()
             if "=" in arg and not arg.startswith("-")]
    assert len(pairs) >= 15 and "-S" in block
    overrides = {key: yaml.safe_load(value) for key, value in pairs}
    settings = settings_from_dict(shipped_params(), overrides)
    assert settings.model.arch == "vit_base_patch16_224" and settings.model.pretrained == "timm"
    assert resolve_image_size(settings.model, settings.data.image_size) == 224
    assert settings.data.source == "cifar100"
    for run in settings.finetune.runs.values():
        cfg = run.training(settings.finetune.train)
        assert (cfg.epochs, cfg.batch_size, cfg.lr, cfg.weight_decay, cfg.schedule,
                cfg.warmup_epochs, cfg.grad_clip, cfg.shift_pixels) == (100, 128, 1e-4, 0.0,
                                                                       "linear", 0, 1.0, 0)
    nullspace = settings.nullspace.train
    assert (nullspace.epochs, nullspace.lr, nullspace.weight_decay, nullspace.schedule) == (
        10, 1e-4, 1e-4, "cosine")

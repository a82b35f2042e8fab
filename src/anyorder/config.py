"""The pipeline's settings: the schema of params.yaml, read once into frozen, validated sections.

The sections the library's own functions take live next to that code (`anyorder.data.settings`,
`anyorder.model.settings`, `anyorder.training.settings`, `anyorder.robustness.settings`,
`anyorder.evaluation.gates`); here are the sections only pipeline stages read, and the root
`Settings` that holds them all. params.yaml is the one source of the pipeline's values: every key
must be set there (only per-entry knobs whose absence means a default may be left out), and every
problem raises `ConfigError` naming the dotted key (`anyorder.settings`), before any compute.

A pipeline stage calls `settings.restrict_to(declared)` with the params its DVC stage declares;
from then on, reading a key outside them raises `UndeclaredParamError`. DVC reruns a stage only
when a declared param changes, so a stage that read an undeclared one would silently keep stale
outputs.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from anyorder.data.settings import DataConfig
from anyorder.evaluation.gates import Gates
from anyorder.model.settings import FinetuneRun, ModelConfig, Variant
from anyorder.robustness.settings import RobustnessConfig, SynthesisConfig
from anyorder.settings import (AccessLog, ConfigError, Section, apply_overrides, build_section,
                               check_device, check_name, require)
from anyorder.training.settings import TrainConfig


@dataclass(frozen=True)
class ComputeConfig(Section):
    """How much of the machine one stage process takes."""
    # torch and ONNX Runtime threads (0: all cores, shared evenly between torchrun's processes).
    # Two stages side by side on 2 cores (dvc exp queue --jobs 2, Prefect) thrash unless each
    # gets threads: 1.
    threads: int
    # Training's data loader processes (null: none on CPU; on a GPU the process's cores less one,
    # at most 8). They read and collate batches; results do not depend on how many there are.
    loader_workers: Optional[int] = None

    def check(self, key: str) -> None:
        require(self.threads >= 0, f"{key}.threads", "must be >= 0 (0: all cores)", self.threads)
        if self.loader_workers is not None:
            require(self.loader_workers >= 0, f"{key}.loader_workers", "must be >= 0 or null",
                    self.loader_workers)


# The sections that train. Each holds `train:`, what it sets differently from the top-level
# `train:` section (every key of it may be set, none must be); the section's settings are the
# top-level ones with its own on top, and a fine-tune run's own `epochs` / `lr` on top of those.
TRAINING_SECTIONS = ("pretrain", "finetune", "nullspace")


def with_shared_training(raw: dict) -> dict:
    """`raw` with each training section's `train:` completed from the top-level `train:`
    (before the sections are built: a key missing in both is reported as missing)."""
    shared = raw.get("train")
    if not isinstance(shared, dict):
        return raw
    out = dict(raw)
    for name in TRAINING_SECTIONS:
        section = raw.get(name)
        if isinstance(section, dict) and isinstance(section.get("train"), dict):
            out[name] = {**section, "train": {**shared, **section["train"]}}
    return out


@dataclass(frozen=True)
class PretrainConfig(Section):
    train: TrainConfig               # train, with pretrain.train on top
    seed: int

    def check(self, key: str) -> None:
        self.train.check(f"{key}.train")


@dataclass(frozen=True)
class FinetuneConfig(Section):
    train: TrainConfig               # train, with finetune.train on top (a run may set its own
    runs: dict[str, FinetuneRun]     # epochs and lr: `FinetuneRun.training`)

    def check(self, key: str) -> None:
        self.train.check(f"{key}.train")
        require(len(self.runs) >= 1, f"{key}.runs", "needs at least one run", self.runs)
        warmup = self.train.warmup_epochs
        for name, run in self.runs.items():
            check_name(name, f"{key}.runs.{name}")
            run.check(f"{key}.runs.{name}")
            if run.epochs is not None:  # the shared warm-up must fit the run's own schedule
                require(warmup < run.epochs, f"{key}.runs.{name}.epochs",
                        f"must be > the fine-tunes' warmup_epochs ({warmup})", run.epochs)


@dataclass(frozen=True)
class EvaluateConfig(Section):
    num_orders: int
    order_seed: int
    batch_size: int
    device: str

    def check(self, key: str) -> None:
        require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class SelectConfig(Section):
    """The best run of one variant, chosen on the validation split (never the test split)."""
    name: str                        # written to models/selected/<name>
    variant: Variant
    num_orders: int                  # seeded random orders each candidate is scored over
    order_seed: int
    batch_size: int
    device: str

    def check(self, key: str) -> None:
        check_name(self.name, f"{key}.name")
        require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class ExportConfig(Section):
    # The TorchScript-based exporter writes opsets 14..20 (17 brings LayerNormalization).
    opset: int
    check_orders: int                # seeded random orders the chained graphs are checked in
    check_seed: int
    models: list[str]                # models by name (a run of finetune.runs, or select.name)

    def check(self, key: str) -> None:
        require(14 <= self.opset <= 20, f"{key}.opset", "must be in 14..20 (what the exporter "
                "writes)", self.opset)
        require(self.check_orders >= 1, f"{key}.check_orders", "must be >= 1", self.check_orders)
        require(len(set(self.models)) == len(self.models), f"{key}.models", "names a model twice",
                self.models)


@dataclass(frozen=True)
class RegisterConfig(Section):
    model_name: str                       # the registered model in the MLflow registry
    export: str                           # which entry of export.models to register
    alias: str                            # moved to the new version only if the gates pass
    gates: Gates

    def check(self, key: str, exports: dict) -> None:
        require(self.export in exports, f"{key}.export", f"must name an entry of export.models "
                f"({', '.join(exports) or 'none'})", self.export)
        require(re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", self.model_name) is not None,
                f"{key}.model_name", "use letters, digits, '.', '_' and '-'", self.model_name)
        require(re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]*", self.alias) is not None,
                f"{key}.alias", "use letters, digits, '_' and '-', starting with a letter",
                self.alias)
        self.gates.check(f"{key}.gates")


@dataclass(frozen=True)
class NullspaceArm(Section):
    """One nullspace fine-tuning arm: a start model, the noise it trains against, a seed."""
    start: str                       # the model it fine-tunes: a run of finetune.runs, or select.name
    noise: Literal["nullspace", "random", "none"]
    seed: int


@dataclass(frozen=True)
class NullspaceConfig(Section):
    train: TrainConfig               # train, with nullspace.train on top
    synthesis: SynthesisConfig
    arms: dict[str, NullspaceArm]
    # Arms only the study (pipeline/studies/study.py, `make study`) runs, beside `arms`: no stage
    # reads it.
    study_arms: dict[str, NullspaceArm]

    def check(self, key: str) -> None:
        self.train.check(f"{key}.train")
        self.synthesis.check(f"{key}.synthesis")
        for section, arms in (("arms", self.arms), ("study_arms", self.study_arms)):
            for name in arms:
                check_name(name, f"{key}.{section}.{name}")


@dataclass(frozen=True)
class PruningConfig(Section):
    """Test-time pruning curves of every evaluated model (evaluate@<run>, merge@<name>)."""
    subsets: int                     # seeded kept-block choices (and orders) per number removed
    seed: int
    batch_size: int
    device: str

    def check(self, key: str) -> None:
        require(self.subsets >= 1, f"{key}.subsets", "must be >= 1", self.subsets)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True, kw_only=True)
class MergeModel(Section):
    """One Frankenstein model: a recipe generator and its sources (runs of finetune.runs)."""
    generator: Literal["random", "greedy", "manual"]
    sources: list[str] = field(default_factory=list)
    base: Optional[str] = None       # stem/head source; null: the first (random), best (greedy)
    seed: int
    recipe: Optional[str] = None     # manual: a recipe file (its sources replace `sources`)
    OPTIONAL_KEYS = ("sources", "base", "recipe")  # as `check` allows for the generator

    def check(self, key: str) -> None:
        if self.generator == "manual":
            require(bool(self.recipe), f"{key}.recipe", "the manual generator needs a recipe "
                    "file (e.g. models/recipes/<name>.yaml)", self.recipe)
            return
        require(self.recipe is None, f"{key}.recipe", f"only the manual generator reads a "
                f"recipe file, not {self.generator}; remove it", self.recipe)
        require(len(self.sources) >= 2, f"{key}.sources", "needs at least two runs",
                self.sources)
        require(len(set(self.sources)) == len(self.sources), f"{key}.sources", "names a run "
                "twice", self.sources)
        require(self.base is None or self.base in self.sources, f"{key}.base",
                "must be one of the sources, or null", self.base)


@dataclass(frozen=True)
class MergeConfig(Section):
    num_orders: int                  # validation orders the greedy rule and the card score over
    order_seed: int
    batch_size: int
    device: str
    models: dict[str, MergeModel]

    def check(self, key: str) -> None:
        require(self.num_orders >= 1, f"{key}.num_orders", "must be >= 1", self.num_orders)
        require(self.batch_size >= 1, f"{key}.batch_size", "must be >= 1", self.batch_size)
        check_device(self.device, f"{key}.device")
        for name, entry in self.models.items():
            check_name(name, f"{key}.models.{name}")
            entry.check(f"{key}.models.{name}")


@dataclass(frozen=True)
class AnalysisConfig(Section):
    """How blocks behave at the slot they run at (the analysis stage)."""
    models: list[str]                # runs of finetune.runs, by name
    block: int                       # the block whose output is projected, run at every slot
    projection: Literal["umap", "pca"]
    num_images: int                  # test images (a seeded subset) for the projection
    num_orders: int                  # random orders the per-slot contribution averages over
    seed: int
    batch_size: int
    device: str

    def check(self, key: str) -> None:
        require(self.block >= 0, f"{key}.block", "must be >= 0", self.block)
        for name in ("num_images", "num_orders", "batch_size"):
            require(getattr(self, name) >= 1, f"{key}.{name}", "must be >= 1",
                    getattr(self, name))
        check_device(self.device, f"{key}.device")


@dataclass(frozen=True)
class ReportConfig(Section):
    """The report stage: which run every other is compared with."""
    baseline: str                 # a run of finetune.runs (the denominator of the headline)

    def check(self, key: str, runs: dict) -> None:
        require(self.baseline in runs, f"{key}.baseline", f"must name a run of finetune.runs "
                f"({', '.join(runs)})", self.baseline)


@dataclass(frozen=True)
class MlflowConfig(Section):
    experiment: str
    # null: $MLFLOW_TRACKING_URI, else a SQLite file `mlflow.db` at the project root.
    tracking_uri: Optional[str]


@dataclass(frozen=True)
class Settings(Section):
    data: DataConfig
    model: ModelConfig
    train: TrainConfig               # what every training run shares (TRAINING_SECTIONS)
    pretrain: PretrainConfig
    finetune: FinetuneConfig
    evaluate: EvaluateConfig
    select: SelectConfig
    export: ExportConfig
    register: RegisterConfig
    nullspace: NullspaceConfig
    robustness: RobustnessConfig
    pruning: PruningConfig
    merge: MergeConfig
    analysis: AnalysisConfig
    report: ReportConfig
    mlflow: MlflowConfig
    compute: ComputeConfig

    def check(self) -> None:
        self.compute.check("compute")
        self.data.check("data")
        self.model.check("model", self.data.image_size)
        self.train.check("train")
        self.pretrain.check("pretrain")
        self.finetune.check("finetune")
        self.evaluate.check("evaluate")
        self.select.check("select")
        self.export.check("export")
        self.register.check("register", self.export.models)
        self.nullspace.check("nullspace")
        self.robustness.check("robustness")
        self.pruning.check("pruning")
        self.merge.check("merge")
        self.analysis.check("analysis")
        self.report.check("report", self.finetune.runs)
        self.check_model_names()

    def check_model_names(self) -> None:
        """Every model named in params.yaml is a run of finetune.runs, or the selected model
        where a stage can read it (nullspace starts, exports)."""
        runs = list(self.finetune.runs)
        require(self.select.name not in runs, "select.name", "must differ from every run of "
                "finetune.runs (models are referred to by name)", self.select.name)
        models = runs + [self.select.name]

        def known(name: str, key: str, names: list[str], where: str) -> None:
            require(name in names, key, f"must name a model of {where} ({', '.join(names)})",
                    name)

        either = "finetune.runs or select.name"
        for section in ("arms", "study_arms"):
            for name, arm in getattr(self.nullspace, section).items():
                known(arm.start, f"nullspace.{section}.{name}.start", models, either)
        for name, entry in self.merge.models.items():
            for source in entry.sources:
                known(source, f"merge.models.{name}.sources", runs, "finetune.runs")
        for name in self.analysis.models:
            known(name, "analysis.models", runs, "finetune.runs")
        for name in self.export.models:
            known(name, "export.models", models, either)

    def restrict_to(self, declared: list[str], stage: str) -> "Settings":
        """From now on, reading a key outside `declared` (dotted prefixes) raises
        UndeclaredParamError naming `stage`. Returns self."""
        self._attach(AccessLog(stage, declared), "")
        return self

    def keys_read(self) -> set[str]:
        """The dotted keys read since `restrict_to` (empty before)."""
        log = object.__getattribute__(self, "__dict__").get("_log")
        return set(log.read) if log else set()


# A model of the pipeline by name: a run of finetune.runs, or the selected model. Both the rule
# and the directories live here; a stage that resolves a name declares `select.name`.
FINETUNED, SELECTED = Path("models/finetune"), Path("models/selected")


def model_dir(settings: Settings, name: str) -> Path:
    """The directory of the model called `name` (checked at load: see `check_model_names`)."""
    return SELECTED / name if name == settings.select.name else FINETUNED / name


def model_evaluation(settings: Settings, name: str) -> Path:
    """The evaluation (test split, random orders) of the model called `name`: the selected
    model's lies beside it, a run's in metrics/evaluate/."""
    if name == settings.select.name:
        return SELECTED / name / "evaluate.json"
    return Path("metrics/evaluate") / f"{name}.json"


def load_settings(path: str | Path = "params.yaml", overrides: Optional[dict[str, Any]] = None
                  ) -> Settings:
    """Read a params file into validated `Settings`; raise `ConfigError` naming the bad key."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such parameters file (run from the project root, or pass "
                          f"the path of your params.yaml)")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return settings_from_dict(raw, overrides)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def settings_from_dict(raw: Any, overrides: Optional[dict[str, Any]] = None) -> Settings:
    """Build validated `Settings` from a nested dict (plus optional dotted-key overrides)."""
    if not isinstance(raw, dict):
        raise ConfigError(f"the top level must be a mapping of sections, got {type(raw).__name__}")
    raw = with_shared_training(apply_overrides(raw, overrides or {}))
    settings = build_section(Settings, raw, "")
    settings.check()
    return settings

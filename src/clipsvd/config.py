"""The study configuration: YAML validated against config/schema.yaml, then typed objects.

Every user error is a ConfigError with one line naming the file and the key.
"""
from __future__ import annotations

import copy
import functools
import hashlib
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

SCHEMA_PATH = Path(__file__).resolve().parent / "resources" / "schema.yaml"
METHODS = ("zero_shot", "linear_probe", "clip_lora", "comp_lora", "clip_svd", "tip_adapter",
           "tip_adapter_f", "lp_pp", "clip_adapter", "full_finetune", "coop", "cocoop", "kgcoop",
           "biomedcoop")
# One colour per method, in the report's figures and for its runs in the MLflow UI.
METHOD_COLORS = {"zero_shot": "#555555", "linear_probe": "#1f77b4", "clip_lora": "#2ca02c",
                 "comp_lora": "#9467bd", "clip_svd": "#d62728", "lp_pp": "#17becf",
                 "tip_adapter": "#ff7f0e", "tip_adapter_f": "#8c564b", "clip_adapter": "#e377c2",
                 "full_finetune": "#000000", "coop": "#bcbd22", "cocoop": "#ffbb78",
                 "kgcoop": "#7f7f7f", "biomedcoop": "#aec7e8"}
# Methods that train with an adapter (full_finetune: every weight, the ablations' reference;
# coop, cocoop, kgcoop, biomedcoop: context vectors in the prompts).
ADAPTER_METHODS = ("clip_lora", "comp_lora", "clip_svd", "full_finetune", "coop", "cocoop",
                   "kgcoop", "biomedcoop")
# Methods that use frozen image features (the store's, computed once; clipsvd.feature_adapters).
FEATURE_METHODS = ("zero_shot", "linear_probe", "tip_adapter", "tip_adapter_f", "lp_pp",
                   "clip_adapter")
# Methods with weights only for the classes they were trained on: no score for novel classes.
CLOSED_SET_METHODS = ("linear_probe", "lp_pp")
SETTINGS = ("few_shot", "base_to_novel")
DEFAULT_EPOCHS = 50


@dataclass(frozen=True)
class PreprocessingConfig:
    intensity: str = "percentile"  # percentile | zscore | window | none
    percentiles: tuple[float, float] = (0.5, 99.5)
    window: Any = None  # a named CT window (lung, abdomen, brain, bone) or [low, high] in HU
    resize: str = "pad"  # pad | crop | stretch: how a non-square image reaches the square size
    slices: str = "center"  # center | every_k | all: how a 3D volume becomes 2D samples
    slice_step: int = 1
    on_error: str = "stop"  # stop | skip: what an unreadable image does to preparation
    train_view: int = 512  # train split kept with its aspect, longer side ≤ this (0: none)


@dataclass(frozen=True)
class SplitConfig:
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)  # train, val, test when the source has none
    seed: int = 0


@dataclass(frozen=True)
class SamplingConfig:
    insufficient: str = "error"  # error | replace | all: a class with fewer than K train images
    nested: bool = False  # the K=1 support set inside the K=2 one, and so on
    max_val_shots: int = 4  # validation support set: min(K, max_val_shots) per class


@dataclass(frozen=True)
class DemoConfig:
    per_class: int = 40
    image_size: int = 96
    seed: int = 0


@dataclass(frozen=True)
class MedmnistConfig:
    flag: str  # a MedMNIST dataset name as in medmnist.INFO, e.g. pathmnist, organmnist3d
    size: int = 28  # 28 reads <flag>.npz; 64, 128, 224 read <flag>_<size>.npz


@dataclass(frozen=True)
class ColumnsConfig:
    """csv: which header of the manifest holds each field, when the file's names differ."""
    path: str = "path"
    label: str = "label"
    split: str = "split"
    group: str = "group"
    class_name: str = "class_name"


@dataclass(frozen=True)
class GroupsConfig:
    """Which images belong together (a patient, a study), so one group never spans two splits."""
    pattern: str | None = None  # regex on the image's path relative to root; group = 1st capture
    dicom: str = "patient"  # patient | study: the DICOM tag that groups DICOM images by default
    independent: bool = False  # true: every image is its own group (the user says so)


@dataclass(frozen=True)
class DatasetConfig:
    name: str
    format: str  # folder | csv | medmnist | coop_json
    root: str
    templates: tuple[str, ...] = ("a photo of a {}.",)
    manifest: str | None = None  # csv: the manifest file, relative to root
    medmnist: MedmnistConfig | None = None  # medmnist: which npz file under root
    split_file: str | None = None  # coop_json: split_<NAME>.json under root (default: the only one)
    image_dir: str | None = None  # coop_json: folder the split's paths start from (default: auto)
    columns: ColumnsConfig = field(default_factory=ColumnsConfig)  # csv: header names
    groups: GroupsConfig = field(default_factory=GroupsConfig)
    demo: DemoConfig | None = None  # generated locally by `clipsvd demo-data`
    preprocessing: PreprocessingConfig = field(default_factory=PreprocessingConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    overrides: dict = field(default_factory=dict)  # {method: {lr, epochs, ...}} for this dataset
    settings: tuple[str, ...] | None = None  # None: every setting of the study
    class_names: dict | None = None  # {source class name: the name prompts give it}
    exclude_pretrained_on: str | None = None  # <model>/<tag>: its pretraining images leave train
    descriptions: str | None = None  # BiomedCoOp's class descriptions (None: the shipped file)


@dataclass(frozen=True)
class ModelConfig:
    name: str = "tiny-clip"
    pretrained: str | None = None
    init_seed: int = 0  # random-weight architectures: the seed of their initialisation
    logit_scale: Any = "model"  # "model" (the model's own, detached) or a fixed number


@dataclass(frozen=True)
class TrainingConfig:
    """What every adapter method shares: optimiser, length, augmentation, precision."""
    encoders: tuple[str, ...] = ("vision", "text")
    layers: Any = "all"  # all | top<N> | bottom<N> | middle | [indices]
    lr: float = 2e-3
    weight_decay: float = 0.0
    batch_size: int = 32
    epochs: int | None = DEFAULT_EPOCHS
    iterations_per_shot: int | None = None  # length as iterations × K instead of epochs
    min_lr: float = 1e-6
    crop_scale: tuple[float, float] = (0.08, 1.0)
    flip: bool = True
    precision: str = "fp32"  # fp32 | bf16 | fp16 (mixed precision, GPU only)


@dataclass(frozen=True)
class ClipSvdConfig(TrainingConfig):
    matrices: tuple[str, ...] = ("q", "k", "v", "out", "mlp")
    execution: str = "auto"  # auto | recompose | factored (see clipsvd.adapters.svd)


@dataclass(frozen=True)
class LoRAMethodConfig(TrainingConfig):
    matrices: tuple[str, ...] = ("q", "k", "v")
    rank: int = 2
    alpha: float = 1.0
    dropout: float = 0.25
    lr: float = 2e-4
    weight_decay: float = 0.01
    epochs: int | None = None
    iterations_per_shot: int | None = 500


@dataclass(frozen=True)
class CompLoRAMethodConfig(LoRAMethodConfig):
    protect_rank: int | None = None
    protect_energy: float | None = 0.9


@dataclass(frozen=True)
class LinearProbeConfig:
    c_grid: tuple[float, ...] = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0, 1000.0)
    max_iter: int = 1000


@dataclass(frozen=True)
class TipAdapterConfig:
    """Tip-Adapter's published biomedical search (BiomedCoOp's config): β and α each over
    ``search_step`` values from 0.1 up to ``search_scale``, on the validation support set."""
    init_alpha: float = 1.0
    init_beta: float = 1.0
    search_scale: tuple[float, float] = (50.0, 50.0)  # β, α
    search_step: tuple[int, int] = (200, 200)  # β, α


@dataclass(frozen=True)
class TipAdapterFConfig(TipAdapterConfig):
    lr: float = 0.001
    eps: float = 1e-4
    weight_decay: float = 0.01  # torch's AdamW default, which the published code leaves as is
    epochs: int = 20
    batch_size: int = 256


@dataclass(frozen=True)
class LPPlusPlusConfig:
    epochs: int = 300
    alpha_every: int = 10
    alpha_init_factor: float = 250.0
    momentum: float = 0.9


@dataclass(frozen=True)
class ClipAdapterConfig:
    reduction: int = 4
    ratio: float = 0.2
    lr: float = 0.01
    momentum: float = 0.0
    weight_decay: float = 0.0
    epochs: int = 20
    batch_size: int = 32
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


@dataclass(frozen=True)
class FullFinetuneMethodConfig(TrainingConfig):
    lr: float = 1e-5
    weight_decay: float = 0.01


@dataclass(frozen=True)
class CoOpMethodConfig(TrainingConfig):
    """CoOp's published biomedical recipe (BiomedCoOp's configs; Dassl's SGD defaults)."""
    n_ctx: int = 4
    ctx_init: str = "a photo of a"
    lr: float = 0.002
    weight_decay: float = 5e-4
    epochs: int | None = 100
    optimizer: str = "sgd"
    momentum: float = 0.9
    warmup_epochs: int = 1
    warmup_lr: float = 1e-5


@dataclass(frozen=True)
class KgCoOpMethodConfig(CoOpMethodConfig):
    """KgCoOp's published recipe: CoOp's, batch 128, and the weight w of its distance to the
    hand-written prompts (per dataset 1-10 in its few-shot configs; 8 in base-to-novel)."""
    batch_size: int = 128
    w: float = 8.0


@dataclass(frozen=True)
class CoCoOpMethodConfig(CoOpMethodConfig):
    """CoCoOp's published biomedical recipe (BiomedCoOp's CoCoOp configs, both settings):
    CoOp's optimiser at lr 0.001, batch 1, 10 epochs."""
    lr: float = 0.001
    batch_size: int = 1
    epochs: int | None = 10


@dataclass(frozen=True)
class BiomedCoOpMethodConfig(CoOpMethodConfig):
    """BiomedCoOp's published recipe (its configs): CoOp's at lr 0.0025 and batch 4, with the
    weights of its two description terms (per dataset in its configs) and the pruning
    threshold tau."""
    lr: float = 0.0025
    batch_size: int = 4
    sccm_lambda: float = 1.0
    kdsp_lambda: float = 1.0
    tau: float = 1.5


METHOD_CONFIGS = {"clip_svd": ClipSvdConfig, "clip_lora": LoRAMethodConfig,
                  "comp_lora": CompLoRAMethodConfig, "full_finetune": FullFinetuneMethodConfig,
                  "coop": CoOpMethodConfig, "cocoop": CoCoOpMethodConfig,
                  "kgcoop": KgCoOpMethodConfig, "biomedcoop": BiomedCoOpMethodConfig}
PROMPT_METHODS = ("coop", "cocoop", "kgcoop", "biomedcoop")


@dataclass(frozen=True)
class InterpretConfig:
    enabled: bool = True
    span_layers: Any = 2  # the last N vision blocks, or a list of block indices
    k: int = 5  # descriptions per head
    max_images: int = 512
    corpus: str | None = None  # None: the shipped corpus of medical image descriptions


@dataclass(frozen=True)
class TrackingConfig:
    uri: str | None = None  # None: sqlite under results/ (or MLFLOW_TRACKING_URI when set)
    enabled: bool = True


def runs_in(method: str, setting: str) -> bool:
    """Whether ``method`` can be scored in ``setting``: the linear probe and LP++ have weights
    only for the classes they were trained on, so they have no score for novel classes and sit
    out base-to-novel (as in the paper's base-to-novel tables)."""
    return not (method in CLOSED_SET_METHODS and setting == "base_to_novel")


@dataclass(frozen=True)
class StudyConfig:
    study: str
    datasets: tuple[DatasetConfig, ...]
    methods: tuple[str, ...]
    settings: tuple[str, ...]
    shots: tuple[int, ...]
    seeds: tuple[int, ...]
    model: ModelConfig
    clip_svd: ClipSvdConfig
    clip_lora: LoRAMethodConfig
    comp_lora: CompLoRAMethodConfig
    full_finetune: FullFinetuneMethodConfig
    coop: CoOpMethodConfig
    cocoop: CoCoOpMethodConfig
    kgcoop: KgCoOpMethodConfig
    biomedcoop: BiomedCoOpMethodConfig
    linear_probe: LinearProbeConfig
    tip_adapter: TipAdapterConfig
    tip_adapter_f: TipAdapterFConfig
    lp_pp: LPPlusPlusConfig
    clip_adapter: ClipAdapterConfig
    interpret: InterpretConfig
    tracking: TrackingConfig
    device: str = "auto"
    eval_batch_size: int = 64
    threads: int = 2

    def dataset(self, name: str) -> DatasetConfig:
        for dataset in self.datasets:
            if dataset.name == name:
                return dataset
        raise ConfigError(f"dataset '{name}' is not in the study's datasets "
                          f"({', '.join(d.name for d in self.datasets)})")

    def methods_of(self, setting: str) -> tuple[str, ...]:
        """The study's methods that run in ``setting`` (:func:`runs_in`)."""
        return tuple(m for m in self.methods if runs_in(m, setting))

    def settings_of(self, dataset: str) -> tuple[str, ...]:
        """The study's settings this dataset runs, in the study's order."""
        chosen = self.dataset(dataset).settings
        return tuple(s for s in self.settings if chosen is None or s in chosen)

    def training(self, method: str, dataset: str) -> TrainingConfig:
        """The method's training settings with the dataset's overrides applied."""
        base = getattr(self, method)
        override = {key: _tupled(value)
                    for key, value in self.dataset(dataset).overrides.get(method, {}).items()}
        if "epochs" in override:
            override.setdefault("iterations_per_shot", None)
        elif "iterations_per_shot" in override:
            override["epochs"] = None
        return replace(base, **override)

    def fingerprint(self) -> str:
        """A short hash of the resolved configuration, recorded with every run."""
        text = json.dumps(asdict(self), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:12]

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _tupled(value: Any) -> Any:
    return tuple(value) if isinstance(value, list) else value


def _build(cls, data: dict[str, Any]):
    return cls(**{key: _tupled(value) for key, value in data.items()})


def _load_schema() -> dict[str, Any]:
    return copy.deepcopy(_parsed_schema(os.stat(SCHEMA_PATH).st_mtime_ns))


@functools.lru_cache(maxsize=2)
def _parsed_schema(_mtime_ns: int) -> dict[str, Any]:
    """Parsed once per process and file version: a warm worker (clipsvd.worker) parses it
    before its jobs, and an edited schema is read again."""
    with open(SCHEMA_PATH, encoding="utf-8") as handle:
        return yaml.safe_load(handle)


def _key_path(error) -> str:
    parts = [str(p) for p in error.absolute_path]
    return ".".join(parts) if parts else "(top level)"


def validate(raw: Any, source: str) -> dict[str, Any]:
    """Validate against the JSON schema and fill its defaults; one line naming the key on error."""
    import jsonschema

    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: the study config must be a mapping of keys to values")
    schema = _load_schema()
    validator_cls = jsonschema.validators.validator_for(schema)
    validator = _with_defaults(validator_cls)(schema)
    data = copy.deepcopy(raw)
    errors = sorted(validator.iter_errors(data), key=lambda e: list(e.absolute_path))
    if errors:
        error = jsonschema.exceptions.best_match(errors)
        if error.validator == "additionalProperties":
            unknown = sorted(set(error.instance) - set(error.schema.get("properties", {})))
            prefix = _key_path(error) + "." if error.absolute_path else ""
            raise ConfigError(f"{source}: key '{prefix}{unknown[0]}': unknown key; check its "
                              "spelling against config/schema.yaml")
        raise ConfigError(f"{source}: key '{_key_path(error)}': {_describe(error)}")
    return data


# A number YAML 1.1 (PyYAML, Snakemake) reads as text: an exponent without a decimal point.
_EXPONENT_WITHOUT_POINT = re.compile(r"^[-+]?[0-9]+[eE][-+]?[0-9]+$")


def _describe(error) -> str:
    if error.validator == "enum":
        return f"{error.instance!r} is not one of {', '.join(map(str, error.validator_value))}"
    if (error.validator == "type" and isinstance(error.instance, str)
            and _EXPONENT_WITHOUT_POINT.match(error.instance)):
        mantissa, exponent = re.split("[eE]", error.instance)
        return (f"{error.instance!r} is read as text by YAML, not as a number; write it with a "
                f"decimal point ({mantissa}.0e{exponent}) or in plain decimals")
    return error.message


def _with_defaults(validator_cls):
    """A validator that also writes the schema's defaults into the instance (as Snakemake does)."""
    import jsonschema

    validate_properties = validator_cls.VALIDATORS["properties"]

    def set_defaults(validator, properties, instance, schema):
        if isinstance(instance, dict):
            for key, sub in properties.items():
                if "default" in sub and key not in instance:
                    instance[key] = copy.deepcopy(sub["default"])
        yield from validate_properties(validator, properties, instance, schema)

    return jsonschema.validators.extend(validator_cls, {"properties": set_defaults})


def check_crop_scale(scale, where: str) -> None:
    """Random resized crops take a (low, high) fraction of the image's area."""
    if not 0 < scale[0] <= scale[1] <= 1:
        raise ConfigError(f"{where}: need 0 < low <= high <= 1, got {list(scale)}")


def _check_grouping(dataset: dict[str, Any], where: str) -> None:
    """Column names and group settings that contradict each other or the format."""
    import re

    groups = dataset.get("groups", {})
    columns = dataset.get("columns", {})
    if "columns" in dataset and dataset["format"] != "csv":
        raise ConfigError(f"{where}.columns': only format 'csv' has columns, this dataset has "
                          f"format '{dataset['format']}'; remove the key or change the format")
    named = [columns.get(k, k) for k in ("path", "label", "split", "group", "class_name")]
    repeated = sorted({n for n in named if named.count(n) > 1})
    if repeated:
        raise ConfigError(f"{where}.columns': header '{repeated[0]}' is given for two fields; "
                          "every field needs its own column")
    pattern = groups.get("pattern")
    if pattern is not None:
        if dataset["format"] == "medmnist":
            raise ConfigError(f"{where}.groups.pattern': MedMNIST files hold no patient ids "
                              "to match; remove the key")
        try:
            compiled = re.compile(pattern)
        except re.error as exc:
            raise ConfigError(f"{where}.groups.pattern': not a valid regular expression "
                              f"({exc}); fix it (e.g. '(P[0-9]+)_' takes 'P017' from "
                              "'P017_left.png')") from None
        if compiled.groups > 1 and "group" not in compiled.groupindex:
            raise ConfigError(f"{where}.groups.pattern': {compiled.groups} capture groups; "
                              "use one, or name the one that holds the id (?P<group>...)")
        if "group" in columns:
            raise ConfigError(f"{where}.groups.pattern': the group is already the manifest's "
                              f"column '{columns['group']}' (columns.group); set one of them")
    if groups.get("independent") and (pattern is not None or "group" in columns):
        raise ConfigError(f"{where}.groups.independent': true says every image is its own "
                          "group, but a group column or pattern is set too; set one of them")


def _check_semantics(raw: dict[str, Any], data: dict[str, Any], source: str) -> None:
    names = [d["name"] for d in data["datasets"]]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ConfigError(f"{source}: key 'datasets': dataset name '{duplicates[0]}' appears twice; "
                          "give every dataset a unique name")
    for i, dataset in enumerate(data["datasets"]):
        if dataset["format"] == "csv" and not dataset.get("manifest"):
            raise ConfigError(f"{source}: key 'datasets.{i}.manifest': format 'csv' needs the "
                              "manifest file name (relative to root)")
        if dataset["format"] == "medmnist" and not dataset.get("medmnist"):
            raise ConfigError(f"{source}: key 'datasets.{i}.medmnist': format 'medmnist' needs "
                              "medmnist: {flag: <name>, size: 28|64|128|224}")
        for key, fmt in (("manifest", "csv"), ("medmnist", "medmnist"),
                         ("split_file", "coop_json"), ("image_dir", "coop_json")):
            if dataset.get(key) is not None and dataset["format"] != fmt:
                raise ConfigError(f"{source}: key 'datasets.{i}.{key}': only format '{fmt}' "
                                  f"uses it, this dataset has format '{dataset['format']}'; "
                                  "remove the key or change the format")
        _check_grouping(dataset, f"{source}: key 'datasets.{i}")
        demo_root = f"results/raw/{dataset['name']}"
        if dataset.get("demo") and dataset["root"].rstrip("/") != demo_root:
            raise ConfigError(f"{source}: key 'datasets.{i}.root': a demo dataset is generated at "
                              f"{demo_root}; set root to that")
        extra = sorted(set(dataset.get("settings") or ()) - set(data["settings"]))
        if extra:
            raise ConfigError(f"{source}: key 'datasets.{i}.settings': '{extra[0]}' is not one of "
                              f"the study's settings ({', '.join(data['settings'])}); add it "
                              "there or remove it here")
        for method, override in (dataset.get("overrides") or {}).items():
            unknown = sorted(set(override) - {f.name for f in fields(METHOD_CONFIGS[method])})
            if unknown:
                raise ConfigError(f"{source}: key 'datasets.{i}.overrides.{method}."
                                  f"{unknown[0]}': {method} has no such setting; remove it "
                                  "or move it to the method it belongs to")
            if override.get("crop_scale") is not None:
                check_crop_scale(override["crop_scale"],
                                 f"{source}: key 'datasets.{i}.overrides.{method}.crop_scale'")
        if "biomedcoop" in data["methods"]:
            from .descriptions import description_path, read_descriptions

            try:
                read_descriptions(description_path(dataset))
            except ConfigError as exc:
                raise ConfigError(f"{source}: key 'datasets.{i}.descriptions': {exc}") from None
        if dataset.get("exclude_pretrained_on"):
            from .data.holdout import packaged_hashes

            packaged_hashes(dataset["exclude_pretrained_on"],
                            f"{source}: key 'datasets.{i}.exclude_pretrained_on'")
            if dataset["format"] != "medmnist":
                raise ConfigError(f"{source}: key 'datasets.{i}.exclude_pretrained_on': works on "
                                  "format 'medmnist' (the files clipsvd's pretraining reads); "
                                  "remove the key")
        renamed = list((dataset.get("class_names") or {}).values())
        if len(set(renamed)) != len(renamed):
            twice = sorted({n for n in renamed if renamed.count(n) > 1})[0]
            raise ConfigError(f"{source}: key 'datasets.{i}.class_names': {twice!r} is given to "
                              "two classes; give every class its own name")
        for j, template in enumerate(dataset["templates"]):
            if template.count("{}") != 1:
                raise ConfigError(f"{source}: key 'datasets.{i}.templates.{j}': a template needs "
                                  f"exactly one '{{}}' where the class name goes, got {template!r}")
    for method in CLOSED_SET_METHODS:
        if method in data["methods"] and "few_shot" not in data["settings"]:
            raise ConfigError(f"{source}: key 'methods': {method} has weights only for the "
                              "classes it was trained on, so it runs in few_shot only and this "
                              f"study has no few_shot setting; remove {method} from methods or "
                              "add few_shot to settings")
    run = {s for d in data["datasets"] for s in (d.get("settings") or data["settings"])}
    for setting in data["settings"]:
        if setting not in run:
            # The report would promise that setting's tables and find no run to fill them.
            raise ConfigError(f"{source}: key 'settings': no dataset runs '{setting}' (every "
                              "dataset's settings leave it out); remove it here or add it to "
                              "a dataset's settings")
    for method in PROMPT_METHODS:
        prompt = data[method]
        if len(prompt["ctx_init"].split()) != prompt["n_ctx"]:
            raise ConfigError(f"{source}: key '{method}.n_ctx': {prompt['n_ctx']} context "
                              f"vectors, but ctx_init {prompt['ctx_init']!r} has "
                              f"{len(prompt['ctx_init'].split())} words (one vector each); make "
                              "them agree")
    for method, cls in METHOD_CONFIGS.items():
        given = raw.get(method) or {}
        section = data[method]
        if given.get("epochs") is not None and given.get("iterations_per_shot") is not None:
            raise ConfigError(f"{source}: key '{method}': set either 'epochs' or "
                              "'iterations_per_shot', not both")
        # The one the user gave wins over the method's default length.
        if given.get("epochs") is not None:
            section["iterations_per_shot"] = None
        elif given.get("iterations_per_shot") is not None:
            section["epochs"] = None
        else:
            section["epochs"], section["iterations_per_shot"] = cls.epochs, cls.iterations_per_shot
        check_crop_scale(section["crop_scale"], f"{source}: key '{method}.crop_scale'")


def from_dict(raw: Any, source: str = "<config>") -> StudyConfig:
    data = validate(raw, source)
    _check_semantics(raw, data, source)
    datasets = []
    for d in data["datasets"]:
        d = dict(d)
        d["preprocessing"] = _build(PreprocessingConfig, d.get("preprocessing", {}))
        d["split"] = _build(SplitConfig, d.get("split", {}))
        d["sampling"] = _build(SamplingConfig, d.get("sampling", {}))
        d["demo"] = _build(DemoConfig, d["demo"]) if d.get("demo") else None
        d["medmnist"] = _build(MedmnistConfig, d["medmnist"]) if d.get("medmnist") else None
        d["columns"] = _build(ColumnsConfig, d.get("columns", {}))
        d["groups"] = _build(GroupsConfig, d.get("groups", {}))
        datasets.append(_build(DatasetConfig, d))
    return StudyConfig(
        study=data["study"],
        datasets=tuple(datasets),
        methods=tuple(data["methods"]),
        settings=tuple(data["settings"]),
        shots=tuple(data["shots"]),
        seeds=tuple(data["seeds"]),
        model=_build(ModelConfig, data["model"]),
        clip_svd=_build(ClipSvdConfig, data["clip_svd"]),
        clip_lora=_build(LoRAMethodConfig, data["clip_lora"]),
        comp_lora=_build(CompLoRAMethodConfig, data["comp_lora"]),
        full_finetune=_build(FullFinetuneMethodConfig, data["full_finetune"]),
        coop=_build(CoOpMethodConfig, data["coop"]),
        cocoop=_build(CoCoOpMethodConfig, data["cocoop"]),
        kgcoop=_build(KgCoOpMethodConfig, data["kgcoop"]),
        biomedcoop=_build(BiomedCoOpMethodConfig, data["biomedcoop"]),
        linear_probe=_build(LinearProbeConfig, data["linear_probe"]),
        tip_adapter=_build(TipAdapterConfig, data["tip_adapter"]),
        tip_adapter_f=_build(TipAdapterFConfig, data["tip_adapter_f"]),
        lp_pp=_build(LPPlusPlusConfig, data["lp_pp"]),
        clip_adapter=_build(ClipAdapterConfig, data["clip_adapter"]),
        interpret=_build(InterpretConfig, data["interpret"]),
        tracking=_build(TrackingConfig, data["tracking"]),
        device=data["device"],
        eval_batch_size=data["eval_batch_size"],
        threads=data["threads"],
    )


def load(path: str | Path) -> StudyConfig:
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"{path}: config file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".json":
        # The resolved config the workflow writes for its jobs. Not through the YAML parser:
        # YAML 1.1 reads 1e-05, how JSON writes small numbers, as text.
        try:
            return from_dict(json.loads(text), str(path))
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}): "
                              "fix the syntax") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: fix the syntax") from None
    return from_dict(raw, str(path))


def typed_overrides(overrides: Any) -> Any:
    """`--config key=value` values as YAML would read them.

    Snakemake parses a value that is not a plain number with YAML's BaseLoader, which leaves
    every scalar inside it a string (`seeds=[3]` gives ['3'], `clip_svd={lr: 0.02}` gives
    {'lr': '0.02'}); such strings become numbers, booleans or null again, other strings stay.
    """
    if isinstance(overrides, dict):
        return {key: typed_overrides(value) for key, value in overrides.items()}
    if isinstance(overrides, list):
        return [typed_overrides(value) for value in overrides]
    if isinstance(overrides, str):
        for parse in (int, float):
            try:
                number = parse(overrides)
            except ValueError:
                continue
            return number if math.isfinite(number) else overrides
        try:  # as in a config file: true/false (and YAML 1.1's yes/no), null and ~
            value = yaml.safe_load(overrides)
        except yaml.YAMLError:
            return overrides
        return value if value is None or isinstance(value, bool) else overrides
    return overrides


def write_resolved(raw: dict[str, Any], path: str | Path) -> None:
    """Write the configuration a workflow run resolved (its config files merged with command-line
    overrides) for the jobs to read; rewritten only when it changed."""
    from .io import write_text

    text = json.dumps(raw, indent=2, sort_keys=True, default=str) + "\n"
    path = Path(path)
    if not path.exists() or path.read_text(encoding="utf-8") != text:
        write_text(path, text)

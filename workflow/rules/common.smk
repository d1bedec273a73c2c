# Helpers of the workflow: the validated study, path patterns and target lists.
# Paths come from clipsvd.layout so the package and the workflow spell them in one place.
import hashlib
import json
import re
import shlex
import sys
from dataclasses import asdict
from pathlib import Path

from snakemake.exceptions import WorkflowError

sys.path.insert(0, str(Path(workflow.basedir) / "src"))

from clipsvd import architectures, job_resources, layout, step_configs
from clipsvd.data.fingerprint import sampling_key, store_key
from clipsvd.data.listing import index_files, listing_digest
from clipsvd.errors import ClipsvdError
from clipsvd.config import (
    ADAPTER_METHODS,
    FEATURE_METHODS,
    METHODS,
    ConfigError,
    from_dict,
    typed_overrides,
    write_resolved,
)
from snakemake.utils import update_config


def _config_source():
    """The config files merged into this run's config, for error messages."""
    files = list(dict.fromkeys(str(f) for f in getattr(workflow, "configfiles", [])))
    if _COMMAND_LINE:
        files.append("--config")
    return " + ".join(files) if files else "config/config.yaml"


# `--config key=value` values typed as in a config file (Snakemake leaves nested ones strings).
_COMMAND_LINE = workflow.config_settings.overwrite_config or {}
update_config(config, typed_overrides(_COMMAND_LINE))

try:
    STUDY = from_dict(config, _config_source())
except ConfigError as error:
    sys.stderr.write(f"clipsvd: invalid config: {error}\n")
    sys.exit(1)

# Every rule calls the package's CLI; PYTHONPATH makes it importable in a conda env too.
# Quoted: the clone's path may hold spaces or non-ASCII characters.
CLIPSVD = f"PYTHONPATH={shlex.quote(str(Path(workflow.basedir, 'src')))}${{PYTHONPATH:+:$PYTHONPATH}} python -m clipsvd"
# Jobs read the configuration exactly as this run resolved it (files and --config overrides).
CONFIG_FILE = layout.STUDY_CONFIG.format(study=STUDY.study)
write_resolved(config, CONFIG_FILE)
CONDA_ENV = "../../envs/clipsvd.yaml"
NAME = "[A-Za-z0-9][A-Za-z0-9_-]*"


wildcard_constraints:
    study=NAME,
    dataset=NAME,
    method="|".join(METHODS),
    setting="few_shot|base_to_novel",
    shots=r"\d+",
    seed=r"\d+",


def _hash(obj):
    text = json.dumps(obj, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def training_hash(wildcards):
    d = STUDY.dataset(wildcards.dataset)
    settings = STUDY.training(wildcards.method, wildcards.dataset)
    return _hash([asdict(STUDY.model), asdict(settings), d.templates])


def evaluation_hash(wildcards):
    """The model, prompts and (for a method fitted on frozen features) its settings decide an
    evaluation."""
    d = STUDY.dataset(wildcards.dataset)
    method = wildcards.get("method")
    fitted = (
        asdict(getattr(STUDY, method))
        if method in FEATURE_METHODS and method != "zero_shot"
        else None
    )
    return _hash([asdict(STUDY.model), d.templates, fitted, STUDY.eval_batch_size])


# --- what the shared steps are keyed by (see clipsvd.layout) ------------------------------
MODEL_SLUG = layout.model_slug(
    STUDY.model.name, STUDY.model.pretrained, STUDY.model.init_seed
)
# The model's input size when its config says it offline (the store is prepared at it).
IMAGE_SIZE = architectures.image_size(STUDY.model.name)
STORE_KEYS = {
    d.name: store_key(d, IMAGE_SIZE, STUDY.model.name, STUDY.model.pretrained)
    for d in STUDY.datasets
}
SAMPLING_KEYS = {d.name: sampling_key(d.sampling) for d in STUDY.datasets}


wildcard_constraints:
    preparation="|".join(sorted(set(STORE_KEYS.values()))),
    sampling="|".join(sorted(set(SAMPLING_KEYS.values()))),
    model=re.escape(MODEL_SLUG),
    batch=str(STUDY.eval_batch_size),


def study_dataset(wildcards):
    """The dataset of a shared step's job, checked against the key in its path: a path asked
    for by hand with another study's key must not be filled with this study's settings.
    """
    name = wildcards.dataset
    for key, expected in (
        ("preparation", STORE_KEYS.get(name)),
        ("sampling", SAMPLING_KEYS.get(name)),
        ("model", MODEL_SLUG),
    ):
        if key in wildcards.keys() and wildcards[key] != expected:
            raise WorkflowError(
                f"{key} '{wildcards[key]}' of dataset '{name}' is not this study's "
                f"({expected}): run the study whose settings it is to make it"
            )
    return STUDY.dataset(name)


def store_dir(dataset):
    return layout.STORE.format(dataset=dataset, preparation=STORE_KEYS[dataset])


def store_files(wildcards):
    study_dataset(wildcards)
    store = store_dir(wildcards.dataset)
    return [f"{store}/{name}" for name in ("images.npy", "index.csv", "classes.json")]


def split_file(wildcards):
    study_dataset(wildcards)
    return layout.SPLIT.format(
        dataset=wildcards.dataset,
        preparation=STORE_KEYS[wildcards.dataset],
        sampling=SAMPLING_KEYS[wildcards.dataset],
        setting=wildcards.setting,
        shots=wildcards.shots,
        seed=wildcards.seed,
    )


def features_file(dataset):
    return layout.FEATURES.format(
        dataset=dataset,
        preparation=STORE_KEYS[dataset],
        model=MODEL_SLUG,
        batch=STUDY.eval_batch_size,
    )


def image_size_option(wildcards):
    """--image-size when the input size is known here, so the store is made at the size its
    key names; otherwise `clipsvd prepare` asks the model."""
    return f"--image-size {IMAGE_SIZE}" if IMAGE_SIZE is not None else ""


def prepare_inputs(wildcards):
    """A demo dataset is generated by the workflow (its folder is the input); a user's dataset
    is read where it is: the file that lists its samples (manifest, split file, npz) is the
    input, so editing it re-prepares the store."""
    d = study_dataset(wildcards)
    if d.demo is not None:
        return layout.RAW.format(dataset=wildcards.dataset)
    return index_files(d)


_LISTINGS = {}


def image_listing(wildcards):
    """A digest of the path, size and modification time of every image file the dataset's
    source names: adding, removing or rewriting one re-prepares the store (a param, so the
    files are stat'ed once per DAG, not declared one by one). A demo dataset has none: it is
    regenerated as a whole by its own rule."""
    d = STUDY.dataset(wildcards.dataset)
    if d.demo is not None:
        return ""
    if d.name not in _LISTINGS:
        _LISTINGS[d.name] = listing_digest(d)
    return _LISTINGS[d.name]


# The config file of each shared step's job (clipsvd.step_configs): keyed like the step's
# output and holding only what decides it, so every study hands the job the same file (a
# param: Snakemake reruns a job whose params change) and no study reruns another's step.
def write_shared_configs():
    """Write each shared step's config file; their paths by (pattern, dataset)."""
    paths = {}
    for d in STUDY.datasets:
        keys = {
            "dataset": d.name,
            "preparation": STORE_KEYS[d.name],
            "sampling": SAMPLING_KEYS[d.name],
            "model": MODEL_SLUG,
            "batch": STUDY.eval_batch_size,
        }
        configs = {
            layout.PREPARE_CONFIG: step_configs.prepare_config(STUDY, d, IMAGE_SIZE),
            layout.SAMPLE_CONFIG: step_configs.sample_config(d),
            layout.FEATURES_CONFIG: step_configs.features_config(STUDY, d),
        }
        if d.demo is not None:
            configs[layout.DEMO_CONFIG] = step_configs.demo_config(d)
            keys["demo"] = step_configs.key(configs[layout.DEMO_CONFIG])
        for pattern, step_config in configs.items():
            paths[pattern, d.name] = pattern.format(**keys)
            write_resolved(step_config, paths[pattern, d.name])
    return paths


SHARED_CONFIGS = write_shared_configs()


def shared_config(pattern):
    """The config file a shared step's job reads, for a rule's params."""

    def config_file(wildcards):
        study_dataset(wildcards)
        return SHARED_CONFIGS[pattern, wildcards.dataset]

    return config_file


def evaluation_inputs(wildcards):
    inputs = {
        "split": split_file(wildcards),
        "store": store_files(wildcards),
    }
    if wildcards.method in FEATURE_METHODS:
        inputs["features"] = features_file(wildcards.dataset)
    else:
        inputs["adapter"] = f"{layout.RUN.format(**wildcards)}/{layout.ADAPTER}"
    return inputs


def run_dir(dataset, method, setting, shots, seed):
    return layout.RUN.format(
        study=STUDY.study,
        dataset=dataset,
        method=method,
        setting=setting,
        shots=shots,
        seed=seed,
    )


def study_runs():
    """(dataset, method, setting, shots, seed) of every run; zero-shot once as K=0."""
    runs = []
    for d in STUDY.datasets:
        for setting in STUDY.settings_of(d.name):
            for method in STUDY.methods_of(setting):
                if method == "zero_shot":
                    runs.append(
                        (
                            d.name,
                            method,
                            setting,
                            layout.ZERO_SHOT_SHOTS,
                            layout.ZERO_SHOT_SEED,
                        )
                    )
                    continue
                for shots in STUDY.shots:
                    for seed in STUDY.seeds:
                        runs.append((d.name, method, setting, shots, seed))
    return runs


def study_run_dirs():
    return [run_dir(*run) for run in study_runs()]


def interpretation_outputs():
    """The interpretation of every CLIP-SVD run, which the report shows."""
    if not STUDY.interpret.enabled:
        return []
    return [
        f"{run_dir(*run)}/interpret/interpret.json"
        for run in study_runs()
        if run[1] == "clip_svd"
    ]


def confusion_outputs(ext):
    """The report's confusion figures ({study} left in, as in the report rule's other outputs):
    one per method of every (dataset, setting) the study runs."""
    return [
        path
        for setting in STUDY.settings
        for d in STUDY.datasets
        if setting in STUDY.settings_of(d.name)
        for path in layout.report_paths(
            layout.REPORT_CONFUSION,
            [setting],
            [d.name],
            STUDY.methods_of(setting),
            ext=ext,
        )
    ]


def report_outputs():
    folder = layout.REPORT.format(study=STUDY.study)
    return [
        f"{folder}/{name}"
        for name in (
            layout.REPORT_TABLE,
            layout.REPORT_TABLE_MD,
            layout.REPORT_PLOT,
            layout.REPORT_HTML,
        )
    ]


# --- what each job asks of its scheduler (clipsvd.job_resources, docs/slurm.md) -----------
ARCHITECTURE = architectures.describe(STUDY.model.name)
try:
    CAPS = job_resources.caps()
except ClipsvdError as error:
    sys.stderr.write(f"clipsvd: {error}\n")
    sys.exit(1)


def _class_count(input):
    """Classes a job's split trains or tests on; a default before the split exists."""
    split = input.get("split") if hasattr(input, "get") else None
    if split and Path(split).is_file():
        return len(json.loads(Path(split).read_text(encoding="utf-8"))["classes"])
    return job_resources.DEFAULT_CLASSES


def memory_inputs(step, wildcards, input=None):
    name = wildcards.get("dataset")
    dataset = STUDY.dataset(name) if name else None
    prompts = 0
    if dataset is not None and step in ("adapt", "evaluate", "interpret"):
        prompts = _class_count(input or {}) * len(dataset.templates)
    if step == "adapt":
        batch = STUDY.training(wildcards.method, name).batch_size
    else:
        batch = STUDY.eval_batch_size
    return job_resources.MemoryInputs(ARCHITECTURE, batch, prompts)


def job_memory(step):
    """A rule's mem_mb: follows the model and batch size, grows on a retry, never above the
    cap CLIPSVD_SLURM_MAX_MEM_MB."""

    def mem_mb(wildcards, input, threads, attempt):
        return job_resources.memory_request_mb(
            step,
            memory_inputs(step, wildcards, input),
            attempt,
            threads,
            CAPS.get("mem_mb"),
        )

    return mem_mb


def _check_memory_caps():
    """Stop before any job when a step of this study cannot fit the memory cap at all."""
    model = f"{STUDY.model.name}"
    for d in STUDY.datasets:
        smallest = 2 * len(d.templates)  # the fewest prompts a step can have
        checks = [
            ("adapt", STUDY.training(m, d.name).batch_size, smallest, f"{m}.batch_size")
            for m in STUDY.methods
            if m in ADAPTER_METHODS
        ]
        checks.append(("features", STUDY.eval_batch_size, 0, "eval_batch_size"))
        for step, batch, prompts, key in checks:
            inputs = job_resources.MemoryInputs(ARCHITECTURE, batch, prompts)
            line = job_resources.over_cap(
                step,
                inputs,
                CAPS.get("mem_mb"),
                f"{model}, {key} {batch}, dataset {d.name}",
            )
            if line:
                sys.stderr.write(f"clipsvd: {line}\n")
                sys.exit(1)


_check_memory_caps()


# --- SLURM: the plugin's state matching, failure messages and request checks ---------------
# Workarounds for snakemake-executor-plugin-slurm 2.8.0 (clipsvd.slurm, docs/slurm.md), in
# the process that submits and watches the jobs; the jobs themselves are left alone.
if workflow.is_main_process:
    from clipsvd import slurm as slurm_workarounds

    slurm_workarounds.install(sys.modules.get("snakemake_executor_plugin_slurm"))

"""Where every file of a study lives under results/: the contract between workflow steps.

The workflow (workflow/rules/common.smk) and the package format the same patterns, so a path
is spelled in one place only.
"""
from __future__ import annotations

from pathlib import Path

RESULTS = "results"
STUDY_CONFIG = RESULTS + "/studies/{study}.json"  # the resolved config the study's jobs read
# What several studies share is keyed by what decides it, never by a study: {preparation} is
# the store key (clipsvd.data.fingerprint.store_key: preparation settings, image size, demo
# settings), {sampling} the sampling key (sampling_key), {model} a model's slug and {batch}
# the batch size the features were computed with. A study that asks for the same thing finds
# the same file; one that asks for something else gets another path, so it never overwrites
# (or, when its job fails, deletes) a file another study uses.
RAW = RESULTS + "/raw/{dataset}"  # a generated demo dataset (its root in the config)
STORE = RESULTS + "/prepared/{dataset}/{preparation}"
FEATURES = RESULTS + "/features/{dataset}/{preparation}/{model}_batch{batch}.npy"  # store order
SPLIT = (RESULTS + "/splits/{dataset}/{preparation}/{sampling}/{setting}/"
         "shots{shots}_seed{seed}.json")
# The config file each shared step's job reads (clipsvd.step_configs), keyed like its output.
SHARED_CONFIGS = RESULTS + "/studies/shared"
DEMO_CONFIG = SHARED_CONFIGS + "/demo_data/{dataset}/{demo}.json"
PREPARE_CONFIG = SHARED_CONFIGS + "/prepare/{dataset}/{preparation}.json"
SAMPLE_CONFIG = SHARED_CONFIGS + "/sample/{dataset}/{preparation}/{sampling}.json"
FEATURES_CONFIG = SHARED_CONFIGS + "/features/{dataset}/{preparation}/{model}_batch{batch}.json"
RUN = RESULTS + "/runs/{study}/{dataset}/{method}/{setting}/shots{shots}/seed{seed}"
REPORT = RESULTS + "/report/{study}"
MLFLOW_DB = RESULTS + "/mlflow.db"
MLFLOW_ARTIFACTS = RESULTS + "/mlartifacts"

# Files inside a run folder.
ADAPTER = "adapter.safetensors"
PROBE = "probe.safetensors"  # the linear probe's weights
FEATURE_ADAPTER = "feature_adapter.safetensors"  # what a feature-side baseline fitted
TRAIN_SUMMARY = "train.json"
TRAIN_HISTORY = "train_history.csv"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
CONFUSION = "confusion_matrix.png"  # the run's confusion matrix (an MLflow artifact too)
TRACKING_RECORD = "mlflow.json"
RUN_RECORD = "run.json"  # identity (MLflow tags) and provenance of the run

# Files of the report folder.
REPORT_TABLE = "accuracy.csv"
REPORT_TABLE_MD = "accuracy.md"
REPORT_FIGURE = "accuracy_vs_shots.{ext}"  # ext: each of FIGURE_FORMATS
REPORT_PLOT = REPORT_FIGURE.format(ext="png")

# Zero-shot has no support set and no randomness: one run per dataset and setting.
ZERO_SHOT_SHOTS = 0
ZERO_SHOT_SEED = 0


def model_slug(name: str, pretrained: str | None, init_seed: int) -> str:
    """A file-name-safe id of a model and its weights, for per-model caches."""
    import hashlib
    import re

    weights = pretrained or f"random{init_seed}"
    readable = re.sub(r"[^A-Za-z0-9_.-]+", "_", f"{name}-{Path(weights).name}").strip("_")[:60]
    digest = hashlib.sha256(f"{name}|{weights}".encode()).hexdigest()[:8]
    return f"{readable}-{digest}"

# More files of the report folder (issue 7). {setting}: few_shot or base_to_novel.
REPORT_RUNS = "runs.csv"  # one row per run: identity and scalar metrics
REPORT_SUMMARY = "summary.csv"  # per dataset: every scalar metric, mean/std over seeds
REPORT_SUMMARY_AVERAGE = "summary_average.csv"  # averaged over datasets
REPORT_SETTING_TABLE = "{setting}.{ext}"  # ext csv | md | tex: per dataset and the average
REPORT_METRICS_TABLE = "{setting}_metrics.{ext}"  # every metric, md | tex
REPORT_COMPARISON = "comparison.{ext}"  # paired CLIP-SVD comparison, csv | md | tex
REPORT_CONFUSION = "confusion_{dataset}_{setting}_{method}.{ext}"  # one method per figure
REPORT_RELIABILITY = "reliability_{setting}.{ext}"
REPORT_PLOT_VECTOR = REPORT_FIGURE.format(ext="svg")
FIGURE_FORMATS = ("svg", "png")  # every report figure: vector, and PNG at 300 dpi
REPORT_DATASETS = "datasets.{ext}"  # images, groups and classes per split; csv | md | tex
REPORT_PER_CLASS = "per_class.{ext}"  # precision, recall, F1 per class; csv | md | tex
REPORT_BOOTSTRAP = "test_bootstrap.csv"  # test-set bootstrap CIs and paired differences
REPORT_PROVENANCE = "provenance.json"
REPORT_HTML = "report.html"


def report_paths(pattern: str, settings=(None,), datasets=(None,), methods=(None,),
                 exts=(None,), **fields) -> list[str]:
    """Report-folder paths of a file pattern per setting, dataset, method and extension (the
    product of those given), {study} left in."""
    return [f"{REPORT}/" + pattern.format(**{"setting": s, "dataset": d, "method": m, "ext": e,
                                             **fields})
            for s in settings for d in datasets for m in methods for e in exts]

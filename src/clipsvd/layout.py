"""Where every file of a study lives under results/: the contract between workflow steps.

The workflow (workflow/rules/common.smk) and the package format the same patterns, so a path
is spelled in one place only.
"""
from __future__ import annotations

from pathlib import Path

RESULTS = "results"
RAW = RESULTS + "/raw/{dataset}"
STORE = RESULTS + "/prepared/{dataset}"
SPLIT = RESULTS + "/splits/{dataset}/{setting}/shots{shots}_seed{seed}.json"
RUN = RESULTS + "/runs/{study}/{dataset}/{method}/{setting}/shots{shots}/seed{seed}"
REPORT = RESULTS + "/report/{study}"
MLFLOW_DB = RESULTS + "/mlflow.db"
MLFLOW_ARTIFACTS = RESULTS + "/mlartifacts"

# Files inside a run folder.
ADAPTER = "adapter.safetensors"
TRAIN_SUMMARY = "train.json"
TRAIN_HISTORY = "train_history.csv"
METRICS = "metrics.json"
PREDICTIONS = "predictions.csv"
TRACKING_RECORD = "mlflow.json"
RUN_RECORD = "run.json"  # identity (MLflow tags) and provenance of the run

# Files of the report folder.
REPORT_TABLE = "accuracy.csv"
REPORT_TABLE_MD = "accuracy.md"
REPORT_PLOT = "accuracy_vs_shots.png"

# Zero-shot has no support set and no randomness: one run per dataset and setting.
ZERO_SHOT_SHOTS = 0
ZERO_SHOT_SEED = 0


def run_dir(study: str, dataset: str, method: str, setting: str, shots: int, seed: int) -> Path:
    return Path(RUN.format(study=study, dataset=dataset, method=method, setting=setting,
                           shots=shots, seed=seed))

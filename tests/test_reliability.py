"""Reliability (issue 11): bad input gets one clear line, faults lose nothing, reruns reproduce.

Cases already proven elsewhere are listed in docs/reliability.md with their tests; this file
holds the rest. Everything runs on a tiny demo dataset in a folder whose name has a space and
non-ASCII characters, so every command below also proves that such paths work.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from clipsvd import config, layout
from clipsvd.config import DemoConfig
from clipsvd.data.demo import generate_demo_dataset
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sampling import sample_split, write_split
from clipsvd.data.store import PreparedStore
from clipsvd.errors import ConfigError, DataError, GpuMemoryError
from clipsvd.evaluate import evaluate
from clipsvd.features import compute_features
from clipsvd.models import load_model
from clipsvd.train import adapt

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
IMAGE_SIZE = 64  # tiny-clip's input size


def study(root: Path, **changes) -> dict:
    """A one-dataset study on the toy data, short enough to train in a fraction of a second."""
    raw = {"study": "rel",
           "datasets": [{"name": "toy", "format": "csv", "root": str(root / "raw"),
                         "manifest": "manifest.csv", "templates": ["a {} scan"]}],
           "methods": ["linear_probe", "clip_svd"], "shots": [2], "seeds": [1], "device": "cpu",
           "clip_svd": {"epochs": 3, "batch_size": 8},
           "clip_lora": {"epochs": 3, "batch_size": 8},
           "comp_lora": {"epochs": 3, "batch_size": 8},
           "tracking": {"enabled": False}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


def write_study(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw, allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """raw/ (demo scans), store/ (prepared), split.json (K=2, seed 1), study.yaml."""
    root = tmp_path_factory.mktemp("reliability") / "toy data ü"
    generate_demo_dataset(root / "raw", DemoConfig(per_class=20, image_size=32, seed=0))
    cfg = config.from_dict(study(root))
    prepare_dataset(cfg.dataset("toy"), root / "store", IMAGE_SIZE)
    split = sample_split(PreparedStore.open(root / "store"), "few_shot", 2, 1,
                         cfg.dataset("toy").sampling)
    write_split(root / "split.json", split)
    write_study(root / "study.yaml", study(root))
    return root


def error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"clipsvd {command}: error:")]


def one_error(code: int, stderr: str, command: str) -> str:
    """The CLI failed with exit 2 and exactly one error line (no traceback); return it."""
    assert code == 2, stderr
    assert "Traceback" not in stderr, stderr
    lines = error_lines(stderr, command)
    assert len(lines) == 1, stderr
    return lines[0]


@pytest.fixture
def one_thread():
    """Bit-identical CPU results need the same number of threads in every run compared."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ----------------------------------------------------------------------------- bad input


def test_malformed_yaml_via_the_cli(toy, tmp_path, run_cli):
    bad = tmp_path / "bad study.yaml"
    bad.write_text("study: x\ndatasets: [\n  {name: a\n", encoding="utf-8")
    line = one_error(*run_cli("validate", "--config", bad), "validate")
    assert f"{bad}: not valid YAML (line" in line and "fix the syntax" in line


def test_malformed_yaml_via_snakemake(tmp_path):
    """Snakemake parses --configfile itself: it stops before the Snakefile runs, writes nothing,
    and its message says the config file is invalid (`clipsvd validate` gives the line)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("study: x\ndatasets: [\n", encoding="utf-8")
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "--configfile", str(bad)],
        capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Config file is not valid JSON or YAML" in result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr
    assert not (tmp_path / "results").exists()


@pytest.mark.parametrize("change, key", [
    ({"shots": "three"}, "shots"),
    ({"seeds": [1.5]}, "seeds.0"),
    ({"clip_svd": {"lr": "fast"}}, "clip_svd.lr"),
    ({"clip_svd": {"batch_size": 0}}, "clip_svd.batch_size"),
    ({"eval_batch_size": -4}, "eval_batch_size"),
    ({"device": "tpu"}, "device"),
])
def test_schema_violation_via_the_cli(toy, tmp_path, run_cli, change, key):
    path = write_study(tmp_path / "s.yaml", study(toy, **change))
    line = one_error(*run_cli("validate", "--config", path), "validate")
    assert f"{path}: key '{key}'" in line


@pytest.fixture
def no_weight_loading(monkeypatch):
    """Every way the package builds a model or reads weights raises: whatever `clipsvd validate`
    does, it does without them (proved by what it touches, not by how long it takes)."""
    import huggingface_hub
    import open_clip
    import safetensors
    import safetensors.torch

    from clipsvd import models

    def refuse(*args, **kwargs):
        raise AssertionError("validate built a model or read weights")

    for module, name in ((open_clip, "create_model"), (open_clip, "create_model_and_transforms"),
                         (open_clip, "create_model_from_pretrained"),
                         (open_clip, "load_checkpoint"), (torch, "load"),
                         (safetensors.torch, "load_file"), (safetensors.torch, "load"),
                         (safetensors, "safe_open"), (huggingface_hub, "hf_hub_download"),
                         (huggingface_hub, "snapshot_download"), (models, "load_model")):
        monkeypatch.setattr(module, name, refuse)


@pytest.mark.parametrize("model, key, named", [
    ({"name": "ViT-Q-99"}, "model.name", "unknown model name 'ViT-Q-99'"),
    ({"name": "ViT-B-16", "pretrained": "not_a_tag"}, "model.pretrained", "openai"),
    ({"name": "tiny-clip", "pretrained": "/nowhere/weights.safetensors"}, "model.pretrained",
     "not found"),
])
def test_validate_checks_the_model_without_loading_weights(toy, tmp_path, run_cli, model, key,
                                                            named, no_weight_loading):
    """Catches validate building the model (load_model) to check its name or weights."""
    path = write_study(tmp_path / "s.yaml", study(toy, model=model))
    line = one_error(*run_cli("validate", "--config", path), "validate")
    assert f"key '{key}'" in line and named in line


@pytest.mark.parametrize("model", [
    {"name": "ViT-B-16", "pretrained": "openai"},
    {"name": "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"},
    {"name": "tiny-clip", "pretrained": "CHECKPOINT"},
])
def test_validate_accepts_a_good_model_without_loading_it(toy, tmp_path, run_cli, model,
                                                          no_weight_loading):
    """A study naming weights this machine does not have (OpenAI CLIP, BiomedCLIP) or a
    checkpoint file whose tensors would not even fit the model validates, with every loader
    raising: validate reads a checkpoint's header (a corrupt file is refused,
    test_checkpoints.py), never its tensors. Catches validate loading the model,
    downloading, or reading the checkpoint's weights."""
    if model.get("pretrained") == "CHECKPOINT":
        from safetensors.torch import save_file

        checkpoint = tmp_path / "weights.safetensors"
        save_file({"not.a.weight.of.the.model": torch.zeros(3)}, str(checkpoint))
        model = {**model, "pretrained": str(checkpoint)}
    path = write_study(tmp_path / "s.yaml", study(toy, model=model))
    code, err = run_cli("validate", "--config", path)
    assert code == 0, err


def test_unknown_model_stops_prepare_before_any_output(toy, tmp_path, run_cli):
    path = write_study(tmp_path / "s.yaml", study(toy, model={"name": "ViT-Q-99"}))
    out = tmp_path / "store"
    line = one_error(*run_cli("prepare", "--config", path, "--dataset", "toy", "--out", out),
                     "prepare")
    assert "unknown model name 'ViT-Q-99'" in line
    assert not out.exists()


def test_missing_dataset_root_via_the_cli(toy, tmp_path, run_cli):
    raw = study(toy)
    raw["datasets"] = [{"name": "toy", "format": "folder", "root": str(tmp_path / "nowhere")}]
    path = write_study(tmp_path / "s.yaml", raw)
    out = tmp_path / "store"
    line = one_error(*run_cli("prepare", "--config", path, "--dataset", "toy", "--out", out),
                     "prepare")
    assert str(tmp_path / "nowhere") in line and "root folder not found" in line
    assert not out.exists() and not list(tmp_path.glob(".store*"))


@pytest.fixture(scope="module")
def trained(toy, tmp_path_factory) -> Path:
    """A CLIP-SVD adapter trained on tiny-clip with init_seed 0."""
    run = tmp_path_factory.mktemp("trained") / "run"
    adapt(config.from_dict(study(toy)), "toy", "clip_svd", toy / "split.json", toy / "store", run)
    return run


@pytest.mark.parametrize("model, named", [
    ({"init_seed": 5}, "was trained on base model"),
    ({"name": "tiny-timm-clip"}, "load the same model and pretrained weights"),
])
def test_adapter_of_another_model_via_the_cli(toy, trained, tmp_path, run_cli, model, named):
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(trained / layout.ADAPTER, run / layout.ADAPTER)
    path = write_study(tmp_path / "s.yaml", study(toy, model=model))
    code, err = run_cli("evaluate", "--config", path, "--dataset", "toy", "--method", "clip_svd",
                        "--split", toy / "split.json", "--store", toy / "store", "--run-dir", run)
    line = one_error(code, err, "evaluate")
    assert str(run / layout.ADAPTER) in line and named in line
    assert sorted(p.name for p in run.iterdir()) == [layout.ADAPTER]  # no metrics, no run.json


def test_linear_probe_on_a_base_to_novel_split_is_refused(toy, tmp_path, run_cli):
    """The workflow never schedules the probe in base-to-novel, but a target asked for by hand
    could: its weights cover only the base classes, so novel images would be scored as base
    ones. Refused before any output. Caught when tried: without the check the probe fit on the
    split's train images and wrote metrics."""
    raw = study(toy, settings=["few_shot", "base_to_novel"])
    write_split(tmp_path / "b2n.json", sample_split(
        PreparedStore.open(toy / "store"), "base_to_novel", 2, 1,
        config.from_dict(raw).dataset("toy").sampling))
    path = write_study(tmp_path / "s.yaml", raw)
    compute_features(config.from_dict(raw), toy / "store", tmp_path / "features.npy")
    run = tmp_path / "run"
    code, err = run_cli("evaluate", "--config", path, "--dataset", "toy", "--method",
                        "linear_probe", "--split", tmp_path / "b2n.json", "--store", toy / "store",
                        "--features", tmp_path / "features.npy", "--run-dir", run)
    line = one_error(code, err, "evaluate")
    assert line.endswith(f"{tmp_path / 'b2n.json'}: linear_probe does not run in the "
                         "base_to_novel setting (it has weights only for the classes it was "
                         "trained on); evaluate it on a few_shot split"), line
    assert not run.exists()


def test_non_finite_loss_stops_at_the_step_and_keeps_the_log(toy, tmp_path, run_cli):
    path = write_study(tmp_path / "s.yaml", study(toy, clip_svd={"lr": 1e30, "epochs": 20}))
    run = tmp_path / "run"
    log_file = run / "adapt.log"
    code, err = run_cli("adapt", "--config", path, "--dataset", "toy", "--method", "clip_svd",
                        "--split", toy / "split.json", "--store", toy / "store", "--run-dir", run,
                        "--log", log_file)
    line = one_error(code, err, "adapt")
    assert re.search(r"loss became (nan|inf|-inf) at step \d+ of 20", line), line
    assert "lower the learning rate (clip_svd.lr" in line
    log_text = log_file.read_text(encoding="utf-8")
    assert "trainable parameters" in log_text and line in log_text
    assert sorted(p.name for p in run.iterdir()) == ["adapt.log"]


def test_gpu_out_of_memory_names_the_batch_size(toy, trained, tmp_path, monkeypatch, run_cli):
    """CUDA OOM is simulated (no GPU needed): training names `<method>.batch_size`,
    evaluation and features `eval_batch_size`."""
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    path = write_study(tmp_path / "s.yaml", study(toy))
    common = ("--config", path, "--dataset", "toy", "--split", toy / "split.json",
              "--store", toy / "store")
    monkeypatch.setattr("clipsvd.train.encode_images", out_of_memory)
    line = one_error(*run_cli("adapt", *common, "--method", "clip_svd", "--run-dir",
                              tmp_path / "a"), "adapt")
    assert "out of GPU memory" in line and "clip_svd.batch_size = 8" in line
    assert "lower clip_svd.batch_size (e.g. to 4)" in line
    assert not (tmp_path / "a" / layout.ADAPTER).exists()

    cfg = config.from_dict(study(toy))
    monkeypatch.setattr("clipsvd.evaluate.encode_images", out_of_memory)
    monkeypatch.setattr("clipsvd.features.encode_images", out_of_memory)
    run = tmp_path / "b"
    run.mkdir()
    shutil.copy(trained / layout.ADAPTER, run / layout.ADAPTER)
    with pytest.raises(GpuMemoryError, match="lower eval_batch_size"):
        evaluate(cfg, "toy", "clip_svd", toy / "split.json", toy / "store", run)
    assert not (run / layout.METRICS).exists()
    with pytest.raises(GpuMemoryError, match="eval_batch_size = 64"):
        compute_features(cfg, toy / "store", tmp_path / "features.npy")
    assert not (tmp_path / "features.npy").exists()


def test_overridden_batch_size_is_named_where_it_is_set(toy, tmp_path, monkeypatch):
    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory")

    raw = study(toy)
    raw["datasets"][0]["overrides"] = {"clip_svd": {"batch_size": 6}}
    monkeypatch.setattr("clipsvd.train.encode_images", out_of_memory)
    with pytest.raises(GpuMemoryError, match=r"datasets\[toy\]\.overrides\.clip_svd\.batch_size = 6"):
        adapt(config.from_dict(raw), "toy", "clip_svd", toy / "split.json", toy / "store",
              tmp_path / "run")


# ----------------------------------------------------------------------------- faults


def _cli_process(args: list, log_file: Path) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(SRC)}
    return subprocess.Popen([sys.executable, "-m", "clipsvd", *map(str, args), "--log",
                             str(log_file)], env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, what: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}:\n"
                                 f"{proc.stderr.read()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.05)


def _kill(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGKILL)
    proc.wait(30)
    assert proc.returncode == -signal.SIGKILL, "the job finished before it was killed"


KILL_EPOCHS = 150  # one step per epoch (8 support images, batch 8): a few seconds of training


@pytest.mark.slow
def test_killed_training_leaves_nothing_and_the_rerun_matches(toy, tmp_path, one_thread):
    raw = study(toy, clip_svd={"epochs": KILL_EPOCHS})
    path = write_study(tmp_path / "s.yaml", raw)
    run = tmp_path / "run"
    args = ["adapt", "--config", path, "--dataset", "toy", "--method", "clip_svd", "--split",
            toy / "split.json", "--store", toy / "store", "--run-dir", run, "--threads", "1"]
    log_file = run / "adapt.log"
    proc = _cli_process(args, log_file)
    _wait_for(lambda: log_file.exists() and f"step 1/{KILL_EPOCHS}" in log_file.read_text(),
              proc, "the first step")
    _kill(proc)
    # Only the log: nothing Snakemake could take for a finished output (hidden temporary
    # files would be ignored too, and a rerun overwrites them).
    assert [p.name for p in run.iterdir() if not p.name.startswith(".")] == ["adapt.log"]

    rerun = _cli_process(args, log_file)
    assert rerun.wait(300) == 0, rerun.stderr.read()
    reference = tmp_path / "reference"
    adapt(config.from_dict(raw), "toy", "clip_svd", toy / "split.json", toy / "store", reference)
    for name in (layout.ADAPTER, layout.TRAIN_HISTORY):
        assert (run / name).read_bytes() == (reference / name).read_bytes(), name
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.slow
def test_killed_preparation_leaves_no_store(tmp_path):
    root = tmp_path / "big data"
    generate_demo_dataset(root / "raw", DemoConfig(per_class=150, image_size=96, seed=1))
    raw = study(root)
    path = write_study(tmp_path / "s.yaml", raw)
    out = tmp_path / "prepared" / "big"
    proc = _cli_process(["prepare", "--config", path, "--dataset", "toy", "--out", out,
                         "--image-size", "224"], tmp_path / "prepare.log")

    def writing() -> bool:
        return any(p.is_dir() and (p / "images.npy").exists()
                   for p in out.parent.glob(f".{out.name}.*.tmp"))

    _wait_for(writing, proc, "the store's images being written")
    _kill(proc)
    assert not out.exists()  # no images.npy or index.csv a later job could read
    with pytest.raises(DataError, match="clipsvd prepare"):
        PreparedStore.open(out)
    leftovers = list(out.parent.glob(f".{out.name}.*.tmp"))
    assert leftovers  # a hidden temporary folder, which nothing reads

    prepare_dataset(config.from_dict(raw).dataset("toy"), out, 32)
    store = PreparedStore.open(out)
    assert len(store.images) == len(store.index) == 600
    assert sorted(p.name for p in out.parent.iterdir() if not p.name.startswith(".")) == ["big"]


@pytest.mark.slow
def test_clone_and_study_paths_with_spaces_and_non_ascii(tmp_path):
    """The rules' shell commands quote the clone's path and every config-derived path."""
    clone = tmp_path / "my clone ü"
    clone.mkdir()
    shutil.copy(ROOT / "Snakefile", clone / "Snakefile")
    shutil.copytree(ROOT / "workflow", clone / "workflow")
    shutil.copytree(ROOT / "envs", clone / "envs")
    shutil.copytree(ROOT / "src", clone / "src", ignore=shutil.ignore_patterns("__pycache__"))
    work = tmp_path / "work dir é"
    shutil.copytree(ROOT / "config", work / "config")
    cfg = yaml.safe_load((work / "config" / "config.yaml").read_text())
    cfg["datasets"][0]["demo"]["per_class"] = 4
    (work / "config" / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("PYTHONPATH", None)
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(clone / "Snakefile"),
         "--directory", str(work), "--cores", "1", "results/raw/demo_scans"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (work / "results" / "raw" / "demo_scans" / "manifest.csv").is_file()


# ----------------------------------------------------------------------------- reproducibility


METHODS = ("clip_svd", "clip_lora", "comp_lora", "linear_probe")
TIMING = {"train_seconds", "steps_per_second", "data_seconds", "loader_fraction",
          "eval_seconds", "peak_memory_mb", "started_at", "finished_at"}  # measured, not computed


def _study_once(toy: Path, out: Path) -> dict[str, Path]:
    cfg = config.from_dict(study(toy, methods=list(METHODS)))
    features = out / "features.npy"
    compute_features(cfg, toy / "store", features)
    runs = {}
    for method in METHODS:
        run = out / method
        if method != "linear_probe":
            adapt(cfg, "toy", method, toy / "split.json", toy / "store", run)
        evaluate(cfg, "toy", method, toy / "split.json", toy / "store", run,
                 features_path=features)
        runs[method] = run
    return runs


def _without(data: dict, keys: set[str]) -> dict:
    return {k: v for k, v in data.items() if k not in keys}


@pytest.fixture(scope="module")
def two_runs(toy, tmp_path_factory) -> tuple[dict[str, Path], dict[str, Path]]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        root = tmp_path_factory.mktemp("repro")
        return _study_once(toy, root / "first"), _study_once(toy, root / "second")
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("method", METHODS)
def test_same_config_and_seed_give_bit_identical_results(two_runs, method):
    first, second = two_runs[0][method], two_runs[1][method]
    weights = layout.PROBE if method == "linear_probe" else layout.ADAPTER
    exact = [weights, layout.PREDICTIONS]
    if method != "linear_probe":
        exact.append(layout.TRAIN_HISTORY)
    for name in exact:
        assert (first / name).read_bytes() == (second / name).read_bytes(), name
    for name in (layout.METRICS, layout.TRAIN_SUMMARY):
        if (first / name).exists():
            a, b = (json.loads((run / name).read_text()) for run in (first, second))
            assert _without(a, TIMING) == _without(b, TIMING), name
    a, b = (json.loads((run / layout.RUN_RECORD).read_text()) for run in (first, second))
    git = {"git_commit", "git_dirty"}  # others may commit or edit while the test runs
    assert _without(a["provenance"], git) == _without(b["provenance"], git)


def test_run_records_its_provenance(toy, two_runs):
    run = two_runs[0]["clip_svd"]
    provenance = json.loads((run / layout.RUN_RECORD).read_text())["provenance"]
    cfg = config.from_dict(study(toy, methods=list(METHODS)))
    if (ROOT / ".git").exists():
        assert re.fullmatch(r"[0-9a-f]{40}", provenance["git_commit"])
        assert isinstance(provenance["git_dirty"], bool)
    for package in ("python", "clipsvd", "torch", "open_clip_torch", "numpy", "monai"):
        assert provenance["packages"][package], package
    assert provenance["config_hash"] == cfg.fingerprint()
    assert provenance["model_fingerprint"] == load_model("tiny-clip").fingerprint
    split_hash = hashlib.sha256((toy / "split.json").read_bytes()).hexdigest()
    assert provenance["split_sha256"] == split_hash
    assert provenance["device"] == "cpu"
    summary = json.loads((run / layout.TRAIN_SUMMARY).read_text())
    assert summary["model_fingerprint"] == provenance["model_fingerprint"]
    assert summary["config"]["config_hash"] == cfg.fingerprint()


def test_training_never_decodes_image_files(toy, tmp_path, monkeypatch):
    """Batches come from the prepared uint8 store in memory; the summary says how much of the
    training time building them took."""
    import nibabel
    import PIL.Image
    import pydicom

    def refuse(*args, **kwargs):
        raise AssertionError("an image file was decoded during training")

    for module, name in ((PIL.Image, "open"), (pydicom, "dcmread"), (nibabel, "load")):
        monkeypatch.setattr(module, name, refuse)
    cfg = config.from_dict(study(toy))
    summary = adapt(cfg, "toy", "clip_svd", toy / "split.json", toy / "store", tmp_path / "run")
    assert 0 < summary["data_seconds"] < summary["train_seconds"]
    # both times are rounded to 1 ms, the fraction is computed before rounding
    assert summary["loader_fraction"] * summary["train_seconds"] == pytest.approx(
        summary["data_seconds"], abs=1.5e-3)


def test_run_folders_hold_no_pickles(two_runs):
    allowed = {".safetensors", ".json", ".csv", ".log", ".tsv", ".png", ".md"}
    for run in two_runs[0].values():
        for path in run.rglob("*"):
            assert path.is_dir() or path.suffix in allowed, path


# ----------------------------------------------------------------------------- security


def _python_sources() -> list[tuple[Path, ast.AST]]:
    return [(p, ast.parse(p.read_text(encoding="utf-8"))) for p in sorted(SRC.rglob("*.py"))]


def _keyword(call: ast.Call, name: str):
    for keyword in call.keywords:
        if keyword.arg == name:
            return keyword.value
    return None


def test_no_unsafe_deserialisation_in_the_package():
    """torch.load only with weights_only=True, no allow_pickle=True, no pickle modules."""
    unsafe_modules = {"pickle", "cPickle", "dill", "cloudpickle", "joblib", "shelve", "marshal"}
    problems = []
    for path, tree in _python_sources():
        where = path.relative_to(ROOT)
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                problems += [f"{where}: imports {a.name}" for a in node.names
                             if a.name.split(".")[0] in unsafe_modules]
            elif isinstance(node, ast.ImportFrom) and node.module:
                if node.module.split(".")[0] in unsafe_modules:
                    problems.append(f"{where}: imports from {node.module}")
            elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
                name = node.func.attr
                if name == "load" and isinstance(node.func.value, ast.Name) \
                        and node.func.value.id == "torch":
                    value = _keyword(node, "weights_only")
                    if not (isinstance(value, ast.Constant) and value.value is True):
                        problems.append(f"{where}:{node.lineno}: torch.load without "
                                        "weights_only=True")
                if name in ("read_pickle", "to_pickle"):
                    problems.append(f"{where}:{node.lineno}: {name}")
                value = _keyword(node, "allow_pickle")
                if isinstance(value, ast.Constant) and value.value is True:
                    problems.append(f"{where}:{node.lineno}: allow_pickle=True")
    assert not problems, problems


def test_mlflow_instructions_bind_to_localhost():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    commands = [line for line in readme.splitlines()  # command lines, not prose
                if re.match(r"\s*(\S*/)?(mlflow (ui|server)|clipsvd ui)\b", line)]
    assert commands
    for line in commands:  # clipsvd ui's default host is checked below
        assert "--host 127.0.0.1" in line or ("clipsvd ui" in line and "--host" not in line), line
    assert "0.0.0.0" not in readme
    for path, tree in _python_sources():
        text = path.read_text(encoding="utf-8")
        assert "0.0.0.0" not in text, path
        assert not re.search(r"mlflow.{0,20}\b(ui|server)\b.{0,40}--host", text), path
    # `clipsvd ui`, the one server the package starts, listens on this machine unless told.
    from clipsvd import cli

    ui = cli.build_parser()._subparsers._group_actions[0].choices["ui"]
    assert ui.get_default("host") == "127.0.0.1"


def _name_pattern_of_the_workflow() -> str:
    text = (ROOT / "workflow" / "rules" / "common.smk").read_text(encoding="utf-8")
    return re.search(r'^NAME = "(.+)"$', text, re.M).group(1)


@pytest.mark.parametrize("name", ["two words", "a/b", "../up", "x;rm -rf ~", "$(id)", "a'b",
                                  "-flag", "na\u00efve", "a\nb", "a" * 65, ""])
@pytest.mark.parametrize("where", ["study", "dataset"])
def test_unsafe_study_and_dataset_names_are_refused(name, where):
    raw = {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "data"}]}
    if where == "study":
        raw["study"] = name
    else:
        raw["datasets"][0]["name"] = name
    key = "study" if where == "study" else "datasets.0.name"
    with pytest.raises(ConfigError, match=re.escape(f"key '{key}'")):
        config.from_dict(raw, "s.yaml")
    if len(name) <= 64:  # the length limit is the schema's alone
        assert not re.fullmatch(_name_pattern_of_the_workflow(), name)


def test_schema_and_wildcard_constraints_agree():
    schema = yaml.safe_load(config.SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema["$defs"]["name"]["pattern"] == f"^{_name_pattern_of_the_workflow()}$"
    assert schema["properties"]["methods"]["items"]["enum"] == list(config.METHODS)
    for accepted in ("demo_scans", "BTMRI", "chest-xray-2"):
        config.from_dict({"study": accepted, "datasets": [
            {"name": accepted, "format": "folder", "root": "data"}]})


SAFE_UNQUOTED = {"params.cli", "threads", "params.features",  # features: shlex.quote'd itself
                 "params.image_size"}  # "--image-size <int>" or nothing


def test_shell_commands_quote_config_derived_values():
    """Every placeholder of a rule's shell command is quoted (`:q`), except the wildcards
    (constrained to safe names), the thread count and values quoted in Python."""
    problems = []
    for path in sorted((ROOT / "workflow" / "rules").glob("*.smk")):
        text = path.read_text(encoding="utf-8")
        for block in re.findall(r"^    shell:\n((?:        .*\n)+)", text, re.M):
            for placeholder in re.findall(r"(?<!\{)\{([^{}]+)\}(?!\})", block):
                name, _, fmt = placeholder.partition(":")
                if fmt == "q" or name in SAFE_UNQUOTED or name.startswith("wildcards."):
                    continue
                problems.append(f"{path.name}: {{{placeholder}}}")
    assert not problems, problems
    adapt_rules = (ROOT / "workflow" / "rules" / "adapt.smk").read_text(encoding="utf-8")
    assert "shlex.quote(input.features)" in adapt_rules
    common = (ROOT / "workflow" / "rules" / "common.smk").read_text(encoding="utf-8")
    assert "shlex.quote(str(Path(workflow.basedir, 'src')))" in common


def test_slurm_profile_retries_with_more_memory(monkeypatch):
    """A retry asks for more memory and time than the first attempt, and never more than the
    caps (CLIPSVD_SLURM_MAX_MEM_MB, CLIPSVD_SLURM_MAX_RUNTIME). Breaks it catches: a retry
    that asks the same (an out-of-memory job fails again) or more than the cap (sbatch
    refuses it, or it pends for ever)."""
    from clipsvd import architectures, job_resources

    profile = yaml.safe_load((ROOT / "workflow" / "profiles" / "slurm" / "config.yaml")
                             .read_text(encoding="utf-8"))
    assert profile["retries"] >= 1

    def runtime(expression, attempt):
        return eval(os.path.expandvars(str(expression)), {"__builtins__": __builtins__},
                    {"attempt": attempt})

    inputs = job_resources.MemoryInputs(architectures.describe("ViT-B-16"), 32, 10)
    first = job_resources.memory_request_mb("adapt", inputs, 1)
    assert job_resources.memory_request_mb("adapt", inputs, 2) > first
    assert job_resources.memory_request_mb("adapt", inputs, 2, cap=first + 500) == first + 500
    for rule in ("prepare", "adapt", "evaluate"):
        expression = profile["set-resources"][rule]["runtime"]
        assert runtime(expression, 2) > runtime(expression, 1), rule
        monkeypatch.setenv("CLIPSVD_SLURM_MAX_RUNTIME", str(runtime(expression, 1)))
        assert runtime(expression, 2) == runtime(expression, 1), rule
        monkeypatch.delenv("CLIPSVD_SLURM_MAX_RUNTIME")
    for rule, expression in profile["set-threads"].items():
        monkeypatch.setenv("CLIPSVD_SLURM_MAX_THREADS", "2")
        assert runtime(expression, 1) == 2, rule
        monkeypatch.delenv("CLIPSVD_SLURM_MAX_THREADS")
        assert runtime(expression, 1) >= 4, rule

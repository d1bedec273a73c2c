"""Job resources (issue 17): memory that follows the model and the batch size, caps set once,
and a request that cannot fit refused before any job with one line."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clipsvd import architectures, config, job_resources
from clipsvd.errors import ClipsvdError
from conftest import workflow_env

ROOT = Path(__file__).resolve().parents[1]
BIOMEDCLIP = "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"


def test_architectures_are_read_without_building_the_models():
    tiny = architectures.describe("tiny-clip")
    assert (tiny.image_size, tiny.vision_layers, tiny.vision_width, tiny.vision_tokens) == \
        (64, 2, 64, 65)
    vit = architectures.describe("ViT-B-16")
    assert (vit.image_size, vit.vision_layers, vit.vision_width, vit.vision_tokens,
            vit.text_layers, vit.text_width, vit.text_context) == (224, 12, 768, 197, 12, 512, 77)
    bert = architectures.describe("tiny-biomedclip")  # timm trunk + a BERT config on disk
    assert (bert.vision_width, bert.text_layers, bert.text_width) == (64, 2, 64)
    assert architectures.describe(BIOMEDCLIP).text_context == 256
    assert architectures.describe("ViT-L-14").vision_tokens == 257
    assert architectures.image_size("hf-hub:someone/unknown") is None
    code = ("import sys, clipsvd.architectures as a; a.describe('ViT-B-16'); "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**workflow_env(), "PYTHONPATH": str(ROOT / "src")})
    assert out.stdout.strip() == "False", out.stderr  # cheap enough for the DAG


def test_memory_follows_the_model_and_the_batch_size():
    """Breaks it catches: a fixed memory per rule (as before issue 17)."""
    def mb(model, batch, prompts=4, step="adapt"):
        return job_resources.memory_request_mb(
            step, job_resources.MemoryInputs(architectures.describe(model), batch, prompts))

    assert mb("tiny-clip", 32) < mb("ViT-B-16", 1) < mb("ViT-B-16", 32)
    assert mb("ViT-B-16", 4) < mb(BIOMEDCLIP, 4)
    assert mb(BIOMEDCLIP, 4, prompts=4) < mb(BIOMEDCLIP, 4, prompts=16)
    assert mb("ViT-B-16", 64, step="features") < mb("ViT-B-16", 32)
    assert all(mb(m, 8) % job_resources.ROUND_MB == 0 for m in ("tiny-clip", "ViT-B-16"))
    # An architecture that cannot be read offline is costed as BiomedCLIP, not as nothing.
    unknown = job_resources.memory_request_mb("adapt", job_resources.MemoryInputs(None, 4, 4))
    assert unknown == mb(BIOMEDCLIP, 4)


def test_caps_are_read_once_and_a_bad_one_names_its_variable():
    assert job_resources.caps({"CLIPSVD_SLURM_MAX_MEM_MB": "20000",
                               "CLIPSVD_SLURM_MAX_THREADS": " 8 "}) == {"mem_mb": 20000,
                                                                       "threads": 8}
    for bad in ("20G", "0", "-5"):
        with pytest.raises(ClipsvdError, match="^CLIPSVD_SLURM_MAX_MEM_MB="):
            job_resources.caps({"CLIPSVD_SLURM_MAX_MEM_MB": bad})


def test_retries_grow_but_never_past_the_cap():
    inputs = job_resources.MemoryInputs(architectures.describe(BIOMEDCLIP), 32, 8)
    first = job_resources.memory_request_mb("adapt", inputs, 1)
    assert job_resources.memory_request_mb("adapt", inputs, 2) == pytest.approx(2 * first, 500)
    cap = first + 1000
    assert [job_resources.memory_request_mb("adapt", inputs, a, cap=cap) for a in (1, 2, 3)] \
        == [first, cap, cap]
    # A cap below the request but above the estimate: the request is the cap.
    estimate = job_resources.estimate_mb("adapt", inputs)
    assert job_resources.memory_request_mb("adapt", inputs, 1, cap=int(estimate) + 1) == \
        int(estimate) + 1


def test_a_study_that_cannot_fit_the_memory_cap_stops_before_any_job(tmp_path):
    """CLIPSVD_SLURM_MAX_MEM_MB below what adaptation needs: one line naming the step, the
    model, the batch-size key and the cap, exit 1, no job (not even a dry run's).

    Break it catches: without the check, the workflow would submit jobs capped below their
    need, which the cluster kills for memory after they waited in the queue."""
    shutil.copytree(ROOT / "config", tmp_path / "config")
    study = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    model = study["model"]["name"]
    # The first adapter of the study is the one named (all of them train at batch 32 here).
    first = next(m for m in study["methods"] if m in config.ADAPTER_METHODS)
    need = job_resources.estimate_mb("adapt", job_resources.MemoryInputs(
        architectures.describe(model), 32, 2))
    env = {**workflow_env(), "CLIPSVD_SLURM_MAX_MEM_MB": str(int(need) - 100)}
    result = subprocess.run(
        [str(Path(sys.executable).with_name("snakemake")), "-s", str(ROOT / "Snakefile"),
         "--directory", str(tmp_path), "--cores", "1", "-n"],
        capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 1
    lines = [line for line in result.stderr.splitlines() if line.startswith("clipsvd:")]
    assert lines == [f"clipsvd: adapt needs about {need:.0f} MB ({model}, {first}.batch_size "
                     f"32, dataset demo_scans), more than CLIPSVD_SLURM_MAX_MEM_MB="
                     f"{int(need) - 100}: lower the batch size, or raise the cap if the "
                     "cluster's nodes have more memory"], result.stderr[-2000:]
    assert "Job stats" not in result.stdout + result.stderr


def test_measured_peaks_are_below_the_requests():
    """Every peak in benchmarks/job_memory.json (measured on the CPU) is below the memory the
    workflow asks for that point, and not far below (the fit is not a blanket).

    Break it catches: coefficients edited without remeasuring, or a model that grew."""
    points = json.loads((ROOT / "benchmarks" / "job_memory.json").read_text())["points"]
    assert {p["model"] for p in points} >= {"tiny-clip", "ViT-B-16", "biomedclip-size"}
    for point in points:
        name = BIOMEDCLIP if point["model"] == "biomedclip-size" else point["model"]
        inputs = job_resources.MemoryInputs(architectures.describe(name), point["batch"],
                                            point["prompts"] if point["step"] != "features"
                                            else 0)
        request = job_resources.memory_request_mb(point["step"], inputs)
        assert point["peak_mb"] < request < 2 * point["peak_mb"] + 2000, point


@pytest.mark.slow
def test_the_default_study_jobs_stayed_below_their_requests(own_process_study):
    """Every compute job of the default study (its model, K = 1 runs, each job in its own
    interpreter) peaked below the memory the workflow asked for it (Snakemake's benchmark
    files record each job's max_rss).

    Break it catches: an estimate below what the jobs use (they would be killed for memory on
    a cluster that enforces its requests)."""
    import csv

    study = yaml.safe_load((own_process_study / "config" / "config.yaml").read_text())
    model = architectures.describe(study["model"]["name"])
    results = own_process_study / "results"
    prompts = 4 * len(study["datasets"][0]["templates"])  # the demo's four classes
    checked = {}
    for tsv in sorted(results.rglob("*.tsv")):
        rel = tsv.relative_to(results).as_posix()
        if not rel.startswith(("benchmarks/", "runs/")):  # mlartifacts/ holds copies
            continue
        step = (rel.split("/")[1] if rel.startswith("benchmarks/")
                else tsv.name.split(".")[0])
        if step == "adapt":
            method = tsv.parts[-5]
            inputs = job_resources.MemoryInputs(model, study[method].get("batch_size", 32),
                                                prompts)
        elif step in ("evaluate", "features", "interpret"):
            inputs = job_resources.MemoryInputs(model, study.get("eval_batch_size", 64),
                                                0 if step == "features" else prompts)
        elif step == "prepare":
            inputs = job_resources.MemoryInputs(None)
        else:
            continue
        request = job_resources.memory_request_mb(step, inputs, threads=study["threads"])
        with open(tsv) as handle:
            peak = float(next(csv.DictReader(handle, delimiter="\t"))["max_rss"])
        assert peak < request, (rel, peak, request)
        checked[step] = checked.get(step, 0) + 1
    assert set(checked) == {"prepare", "features", "adapt", "evaluate", "interpret"}, checked

"""The first thing to run when a GPU is lent: clipsvd's CUDA path, end to end, in ten minutes.

    .venv/bin/python benchmarks/gpu_first_run.py                  # the first visible GPU
    .venv/bin/python benchmarks/gpu_first_run.py --device cuda:1 --keep --work /tmp/first-run
    .venv/bin/python benchmarks/gpu_first_run.py --rehearse-on-cpu   # the same course, no GPU

Until a GPU is lent, nothing of the CUDA path has run; this script checks it in one go and
prints each check as PASS / FAIL / SKIP with the figures it compared:

1. the device: its name, compute capability, bf16 support, free memory;
2. CUDA streams per seed: after ``seed_everything`` and ``load_model``, seeds 1 and 2 draw
   different CUDA random numbers and seed 1 again draws the same (LoRA dropout on a GPU);
3. float32 logits under bf16 autocast (``clipsvd.train.class_logits``), against float32;
4. the batched training crops on the GPU against the same crops on the CPU;
5. an out-of-memory error of the GPU is recognised and named (``clipsvd.devices``);
6. a tiny study through Snakemake (the demo data and model, the default study's methods,
   K = 1, seeds 1 and 2, interpretation and report) with ``device: cuda`` and
   ``precision: bf16``, and in its results: every GPU job (features, adapt, evaluate,
   interpret) claimed a GPU slot and computed on the GPU, training ran in bf16 with finite
   losses, every run was evaluated, the report was built;
7. the step benchmark (``benchmarks/adaptation_step.py``, ViT-B/16, batch 32, bf16, every
   method, then fp16 with its gradient scaler for CLIP-SVD), whose table it prints.

It stops itself within ``--budget`` seconds (default 600): whatever did not finish is a FAIL.
``--rehearse-on-cpu`` runs the same course without a GPU (the study on one fake GPU slot, the
benchmark on tiny-clip) and marks the checks that need CUDA as SKIP; the test suite runs it.

Exit status: 0 every check that ran passed; 1 a check failed; 2 nothing was run (no CUDA GPU,
or a bad argument), with one line saying why.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "benchmarks"))
SNAKEMAKE = str(Path(sys.executable).with_name("snakemake"))
GPU_RULE_LOGS = ("adapt.log", "evaluate.log", "interpret.log")
BENCHMARK_VARIANTS = "full,factored,clipsvd,clip_lora,comp_lora"


def refuse(message: str) -> None:
    print(f"gpu_first_run: {message}", file=sys.stderr)
    raise SystemExit(2)


class Checks:
    """Collects and prints PASS / FAIL / SKIP lines; keeps the time budget."""

    def __init__(self, budget: float):
        self.started = time.monotonic()
        self.budget = budget
        self.results: list[tuple[str, str]] = []

    def left(self) -> float:
        return self.budget - (time.monotonic() - self.started)

    def report(self, status: str, name: str, detail: str) -> bool:
        self.results.append((status, name))
        print(f"{status:<5} {name}: {detail}", flush=True)
        return status != "FAIL"

    def check(self, name: str, passed: bool, detail: str) -> bool:
        return self.report("PASS" if passed else "FAIL", name, detail)

    def skip(self, name: str, why: str) -> None:
        self.report("SKIP", name, why)

    def failed(self) -> list[str]:
        return [name for status, name in self.results if status == "FAIL"]


def run(command: list[str], checks: Checks, env: dict | None = None, cwd: Path = ROOT,
        reserve: float = 0.0) -> tuple[int | None, str, float]:
    """(exit status or None when the budget ran out, output, seconds)."""
    timeout = checks.left() - reserve
    if timeout <= 5:
        return None, "not started: the time budget is spent", 0.0
    started = time.monotonic()
    try:
        done = subprocess.run(command, capture_output=True, text=True, cwd=cwd, timeout=timeout,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **(env or {})})
    except subprocess.TimeoutExpired as expired:
        out = (expired.stdout or b"").decode(errors="replace") if isinstance(
            expired.stdout, bytes) else (expired.stdout or "")
        return None, out + "\n(stopped: the time budget ran out)", time.monotonic() - started
    return done.returncode, done.stdout + done.stderr, time.monotonic() - started


# ---------------------------------------------------------------------------------------------
# In-process checks of the CUDA path


def check_device(checks: Checks, device) -> None:
    import torch

    props = torch.cuda.get_device_properties(device)
    free, total = torch.cuda.mem_get_info(device)
    bf16 = torch.cuda.is_bf16_supported()
    checks.check("device", bf16, f"{device} is {props.name!r}, compute capability "
                 f"{props.major}.{props.minor}, bf16 {'supported' if bf16 else 'NOT supported'}, "
                 f"{free / 2**30:.1f} of {total / 2**30:.1f} GiB free, "
                 f"{torch.cuda.device_count()} GPU(s) visible; torch {torch.__version__}, "
                 f"CUDA {torch.version.cuda}")


def check_cuda_streams(checks: Checks, device) -> None:
    import torch

    from clipsvd.models import load_model
    from clipsvd.seeding import seed_everything

    draws = []
    for seed in (1, 2, 1):
        seed_everything(seed)
        load_model("tiny-clip", None, init_seed=0)
        draws.append(torch.rand(6, device=device).cpu())
    differ, repeat = not torch.equal(draws[0], draws[1]), torch.equal(draws[0], draws[2])
    checks.check("CUDA streams per seed", differ and repeat,
                 f"seeds 1 and 2 draw {'different' if differ else 'THE SAME'} CUDA numbers "
                 f"after load_model; seed 1 again draws {'the same' if repeat else 'OTHERS'}")


def check_logits(checks: Checks, device) -> None:
    import torch
    import torch.nn.functional as F

    from clipsvd.train import class_logits

    generator = torch.Generator(device=device).manual_seed(0)
    image = F.normalize(torch.randn(256, 512, device=device, generator=generator), dim=-1)
    text = F.normalize(torch.randn(10, 512, device=device, generator=generator), dim=-1)
    scale = torch.tensor(100.0, device=device)
    reference = scale * image @ text.t()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        logits = class_logits(scale, image, text)
        plain = scale * image @ text.t()
    error = float((logits - reference).abs().max())
    plain_error = float((plain.float() - reference).abs().max())
    checks.check("float32 logits under bf16 autocast",
                 logits.dtype == torch.float32 and error <= 1e-4,
                 f"class_logits gives {logits.dtype}, largest difference from float32 "
                 f"{error:.2e} (the bf16 product would be off by {plain_error:.3f})")


def check_crops(checks: Checks, device) -> None:
    import torch

    from clipsvd.data.augment import random_resized_crops

    images = torch.randint(0, 256, (12, 3, 512, 384), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    sizes = torch.tensor([[512, 384]] * 6 + [[384, 300]] * 6)
    indices = torch.randperm(12, generator=torch.Generator().manual_seed(1))
    crops = [random_resized_crops(images.to(where), sizes, indices, 224, (0.08, 1.0), True,
                                  torch.Generator().manual_seed(2)).cpu()
             for where in ("cpu", device)]
    error = float((crops[0] - crops[1]).abs().max())
    checks.check("batched crops on the GPU", error < 1e-4,
                 f"12 crops of 224 px on {device} and on the CPU differ by at most {error:.2e}")


def check_out_of_memory(checks: Checks, device) -> None:
    import torch

    from clipsvd.devices import batch_size_on_oom
    from clipsvd.errors import GpuMemoryError

    total = torch.cuda.get_device_properties(device).total_memory
    try:
        with batch_size_on_oom("clip_svd.batch_size", 32, device):
            torch.empty(2 * total, dtype=torch.uint8, device=device)
    except GpuMemoryError as error:
        checks.check("out of GPU memory named", "clip_svd.batch_size" in str(error),
                     f"an allocation of twice the GPU's memory gives: {error}")
    except Exception as error:  # noqa: BLE001 - what arrived instead is the finding
        checks.check("out of GPU memory named", False,
                     f"unrecognised {type(error).__name__}: {str(error).splitlines()[0][:200]}")
    else:
        checks.check("out of GPU memory named", False, "the allocation did not fail")
    torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------
# The tiny study


def write_study(work: Path, device: str) -> dict:
    from clipsvd.config import ADAPTER_METHODS

    shutil.copytree(ROOT / "config", work / "config", dirs_exist_ok=True)
    path = work / "config" / "config.yaml"
    study = yaml.safe_load(path.read_text())
    study.update(study="first_run", device=device, shots=[1], seeds=[1, 2], threads=2)
    for method in study["methods"]:
        if method in ADAPTER_METHODS:
            study.setdefault(method, {})["precision"] = "bf16"
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return study


def check_study(checks: Checks, work: Path, rehearsal: bool, gpus: int) -> None:
    study = write_study(work, "auto" if rehearsal else "cuda")
    env = {"CLIPSVD_GPU_POLL_SECONDS": "1", "CLIPSVD_FAKE_GPUS": "1" if rehearsal else "",
           "CLIPSVD_WORKER_DIR": str(work / "workers")}  # a worker of its own, started cold
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    command = [SNAKEMAKE, "-s", str(ROOT / "Snakefile"), "--directory", str(work),
               "--cores", str(os.cpu_count() or 2), "--resources", f"gpu={gpus}"]
    code, out, seconds = run(command, checks, env=env, reserve=150)
    jobs = re.findall(r"(\d+) of (\d+) steps \(100%\) done", out)
    if not checks.check("tiny study", code == 0,
                        f"snakemake {'finished' if code == 0 else 'FAILED'} in {seconds:.0f} s"
                        f"{f' ({jobs[-1][1]} jobs)' if jobs else ''} with device: "
                        f"{study['device']}, precision bf16, shots {study['shots']}, seeds "
                        f"{study['seeds']}"):
        print(out[-4000:])
        return
    # The jobs are forked from a warm worker (clipsvd.worker) that never touched CUDA; each
    # child initialises CUDA itself. The checks below then show CUDA works in forked jobs.
    from clipsvd.worker import jobs_served

    forked = len(jobs_served(work / "workers", work))
    checks.check("jobs forked from a warm worker", forked >= (int(jobs[-1][1]) - 2 if jobs else 1),
                 f"{forked} of {jobs[-1][1] if jobs else '?'} jobs")
    results = work / "results"
    logs = sorted((results / "runs").rglob("*.log")) + sorted(
        (results / "logs" / "features").rglob("*.log"))
    gpu_logs = [p for p in logs if p.name in GPU_RULE_LOGS or "features" in p.parts]
    unclaimed = [p for p in gpu_logs if "claimed GPU slot" not in p.read_text()]
    where = "fake GPUs" if rehearsal else "device: cuda:"
    off_gpu = [p for p in gpu_logs if where not in p.read_text()]
    checks.check("every GPU job claimed a slot", gpu_logs and not unclaimed and not off_gpu,
                 f"{len(gpu_logs)} job logs (features, adapt, evaluate, interpret); "
                 f"without a claim: {[str(p.relative_to(work)) for p in unclaimed][:3] or 'none'}"
                 f"; not on the {'fake ' if rehearsal else ''}GPU: "
                 f"{[str(p.relative_to(work)) for p in off_gpu][:3] or 'none'}")
    summaries = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("train.json"))]
    adapt_logs = [p.read_text() for p in sorted((results / "runs").rglob("adapt.log"))]
    fell_back = sum("is GPU only" in text for text in adapt_logs)
    finite = all(s["final_loss"] is not None and math.isfinite(s["final_loss"]) for s in summaries)
    devices_used = sorted({s["device"] for s in summaries})
    bf16 = fell_back == len(adapt_logs) if rehearsal else fell_back == 0
    memory = [s.get("peak_memory_mb", 0) for s in summaries]
    checks.check("training", bool(summaries) and finite and bf16 and (
        rehearsal or all(d.startswith("cuda") for d in devices_used)),
        f"{len(summaries)} adapt runs on {devices_used}, "
        f"{'bf16 fell back to fp32 (CPU) as it must' if rehearsal else 'bf16 autocast'} in "
        f"{len(adapt_logs) - fell_back if not rehearsal else fell_back} of {len(adapt_logs)}, "
        f"final losses finite: {finite}, peak memory up to {max(memory or [0]):.0f} MB, "
        f"steps/s {[s['steps_per_second'] for s in summaries]}")
    metrics = sorted((results / "runs").rglob("metrics.json"))
    accuracies = [json.loads(p.read_text())["accuracy"] for p in metrics]
    records = [json.loads(p.read_text()) for p in sorted((results / "runs").rglob("run.json"))]
    eval_devices = sorted({r["provenance"]["device"] for r in records})
    runs = 1 + (len(study["methods"]) - 1) * len(study["shots"]) * len(study["seeds"])
    checks.check("evaluation", len(metrics) == runs and all(0 <= a <= 1 for a in accuracies)
                 and (rehearsal or all(d.startswith("cuda") for d in eval_devices)),
                 f"{len(metrics)} of {runs} runs evaluated on {eval_devices}, accuracies "
                 f"{[round(a, 3) for a in accuracies]}")
    report = results / "report" / study["study"] / "report.html"
    checks.check("report", report.is_file() and report.stat().st_size > 1000,
                 f"{report.relative_to(work)} ({report.stat().st_size if report.is_file() else 0}"
                 " bytes)")


# ---------------------------------------------------------------------------------------------
# The step benchmark


def check_benchmark(checks: Checks, device: str, rehearsal: bool, peak: float | None) -> None:
    import adaptation_step

    script = str(ROOT / "benchmarks" / "adaptation_step.py")
    common = [sys.executable, script, "--quick", "--device", device]
    if rehearsal:
        common += ["--model", "tiny-clip", "--batch", "4"]
    elif peak:
        common += ["--peak-tflops", str(peak)]
    else:
        import torch

        name = torch.cuda.get_device_name(torch.device(device))
        if adaptation_step.peak_tflops(name, "bf16") is None:
            checks.skip("fraction of peak", f"{name!r} is not in adaptation_step.PEAK_TFLOPS; "
                        "rerun with --peak-tflops <its dense bf16 TFLOP/s>")
            common += ["--no-peak"]
    runs = [("step benchmark", "bf16" if not rehearsal else "fp32", BENCHMARK_VARIANTS),
            ("step benchmark, fp16 with a gradient scaler", "fp16", "clipsvd")]
    for name, precision, variants in runs:
        if rehearsal and precision == "fp16":
            checks.skip(name, "fp16 autocast is a GPU check")
            continue
        code, out, seconds = run(common + ["--precision", precision, "--variants", variants],
                                 checks)
        table = [line for line in out.splitlines() if line.startswith(("|", "- ", "machine:",
                                                                       "measuring"))]
        if checks.check(name, code == 0, f"{variants} at {precision} in {seconds:.0f} s"):
            print("\n".join(table), flush=True)
        else:
            print(out[-3000:], flush=True)


# ---------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="the GPU to check: cuda or cuda:N")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds for the whole course (default 600; 3600 when rehearsing)")
    parser.add_argument("--work", type=Path, help="folder of the tiny study (default: temporary)")
    parser.add_argument("--keep", action="store_true", help="keep the tiny study's folder")
    parser.add_argument("--peak-tflops", type=float,
                        help="the GPU's dense bf16 peak, when adaptation_step.py does not know it")
    parser.add_argument("--rehearse-on-cpu", action="store_true",
                        help="run the same course without a GPU (fake slot, tiny-clip benchmark)")
    args = parser.parse_args()
    rehearsal = args.rehearse_on_cpu
    if not rehearsal and not re.fullmatch(r"cuda(:\d+)?", args.device):
        refuse(f"--device must name a CUDA device (cuda or cuda:N), got {args.device!r}")
    budget = args.budget if args.budget is not None else (3600.0 if rehearsal else 600.0)
    if budget < 120:
        refuse(f"--budget {budget:g}: give at least 120 seconds")

    import torch

    if not rehearsal and not torch.cuda.is_available():
        refuse("no CUDA GPU is visible to this process (torch.cuda.is_available() is False); "
               "run it where a GPU is lent, or use --rehearse-on-cpu to rehearse the course")
    if not rehearsal:
        index = torch.device(args.device).index or 0
        if index >= torch.cuda.device_count():
            refuse(f"--device {args.device}: only {torch.cuda.device_count()} GPU(s) visible")
    device = "cpu" if rehearsal else args.device
    checks = Checks(budget)
    print(f"clipsvd first GPU run: {'rehearsal on the CPU' if rehearsal else device}, "
          f"budget {budget:.0f} s", flush=True)
    if rehearsal:
        for name in ("device", "CUDA streams per seed", "float32 logits under bf16 autocast",
                     "batched crops on the GPU", "out of GPU memory named"):
            checks.skip(name, "needs CUDA")
    else:
        torch.cuda.set_device(torch.device(device))
        for step in (check_device, check_cuda_streams, check_logits, check_crops,
                     check_out_of_memory):
            try:
                step(checks, torch.device(device))
            except Exception as error:  # noqa: BLE001 - report and go on to the next check
                checks.check(step.__name__.replace("check_", ""), False,
                             f"{type(error).__name__}: {str(error).splitlines()[0][:300]}")
    work = args.work or Path(tempfile.mkdtemp(prefix="clipsvd-first-run-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        gpus = 1 if rehearsal else torch.cuda.device_count()
        check_study(checks, work, rehearsal, gpus)
        check_benchmark(checks, device, rehearsal, args.peak_tflops)
    finally:
        if not args.keep and args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    elapsed = time.monotonic() - checks.started
    failed = checks.failed()
    ran = sum(status != "SKIP" for status, _ in checks.results)
    print(f"{ran - len(failed)} of {ran} checks passed ({len(checks.results) - ran} skipped) in "
          f"{elapsed:.0f} s{'; FAILED: ' + ', '.join(failed) if failed else ''}", flush=True)
    raise SystemExit(1 if failed else 0)


if __name__ == "__main__":
    main()

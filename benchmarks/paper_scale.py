"""Benchmark 8: a timed model of the paper's few-shot BiomedCLIP study: what share of its wall
time goes to training and evaluation, with every job in its own interpreter and with warm
workers.

    .venv/bin/python benchmarks/run_setup.py --json benchmarks/run_setup.json
    .venv/bin/python benchmarks/paper_scale.py [--figures benchmarks/run_setup.json]

The job list is the study's own (`snakemake -n` of config/studies/biomedclip_few_shot.yaml:
10 datasets × 5 methods × K ∈ {1, 2, 4, 8, 16} × 3 seeds). The times are measured ones, on
this machine, for a BiomedCLIP-size model (benchmarks/run_setup.py, warm SVD cache):
- a run's training: clipsvd's step count for each dataset, method and K (the study's recipe,
  ``clipsvd.train.total_steps``, support set K × classes) × the steady step time scaled by the
  images in a step (min(batch size, support set) / the measured batch);
- its evaluation: the test set × the measured seconds per image of an evaluation forward pass;
- every job's fixed cost (run_setup's: start-up, imports, model build, SVD cache read, data,
  tracking, plotting), with and without process start and imports (a worker pays those once).
The jobs run one after another on one device. Preparation, features, interpretation's own
work and the report are left out of the work (they are the same with either way of running
jobs; interpret jobs do count their fixed cost); linear-probe and zero-shot runs count only
their evaluation. No GPU was lent to this work: ``--step-seconds`` and
``--eval-seconds-per-image`` take a GPU's figures when one is.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
STUDY = ROOT / "config" / "studies" / "biomedclip_few_shot.yaml"
# Classes and test images per dataset (shared/reference/methods.md, BiomedCoOp distribution).
DATASETS = {"BTMRI": (4, 1717), "BUSI": (3, 236), "CHMNIST": (8, 1504), "COVID_19": (4, 6351),
            "CTKidney": (4, 3738), "KneeXray": (5, 1656), "Kvasir": (8, 1200),
            "LungColon": (5, 7500), "RETINA": (4, 1268), "OCTMNIST": (4, 1000)}


def job_counts() -> dict[str, int]:
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copytree(ROOT / "config", Path(tmp) / "config")
        done = subprocess.run([str(Path(sys.executable).with_name("snakemake")), "-s",
                               str(ROOT / "Snakefile"), "--directory", tmp, "--configfile",
                               str(STUDY), "-n", "--quiet", "rules"],
                              capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(done.stderr[-3000:])
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", done.stdout, re.M)
            if m[1] != "total"}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--figures", default=str(ROOT / "benchmarks" / "run_setup.json"))
    parser.add_argument("--step-seconds", type=float,
                        help="a measured step time at run_setup's batch on another device "
                             "(e.g. from adaptation_step.py on a GPU) in place of the CPU's")
    parser.add_argument("--eval-seconds-per-image", type=float,
                        help="likewise, seconds per image of an evaluation forward pass")
    args = parser.parse_args()
    from clipsvd import config
    from clipsvd.config import ADAPTER_METHODS
    from clipsvd.train import total_steps

    figures = json.loads(Path(args.figures).read_text())
    measured = dict(figures["runs"]["biomedclip-size, warm cache"])
    if args.step_seconds:
        measured["steady_step"] = args.step_seconds
    if args.eval_seconds_per_image:
        measured["eval_per_image"] = args.eval_seconds_per_image
    cfg = config.load(STUDY)
    training = evaluation = 0.0
    runs = 0
    for dataset, (classes, test_images) in DATASETS.items():
        for method in cfg.methods:
            for shots in cfg.shots:
                for _seed in cfg.seeds if method != "zero_shot" else [0]:
                    runs += 1
                    evaluation += test_images * measured["eval_per_image"]
                    if method not in ADAPTER_METHODS:
                        continue
                    settings = cfg.training(method, dataset)
                    support = shots * classes
                    per_step = min(settings.batch_size, support) / figures["batch"]
                    training += (total_steps(settings, support, shots)
                                 * measured["steady_step"] * per_step)
                if method == "zero_shot":
                    break  # one zero-shot run per dataset, whatever K
    counts = job_counts()
    jobs = sum(counts.get(rule, 0) for rule in ("adapt", "evaluate", "interpret"))
    own = measured["fixed"]
    warm = own - measured["process_start_to_main"] - measured["imports"]
    work = training + evaluation
    print(f"job list (snakemake -n): {counts}")
    print(f"{runs} runs; training {training / 3600:.1f} h, evaluation {evaluation / 3600:.1f} h "
          f"on this CPU; {jobs} adapt/evaluate/interpret jobs")
    for label, fixed in (("own process", own), ("worker", warm)):
        total = work + jobs * fixed
        # How much faster than here steps and evaluation would have to be (a GPU) before the
        # fixed costs, which a GPU does not shorten much, reach 10 % of the wall time.
        faster = work / (9 * jobs * fixed)
        print(f"{label:<12} fixed cost {fixed:6.2f} s/job, {jobs * fixed / 3600:5.2f} h in all: "
              f"training + evaluation = {100 * work / total:.2f} % of the wall time; fixed "
              f"costs reach 10 % when the work is {faster:,.0f} x faster than measured")


if __name__ == "__main__":
    main()

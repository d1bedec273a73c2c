"""What each job asks of its scheduler: memory that follows the model and the batch size, and
the caps a user sets once so that no request (first attempt or retry) exceeds what the
cluster's nodes have.

Caps are environment variables, like the SLURM account and partitions:
CLIPSVD_SLURM_MAX_THREADS, CLIPSVD_SLURM_MAX_MEM_MB and CLIPSVD_SLURM_MAX_RUNTIME (minutes).
The SLURM profile clamps its thread and runtime requests to them; the memory requests computed
here never exceed the memory cap; and the SLURM executor's pre-submission check
(clipsvd.slurm) refuses, with one line, any request above a cap or above what the partition's
largest node offers.

The memory estimates are a linear fit of peaks measured on the CPU (benchmarks/job_memory.py,
figures in docs/slurm.md): the process's fixed part (Python, torch and the other imports),
weights and the adapter's factors in proportion to the encoders' parameters, activations in
proportion to images × vision layers × tokens × width, and for adaptation the text tower's
activations in proportion to class prompts × text layers × context × width (it runs on every
prompt, with gradients, every step). A request is the estimate with a margin, rounded up.
Kept free of heavy imports: the workflow evaluates it while it builds and runs its DAG.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Mapping

from .architectures import Architecture
from .errors import ClipsvdError

CAP_VARIABLES = {"threads": "CLIPSVD_SLURM_MAX_THREADS", "mem_mb": "CLIPSVD_SLURM_MAX_MEM_MB",
                 "runtime": "CLIPSVD_SLURM_MAX_RUNTIME"}

# Fitted to benchmarks/job_memory.json (MB). PROCESS_MB: a job's fixed part (imports, the
# interpreter, allocator arenas); *_PER_MPARAM: MB per million block parameters (weights,
# plus for CLIP-SVD the U, V factors and recomposed weights, for LoRA the frozen copies);
# *_PER_ACTIVATION: MB per million (layers × tokens × width) units of one image or prompt.
PROCESS_MB = 900
WEIGHTS_PER_MPARAM = {"adapt": 16.0, "evaluate": 12.0, "features": 5.0, "interpret": 12.0}
TRAIN_IMAGE_PER_ACTIVATION = 300.0
TRAIN_PROMPT_PER_ACTIVATION = 300.0
EVAL_IMAGE_PER_ACTIVATION = 4.0
MARGIN = 1.25  # requests = estimate × margin, rounded up to ROUND_MB
ROUND_MB = 500
DEFAULT_CLASSES = 10  # when a job's split is not there yet to count its classes
# Steps whose memory does not depend on the model (MB): tables, JSON, a streaming writer.
FIXED_MB = {"demo_data": 2000, "sample": 2000, "report": 3000}
PREPARE_MB, PREPARE_PER_THREAD_MB = 1500, 1000  # the demo: 1.0 GB with 1 thread
# An architecture that cannot be read offline is costed as BiomedCLIP (the largest measured).
FALLBACK = Architecture(224, 12, 768, 197, 12, 768, 256)


@dataclass(frozen=True)
class MemoryInputs:
    """What decides a job's memory besides its step: the model, images per batch, prompts."""
    architecture: Architecture | None
    batch: int = 1
    prompts: int = DEFAULT_CLASSES


def estimate_mb(step: str, inputs: MemoryInputs, threads: int = 1) -> float:
    """The expected peak resident memory of one job of ``step`` on the CPU, in MB."""
    if step in FIXED_MB:
        return FIXED_MB[step]
    if step == "prepare":
        return PREPARE_MB + PREPARE_PER_THREAD_MB * max(1, threads)
    arch = inputs.architecture or FALLBACK
    image = arch.vision_layers * arch.vision_tokens * arch.vision_width / 1e6
    prompt = arch.text_layers * arch.text_context * arch.text_width / 1e6
    weights = WEIGHTS_PER_MPARAM[step] * arch.parameters_m
    if step == "adapt":
        work = (TRAIN_IMAGE_PER_ACTIVATION * image * inputs.batch
                + TRAIN_PROMPT_PER_ACTIVATION * prompt * inputs.prompts)
    else:  # no gradients: one batch of images (and for evaluation the prompts) at a time
        work = EVAL_IMAGE_PER_ACTIVATION * (image * inputs.batch + prompt * inputs.prompts)
    return PROCESS_MB + weights + work


def caps(environ: Mapping[str, str] = os.environ) -> dict[str, int]:
    """The caps the user set, by resource name; a bad value is one line naming the variable."""
    found = {}
    for resource, variable in CAP_VARIABLES.items():
        value = environ.get(variable, "").strip()
        if not value:
            continue
        try:
            found[resource] = int(value)
        except ValueError:
            found[resource] = -1
        if found[resource] < 1:
            raise ClipsvdError(f"{variable}={value!r} is not a positive whole number; set it "
                               f"to the most {resource} a job may ask for, or unset it")
    return found


def memory_request_mb(step: str, inputs: MemoryInputs, attempt: int = 1, threads: int = 1,
                      cap: int | None = None) -> int:
    """The memory to ask for: the estimate with a margin on the first attempt, that times the
    attempt number on a retry (a job killed for memory usually passes with more), never above
    the cap."""
    need = estimate_mb(step, inputs, threads) * MARGIN * max(1, attempt)
    request = int(math.ceil(need / ROUND_MB) * ROUND_MB)
    return min(request, cap) if cap else request


def over_cap(step: str, inputs: MemoryInputs, cap: int | None, what: str,
             threads: int = 1) -> str | None:
    """One line when even the estimate without margin exceeds the memory cap, else None."""
    if not cap:
        return None
    need = estimate_mb(step, inputs, threads)
    if need <= cap:
        return None
    return (f"{step} needs about {need:.0f} MB ({what}), more than "
            f"{CAP_VARIABLES['mem_mb']}={cap}: lower the batch size, or raise the cap if "
            "the cluster's nodes have more memory")

"""Benchmark 1: one adaptation step of ViT-B/16 CLIP, three ways, measured side by side.

    .venv/bin/python benchmarks/adaptation_step.py                  # batch 32, 2 warm-up + 5 timed
    .venv/bin/python benchmarks/adaptation_step.py --batch 8 --quick
    .venv/bin/python benchmarks/adaptation_step.py --device cuda --precision bf16   # on a GPU
    .venv/bin/python benchmarks/adaptation_step.py --device cuda:1 --precision fp16 --peak-tflops 312

On a GPU the step runs under autocast (bf16, or fp16 with a gradient scaler, as training does),
with the logits and the loss in float32 (``clipsvd.train.class_logits``); the GPU measured is
the one ``--device`` names (its name and index are printed and stored). Its fraction of the
data-sheet peak needs the exact device name in ``PEAK_TFLOPS``, or ``--peak-tflops``: the
script refuses to guess. ``--model tiny-clip`` runs the same step on the tiny model (a
rehearsal of the script, not a figure to quote).

Variants (open_clip ``ViT-B-16`` with random weights, both encoders, 10 classes, 224 px):

- (a) ``full``: full fine-tuning, every parameter trainable, AdamW.
- (b) ``factored``: the public CLIP-SVD code's form, reimplemented here: every adapted linear
  layer applied as x → Vᵀ → ·s → U (no weight recomposition, no W0), attention rewritten with
  separate q, k, v projections (scaled-dot-product attention); only s trained, AdamW.
- (c) ``clipsvd``: :class:`clipsvd.adapters.svd.SVDAdapter` with its default targets
  (q, k, v, out, mlp of every block of both encoders), each step inside ``adapter.cached()``,
  every layer's execution chosen by the cost model; ``clipsvd_recompose`` forces recomposition
  everywhere (the bit-exact form), to show what the per-layer choice buys.

Each variant runs in its own subprocess, one after the other, so peak memories do not mix and
they share the machine's state as fairly as sequential runs can. Step time: median over the
timed steps after warm-up (``time.perf_counter`` around forward + backward + optimizer step).
Memory: resident set size sampled every 2 ms by a thread reading ``/proc/self/statm`` during
the steps; reported as the peak during the steps and that peak minus the RSS just before the
first step (the step's own working memory: activations, gradients, optimizer state, cached
weights); on a GPU, ``torch.cuda.max_memory_allocated`` instead. FLOPs of one step (forward
and backward) are counted by ``torch.utils.flop_counter.FlopCounterMode`` in an extra untimed
step; achieved FLOP/s = FLOPs / median step time, and on a known GPU (or with
``--peak-tflops``) its fraction of the device's peak dense matrix throughput at the precision.
``--profile`` adds a torch.profiler table (top ops by self CPU time) of one step.
``--write`` also stores the raw figures as benchmarks/adaptation_step_b<batch>.json (the
figures in docs/benchmarks.md are copied from a run's printed table).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = {"full": "(a) full fine-tuning", "factored": "(b) public factored form",
            "clipsvd": "(c) clipsvd SVDAdapter",
            "clipsvd_recompose": "(c') clipsvd, recompose everywhere",
            "clip_lora": "(d) CLIP-LoRA (baseline)",
            "comp_lora": "(e) Comp-LoRA (baseline)"}
N_CLASSES = 10


def rss_bytes() -> int:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples the process's resident set size in a thread; ``peak`` is the largest seen."""

    def __init__(self, interval: float = 0.002):
        self.interval = interval
        self.peak = rss_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


# ---------------------------------------------------------------------------------------------
# (b) The public implementation's factored form.


def _factored_modules():
    import torch
    import torch.nn.functional as F
    from torch import nn

    class FactoredLinear(nn.Module):
        """y = ((x Vᵀ) · s) Uᵀ + b: the weight is never formed and W0 is not kept."""

        def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, factors):
            super().__init__()
            u, s, vh = factors(weight)
            self.register_buffer("U", u)
            self.register_buffer("Vh", vh)
            self.s = nn.Parameter(s.clone())
            self.bias = None if bias is None else nn.Parameter(bias.detach().clone(),
                                                               requires_grad=False)
            # open_clip asks a block's c_fc for its weight dtype and checks this name first
            self.int8_original_dtype = weight.dtype

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = ((x @ self.Vh.t()) * self.s) @ self.U.t()
            return y if self.bias is None else y + self.bias

    class SeparateQKVAttention(nn.Module):
        """nn.MultiheadAttention (batch first) rewritten with separate q, k, v projections."""

        def __init__(self, mha: nn.MultiheadAttention, factors):
            super().__init__()
            d = mha.embed_dim
            self.heads = mha.num_heads
            w, b = mha.in_proj_weight.detach(), mha.in_proj_bias.detach()
            self.q_proj = FactoredLinear(w[:d], b[:d], factors)
            self.k_proj = FactoredLinear(w[d:2 * d], b[d:2 * d], factors)
            self.v_proj = FactoredLinear(w[2 * d:], b[2 * d:], factors)
            self.out_proj = FactoredLinear(mha.out_proj.weight.detach(),
                                           mha.out_proj.bias.detach(), factors)

        def forward(self, q_x, k_x, v_x, need_weights=False, attn_mask=None):
            batch, length, d = q_x.shape
            shape = (batch, -1, self.heads, d // self.heads)
            q = self.q_proj(q_x).view(shape).transpose(1, 2)
            k = self.k_proj(k_x).view(shape).transpose(1, 2)
            v = self.v_proj(v_x).view(shape).transpose(1, 2)
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
            return self.out_proj(out.transpose(1, 2).reshape(batch, length, d)), None

    return FactoredLinear, SeparateQKVAttention


def make_factored(model) -> list:
    """Rewrite every transformer block of both encoders into the public code's factored form."""
    from clipsvd import svd_cache

    FactoredLinear, SeparateQKVAttention = _factored_modules()
    for blocks in (model.visual.transformer.resblocks, model.transformer.resblocks):
        for block in blocks:
            block.attn = SeparateQKVAttention(block.attn, svd_cache.decompose)
            for name in ("c_fc", "c_proj"):
                layer = getattr(block.mlp, name)
                setattr(block.mlp, name, FactoredLinear(layer.weight.detach(),
                                                        layer.bias.detach(),
                                                        svd_cache.decompose))
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = [m.s for m in model.modules() if isinstance(m, FactoredLinear)]
    for p in trainable:
        p.requires_grad_(True)
    return trainable


# ---------------------------------------------------------------------------------------------
# One variant, in this process.


# Peak dense throughput (TFLOP/s) from the vendors' data sheets, without sparsity: bf16/fp16
# tensor cores, and fp32 without TF32 (torch's default for matmuls). Keyed by the exact name
# torch.cuda.get_device_name reports: a name that merely contains another ("NVIDIA RTX A1000"
# contains "A100") must not borrow its figure. Other GPUs need --peak-tflops.
PEAK_TFLOPS = {
    "NVIDIA H100 80GB HBM3": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "NVIDIA H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 51.2},
    "NVIDIA H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 66.9},
    "NVIDIA A100-SXM4-80GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "NVIDIA A100-SXM4-40GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "NVIDIA A100 80GB PCIe": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "NVIDIA A100-PCIE-40GB": {"bf16": 312.0, "fp16": 312.0, "fp32": 19.5},
    "NVIDIA L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 91.6},
    "NVIDIA A10": {"bf16": 125.0, "fp16": 125.0, "fp32": 31.2},
}


def peak_tflops(device_name: str, precision: str) -> float | None:
    """The data-sheet peak of exactly this GPU at this precision, or None when unknown."""
    return PEAK_TFLOPS.get(device_name, {}).get(precision)


def check_device(device_name: str, precision: str, peak: float | None,
                 no_peak: bool = False) -> str:
    """The name of the device to measure; exits with one line when it cannot be measured."""
    import torch

    if not device_name.startswith("cuda"):
        if device_name != "cpu":
            raise SystemExit(f"--device {device_name}: use cpu or cuda[:N]")
        return "cpu"
    if not torch.cuda.is_available():
        raise SystemExit(f"--device {device_name}: no CUDA GPU is visible; use --device cpu")
    device = torch.device(device_name)
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index >= torch.cuda.device_count():
        raise SystemExit(f"--device {device_name}: only {torch.cuda.device_count()} GPU(s) "
                         "are visible")
    name = torch.cuda.get_device_name(index)
    if peak is None and peak_tflops(name, precision) is None and not no_peak:
        raise SystemExit(f"--device {device_name} is a {name!r}, whose {precision} peak this "
                         "script does not know: give it with --peak-tflops (the data sheet's "
                         "dense figure, TFLOP/s), or measure without it with --no-peak")
    return name


def run_variant(variant: str, batch: int, warmup: int, steps: int, profile: bool,
                device_name: str, precision: str, model_name: str = "ViT-B-16") -> dict:
    import contextlib

    import torch
    import torch.nn.functional as F
    from torch.utils.flop_counter import FlopCounterMode

    from clipsvd.models import load_model
    from clipsvd.train import class_logits

    device = torch.device(device_name)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)  # kernels, memory statistics and names of this GPU
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision)
    torch.manual_seed(0)
    started = time.perf_counter()
    loaded = load_model(model_name, None, init_seed=0)
    model = loaded.model
    size = loaded.image_size
    tokens = loaded.tokenizer([f"a photo of a class{i}." for i in range(N_CLASSES)]).to(device)
    images = torch.randn(batch, 3, size, size).to(device)
    labels = torch.randint(0, N_CLASSES, (batch,)).to(device)
    step_context = contextlib.nullcontext
    if variant == "full":
        params = [p for p in model.parameters()]
        for p in params:
            p.requires_grad_(True)
    elif variant == "factored":
        params = make_factored(model)
    elif variant in ("clipsvd", "clipsvd_recompose"):
        from clipsvd.adapters.svd import SVDAdapter

        execution = "recompose" if variant == "clipsvd_recompose" else "auto"
        adapter = SVDAdapter.attach(model, {"execution": execution})
        params = adapter.trainable_parameters()
        step_context = adapter.cached
    elif variant in ("clip_lora", "comp_lora"):
        from clipsvd.adapters import attach

        adapter = attach(variant, model, {})  # the papers' defaults: q, k, v of both encoders
        params = adapter.trainable_parameters()
        step_context = adapter.cached
    else:
        raise SystemExit(f"unknown variant {variant}")
    model.to(device)
    setup_seconds = time.perf_counter() - started
    optimizer = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    # fp16 needs loss scaling (its gradients underflow otherwise), as clipsvd.train does
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    scale = torch.tensor(100.0, device=device)
    model.train()

    def step() -> float:
        begin = time.perf_counter()
        with step_context(), torch.autocast(device.type, dtype=dtype or torch.float32,
                                            enabled=dtype is not None):
            text = F.normalize(model.encode_text(tokens), dim=-1)
            feats = F.normalize(model.encode_image(images), dim=-1)
            loss = F.cross_entropy(class_logits(scale, feats, text), labels)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - begin

    for _ in range(warmup):
        step()
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device) if cuda else rss_bytes()
    with PeakRSS() as peak:
        times = [step() for _ in range(steps)]
    peak_bytes = torch.cuda.max_memory_allocated(device) if cuda else peak.peak
    counter = FlopCounterMode(display=False)
    with counter:
        step()
    flops = counter.get_total_flops()
    median = statistics.median(times)
    achieved = flops / median / 1e12
    gpu_name = torch.cuda.get_device_name(device) if cuda else ""
    peak_rate = peak_tflops(gpu_name, precision) if cuda else None
    result = {"variant": variant, "batch": batch, "warmup": warmup, "steps": steps,
              "device": gpu_name or "cpu", "device_index": str(device), "precision": precision,
              "model": model_name, "image_size": size,
              "times": times, "median_s": median, "images_per_s": batch / median,
              "trainable": sum(p.numel() for p in params),
              "rss_before_mb": before / 2**20, "peak_rss_mb": peak_bytes / 2**20,
              "step_peak_mb": (peak_bytes - before) / 2**20, "setup_s": setup_seconds,
              "tflop_per_step": flops / 1e12, "achieved_tflops": achieved,
              "peak_tflops": peak_rate,
              "fraction_of_peak": achieved / peak_rate if peak_rate else None,
              "threads": torch.get_num_threads(), "torch": torch.__version__}
    if profile:
        from torch.profiler import ProfilerActivity
        from torch.profiler import profile as torch_profile

        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        with torch_profile(activities=activities) as prof:
            step()
        result["profile"] = prof.key_averages().table(
            sort_by="self_cuda_time_total" if cuda else "self_cpu_time_total", row_limit=12)
    return result


# ---------------------------------------------------------------------------------------------
# Driver: each variant in its own subprocess, then the comparison.


def machine(device_name: str = "cpu") -> dict:
    """The machine, and the GPU measured (``--device cuda:1`` is the second GPU, not GPU 0)."""
    import torch

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__,
            "python": platform.python_version(), "measured": device_name}
    if device_name.startswith("cuda"):
        device = torch.device(device_name)
        index = device.index if device.index is not None else torch.cuda.current_device()
        info.update(gpu=torch.cuda.get_device_name(index), gpu_index=index,
                    gpus_visible=torch.cuda.device_count(), cuda=torch.version.cuda)
    return info


def table(results: dict, batch: int) -> str:
    a, b, c = (results.get(k) for k in ("full", "factored", "clipsvd"))
    memory = "peak GPU memory" if any(r["device"] != "cpu" for r in results.values()) \
        else "peak RSS"
    lines = [f"| variant (batch {batch}) | median step (s) | images/s | trainable | "
             f"{memory} (MB) | step peak over set-up (MB) | TFLOP/step | TFLOP/s | "
             "of peak |", "|---|---|---|---|---|---|---|---|---|"]
    for key, label in VARIANTS.items():
        r = results.get(key)
        if r:
            share = f"{100 * r['fraction_of_peak']:.1f} %" if r["fraction_of_peak"] else "n/a"
            lines.append(f"| {label} | {r['median_s']:.3f} | {r['images_per_s']:.2f} | "
                         f"{r['trainable']:,} | {r['peak_rss_mb']:.0f} | "
                         f"{r['step_peak_mb']:.0f} | {r['tflop_per_step']:.3f} | "
                         f"{r['achieved_tflops']:.3f} | {share} |")
    lines.append("")
    if a and c:
        lines.append(f"- step time c/a = {c['median_s'] / a['median_s']:.3f} (target ≤ 1.1)")
        lines.append(f"- peak memory c/a = {c['peak_rss_mb'] / a['peak_rss_mb']:.3f} "
                     f"(step peak over set-up c/a = "
                     f"{c['step_peak_mb'] / max(a['step_peak_mb'], 1e-9):.3f}; target ≤ 1)")
    if b and c:
        lines.append(f"- step time b/c = {b['median_s'] / c['median_s']:.3f} "
                     "(target ≥ 1.2 at batch 32); FLOPs b/c = "
                     f"{b['tflop_per_step'] / c['tflop_per_step']:.3f}")
    recompose = results.get("clipsvd_recompose")
    if recompose and c:
        lines.append(f"- per-layer choice: step time c'/c = "
                     f"{recompose['median_s'] / c['median_s']:.3f}, FLOPs c'/c = "
                     f"{recompose['tflop_per_step'] / c['tflop_per_step']:.3f}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 3 timed steps")
    parser.add_argument("--variants", default="full,factored,clipsvd",
                        help="comma-separated; all methods: full,factored,clipsvd,clip_lora,comp_lora")
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"],
                        help="autocast precision of the step (bf16/fp16 on a GPU)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense matrix TFLOP/s at --precision, for a GPU "
                             "this script does not know")
    parser.add_argument("--model", default="ViT-B-16",
                        help="open_clip architecture, random weights (tiny-clip for a rehearsal)")
    parser.add_argument("--no-peak", action="store_true",
                        help="on a GPU this script does not know, measure without a fraction "
                             "of peak instead of refusing")
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--write", action="store_true", help="write docs/benchmarks.md section")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.warmup, args.steps = 1, 3
    for variant in args.variants.split(","):
        if variant not in VARIANTS:
            raise SystemExit(f"--variants: unknown variant {variant!r}; use "
                             f"{', '.join(VARIANTS)}")
    if args.child:
        result = run_variant(args.child, args.batch, args.warmup, args.steps, args.profile,
                             args.device, args.precision, args.model)
        if args.peak_tflops:
            result["peak_tflops"] = args.peak_tflops
            result["fraction_of_peak"] = result["achieved_tflops"] / args.peak_tflops
        print("RESULT " + json.dumps(result))
        return

    gpu_name = check_device(args.device, args.precision, args.peak_tflops, args.no_peak)
    info = machine(args.device)
    print(f"machine: {info}")
    print(f"measuring {args.model} on {args.device} ({gpu_name}), {args.precision}")
    results = {}
    for variant in args.variants.split(","):
        command = [sys.executable, __file__, "--child", variant, "--batch", str(args.batch),
                   "--warmup", str(args.warmup), "--steps", str(args.steps),
                   "--device", args.device, "--precision", args.precision,
                   "--model", args.model]
        command += (["--profile"] if args.profile else [])
        command += (["--peak-tflops", str(args.peak_tflops)] if args.peak_tflops else [])
        print(f"running {VARIANTS[variant]} ...", flush=True)
        done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT,
                              env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
        lines = [ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")]
        if done.returncode or not lines:
            print(done.stdout[-3000:], done.stderr[-3000:])
            raise SystemExit(f"variant {variant} failed")
        results[variant] = json.loads(lines[-1][len("RESULT "):])
        r = results[variant]
        print(f"  median {r['median_s']:.2f} s/step over {r['steps']} steps "
              f"({', '.join(f'{t:.2f}' for t in r['times'])}), peak RSS {r['peak_rss_mb']:.0f} MB, "
              f"set-up {r['setup_s']:.1f} s, {r['tflop_per_step']:.3f} TFLOP/step", flush=True)
        if r.get("profile"):
            print(r["profile"])
    text = table(results, args.batch)
    print(text)
    if args.write:
        out = ROOT / "benchmarks" / f"adaptation_step_b{args.batch}.json"
        out.write_text(json.dumps({"machine": info, "results": results}, indent=2) + "\n")
        print(f"raw figures written to {out}")


if __name__ == "__main__":
    main()

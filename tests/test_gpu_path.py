"""The CUDA path, tested without a GPU (issue 22) and the training crops from the source image
(issue 16, point 3).

bf16 is emulated with CPU autocast, which lowers matmul/addmm/linear to bf16 as CUDA does;
CUDA seeding is watched through spies on torch.cuda's seeding calls; out-of-memory errors are
raised by stand-ins. Each test's docstring names the deliberate break it was seen to catch.
"""
from __future__ import annotations

import errno
import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from clipsvd import config, devices, train
from clipsvd.config import DemoConfig
from clipsvd.data.augment import crop_boxes, random_resized_crops
from clipsvd.data.demo import generate_demo_dataset
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sampling import sample_split, write_split
from clipsvd.data.store import PreparedStore
from clipsvd.data.views import INDEX_FILE, VIEWS_FILE, TrainingViews
from clipsvd.errors import ConfigError, GpuMemoryError
from clipsvd.evaluate import predict
from clipsvd.models import load_model
from clipsvd.seeding import seed_everything
from clipsvd.train import adapt, class_logits

ROOT = Path(__file__).resolve().parents[1]
IMAGE_SIZE = 64  # tiny-clip's input size


def study(root: Path, **changes) -> dict:
    raw = {"study": "gpu", "device": "cpu",
           "datasets": [{"name": "toy", "format": "csv", "root": str(root / "raw"),
                         "manifest": "manifest.csv", "templates": ["a {} scan"]}],
           "methods": ["clip_svd"], "shots": [2], "seeds": [1],
           "clip_svd": {"epochs": 2, "batch_size": 4},
           "clip_lora": {"epochs": 2, "batch_size": 4},
           "tracking": {"enabled": False}}
    for key, value in changes.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    return raw


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """raw/ (demo scans), store/ (prepared, with training views), split{1,2}.json (K=2)."""
    root = tmp_path_factory.mktemp("gpu-path")
    generate_demo_dataset(root / "raw", DemoConfig(per_class=20, image_size=40, seed=0))
    cfg = config.from_dict(study(root))
    prepare_dataset(cfg.dataset("toy"), root / "store", IMAGE_SIZE)
    for seed in (1, 2):
        split = sample_split(PreparedStore.open(root / "store"), "few_shot", 2, seed,
                             cfg.dataset("toy").sampling)
        write_split(root / f"split{seed}.json", split)
    return root


# ----------------------------------------------------------------------------- float32 logits


def test_class_logits_stay_float32_under_bf16_autocast():
    """Break caught: `scale * image @ text.t()` inside autocast (bf16, spacing 0.5 near 80)."""
    torch.manual_seed(0)
    image = F.normalize(torch.randn(16, 64), dim=-1)
    text = F.normalize(torch.randn(5, 64), dim=-1)
    scale = torch.tensor(100.0)
    reference = scale * image @ text.t()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = class_logits(scale, image, text)
        rounded = scale * image @ text.t()
    assert logits.dtype == torch.float32
    assert torch.equal(logits, reference)
    assert (rounded.float() - reference).abs().max() > 1e-3  # what autocast alone would give


def _bf16_on_the_cpu(monkeypatch):
    """adapt() under CPU bf16 autocast: the GPU-only guard lets bf16 through on the CPU."""
    monkeypatch.setattr(train, "autocast_dtype", lambda precision, device: torch.bfloat16)


def test_training_loss_is_float32_from_float32_features_under_bf16(toy, tmp_path, monkeypatch):
    """Every step's cross-entropy gets float32 logits equal to scale · image · textᵀ computed
    in float32 from the encoders' outputs. Break caught: the logits product inside autocast
    (bf16 logits, .float() after the rounding), as before issue 22."""
    _bf16_on_the_cpu(monkeypatch)
    seen: dict[str, list] = {"images": [], "text": [], "logits": []}
    real_images, real_text = train.encode_images, train.encode_class_prompts
    real_cross_entropy = F.cross_entropy

    def images(model, batch):
        out = real_images(model, batch)
        seen["images"].append(out.detach().clone())
        return out

    def text(*args, **kwargs):
        out = real_text(*args, **kwargs)
        seen["text"].append(out.detach().clone())
        return out

    def cross_entropy(logits, target, *args, **kwargs):
        seen["logits"].append(logits.detach().clone())
        return real_cross_entropy(logits, target, *args, **kwargs)

    monkeypatch.setattr(train, "encode_images", images)
    monkeypatch.setattr(train, "encode_class_prompts", text)
    monkeypatch.setattr(train.F, "cross_entropy", cross_entropy)
    cfg = config.from_dict(study(toy, clip_svd={"precision": "bf16"}))
    loaded = load_model(cfg.model.name, cfg.model.pretrained, cfg.model.init_seed)
    scale = loaded.model.logit_scale.detach().exp()
    summary = adapt(cfg, "toy", "clip_svd", toy / "split1.json", toy / "store", tmp_path / "run")
    # the training steps, then one pass over the validation support set (no loss there)
    steps = summary["total_steps"]
    assert len(seen["logits"]) == steps and len(seen["images"]) == len(seen["text"]) == steps + 1
    assert any(i.dtype == torch.bfloat16 for i in seen["images"])  # autocast was on
    for feats, texts, logits in zip(seen["images"], seen["text"], seen["logits"]):
        assert logits.dtype == torch.float32
        assert torch.equal(logits, scale * feats.float() @ texts.float().t())
    monkeypatch.undo()


def test_evaluation_logits_are_float32_under_bf16_autocast(toy, monkeypatch):
    """predict(): softmax of float32 logits of the image features, also inside autocast.
    Break caught: `scale * features @ text.t()` in predict (bf16 under autocast)."""
    from clipsvd import evaluate

    loaded = load_model("tiny-clip", None, 0)
    features = []
    real = evaluate.encode_images

    def spy(model, batch):
        out = real(model, batch)
        features.append(out)
        return out

    monkeypatch.setattr(evaluate, "encode_images", spy)
    images = torch.from_numpy(np.array(PreparedStore.open(toy / "store").images[:6]))
    scale = torch.tensor(100.0)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        probs = predict(loaded, images, ["cyst", "tumor"], ["a {} scan"], scale,
                        torch.device("cpu"), 4)
        text = evaluate.encode_class_prompts(loaded, ["cyst", "tumor"], ["a {} scan"])
    expected = torch.cat([(scale * f.float() @ text.float().t()).softmax(1) for f in features])
    assert probs.dtype == torch.float32
    assert torch.equal(probs, expected)


def test_step_benchmark_loss_is_float32_under_bf16(monkeypatch):
    """benchmarks/adaptation_step.py's step: float32 logits under bf16 autocast, and fp16
    with a gradient scaler. Break caught: the benchmark's old `100 * feats.float() @
    text.float().t()` inside autocast (bf16 again), and fp16 without GradScaler."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import adaptation_step
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    dtypes = []
    real = F.cross_entropy

    def cross_entropy(logits, target, *args, **kwargs):
        dtypes.append(logits.dtype)
        return real(logits, target, *args, **kwargs)

    scaled = []
    real_scale = torch.amp.GradScaler.scale

    def scale(self, outputs):
        scaled.append(self.is_enabled())
        return real_scale(self, outputs)

    monkeypatch.setattr(F, "cross_entropy", cross_entropy)
    monkeypatch.setattr(torch.amp.GradScaler, "scale", scale)
    result = adaptation_step.run_variant("clipsvd", 2, 0, 1, False, "cpu", "bf16",
                                         model_name="tiny-clip")
    assert dtypes and set(dtypes) == {torch.float32}
    assert result["device"] == "cpu" and result["model"] == "tiny-clip"
    assert scaled and not any(scaled)  # bf16: the scaler is off
    scaled.clear()
    adaptation_step.run_variant("clip_lora", 2, 0, 1, False, "cpu", "fp16",
                                model_name="tiny-clip")
    assert scaled and all(scaled)  # fp16: every step's loss goes through the scaler


# ----------------------------------------------------------------------------- CUDA seeding


class CudaSeedSpy:
    """Records what the CUDA generators were last seeded (or restored) to, without CUDA."""

    def __init__(self, monkeypatch):
        self.events: list[tuple[str, object]] = []
        for name in ("manual_seed", "manual_seed_all", "set_rng_state", "set_rng_state_all"):
            monkeypatch.setattr(torch.cuda, name, self._record(name))

    def _record(self, name):
        def call(value, *args, **kwargs):
            self.events.append((name, value if "seed" in name else "state"))
        return call

    @property
    def last_seed(self):
        return self.events[-1][1] if self.events else None


def test_each_run_seed_gives_its_own_cuda_stream(toy, tmp_path, monkeypatch):
    """When training starts, the CUDA generators were last seeded with the run's seed (so
    LoRA dropout differs across seeds on a GPU) and load_model touched them not at all.
    Break caught: `torch.manual_seed(init_seed)` inside `fork_rng(devices=[])` in load_model
    (every run's CUDA stream ended at init_seed)."""
    spy = CudaSeedSpy(monkeypatch)
    seed_everything(7)
    before = list(spy.events)
    load_model("tiny-clip", None, init_seed=0)
    assert spy.events == before == [("manual_seed_all", 7)]

    at_first_step = {}
    real = train.encode_images

    def first_step(model, batch):
        at_first_step.setdefault(len(at_first_step), spy.last_seed)
        return real(model, batch)

    monkeypatch.setattr(train, "encode_images", first_step)
    cfg = config.from_dict(study(toy, clip_lora={"epochs": 1}))
    for seed in (1, 2):
        at_first_step.clear()
        adapt(cfg, "toy", "clip_lora", toy / f"split{seed}.json", toy / "store",
              tmp_path / f"run{seed}")
        assert at_first_step[0] == seed


# ----------------------------------------------------------------------------- batched crops


def test_batched_crops_equal_torchvision_resized_crop_and_flip():
    """Each crop of a batch (different image sizes, zero-padded) equals torchvision's
    resized_crop (bicubic, antialias) then hflip on the float image. Break caught: plain
    (not antialiased) bicubic weights, a flip of the wrong axis, padding read into crops."""
    generator = torch.Generator().manual_seed(3)
    images = torch.randint(0, 256, (4, 3, 130, 170), dtype=torch.uint8, generator=generator)
    sizes = torch.tensor([[130, 170], [100, 170], [130, 90], [40, 50]])
    for i, (h, w) in enumerate(sizes.tolist()):
        images[i, :, h:, :] = 255  # padding that must never be read
        images[i, :, :, w:] = 255
    indices = torch.tensor([0, 1, 2, 3, 0, 3, 2, 1])
    for size, scale in ((64, (0.08, 1.0)), (224, (0.5, 1.0))):
        crops = random_resized_crops(images, sizes, indices, size, scale, True,
                                     torch.Generator().manual_seed(11))
        replay = torch.Generator().manual_seed(11)
        boxes = crop_boxes(sizes[indices], scale, replay)
        flips = torch.rand(len(indices), generator=replay) < 0.5
        assert flips.any() and not flips.all()
        for b, (i, (top, left, h, w)) in enumerate(zip(indices.tolist(), boxes.tolist())):
            assert top + h <= sizes[i, 0] and left + w <= sizes[i, 1]
            expected = TF.resized_crop(images[i].float(), top, left, h, w, [size, size],
                                       v2.InterpolationMode.BICUBIC, antialias=True)
            if flips[b]:
                expected = TF.horizontal_flip(expected)
            expected = expected.div(255).clamp(0, 1)
            assert (crops[b] - expected).abs().max() < 1e-5, (size, b)


def test_crop_boxes_draw_as_torchvision_does():
    """Boxes follow torchvision's RandomResizedCrop.get_params in distribution (area, log
    aspect ratio, position; 4000 draws each); the full image when only scale 1 is allowed
    (aspect ratio at the range's end); torchvision's centred fallback when no try fits.
    Break caught: the ratio drawn linearly instead of in log space, boxes placed at the
    origin, a fallback off centre."""
    height, width = 300, 400
    sizes = torch.tensor([[height, width]] * 4000)
    ours = crop_boxes(sizes, (0.08, 1.0), torch.Generator().manual_seed(0)).double()
    torch.manual_seed(0)
    image = torch.zeros(1, height, width)
    theirs = torch.tensor([v2.RandomResizedCrop.get_params(image, [0.08, 1.0], [3 / 4, 4 / 3])
                           for _ in range(4000)], dtype=torch.float64)

    def stats(boxes):
        area = boxes[:, 2] * boxes[:, 3] / (height * width)
        log_ratio = (boxes[:, 3] / boxes[:, 2]).log()
        centre = (boxes[:, 0] + boxes[:, 2] / 2) / height
        return torch.stack([area.mean(), area.std(), log_ratio.mean(), log_ratio.std(),
                            centre.mean()])

    assert torch.allclose(stats(ours), stats(theirs), atol=0.02), (stats(ours), stats(theirs))
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
    generator = torch.Generator().manual_seed(0)
    full = crop_boxes(torch.tensor([[384, 512], [512, 384]]), (1.0, 1.0), generator)
    assert full.tolist() == [[0, 0, 384, 512], [0, 0, 512, 384]]
    narrow = crop_boxes(torch.tensor([[100, 400]]), (1.0, 1.0), generator)
    assert narrow.tolist() == [[0, 133, 100, 133]]  # torchvision: h = H, w = round(H · 4/3)


def test_the_training_loop_reads_the_device_only_at_reports(toy, tmp_path, monkeypatch,
                                                            caplog):
    """The loop queues each step's loss and accuracy on the device and reads them back at its
    progress reports (first and last step, and every 10 s) and once at the end, not every
    step; the prompts are tokenized (and their tokens copied to the device) once per run.
    Break caught: the per-step `.item()` calls and `if not torch.isfinite(loss)`; the prompts
    tokenized every step (a synchronous host-to-device copy each step on a GPU)."""
    reads, tokenized = [], []
    real_load = train.load_model

    def load_counting_tokenizer(*args, **kwargs):
        loaded = real_load(*args, **kwargs)
        tokenizer = loaded.tokenizer

        def counting(prompts):
            tokenized.append(len(prompts))
            return tokenizer(prompts)
        loaded.tokenizer = counting
        return loaded

    monkeypatch.setattr(train, "load_model", load_counting_tokenizer)
    train_file = str(Path(train.__file__))

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename == train_file:
                reads.append(name)
            return real(self, *args, **kwargs)
        return read

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    cfg = config.from_dict(study(toy, clip_svd={"epochs": 30, "batch_size": 2}))
    with caplog.at_level(logging.INFO, logger="clipsvd.train"):
        summary = adapt(cfg, "toy", "clip_svd", toy / "split1.json", toy / "store",
                        tmp_path / "run")
    monkeypatch.undo()
    reports = len(re.findall(r"step \d+/120 loss", caplog.text))
    assert summary["total_steps"] == 120 and 2 <= reports < 60
    # per report: the finite check, the loss and the accuracy read; then the history, twice,
    # and the validation support set's count of correct predictions, once
    assert len(reads) == 3 * reports + 3, (reports, reads)
    assert tokenized == [4]  # once: the 4 classes' prompts


# ----------------------------------------------------------------------------- out of memory


@pytest.mark.parametrize("error, shown", [
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), ""),
    (RuntimeError("CUDA error: CUBLAS_STATUS_ALLOC_FAILED when calling `cublasCreate(handle)`"),
     " (CUBLAS_STATUS_ALLOC_FAILED)"),
    (RuntimeError("cuDNN error: CUDNN_STATUS_ALLOC_FAILED"), " (CUDNN_STATUS_ALLOC_FAILED)"),
])
def test_every_allocation_failure_names_the_batch_size(toy, tmp_path, monkeypatch, error, shown):
    """cuBLAS and cuDNN report failed allocations as plain RuntimeErrors; they get the same one
    line as torch's OutOfMemoryError. Break caught: catching torch.OutOfMemoryError only."""
    def fail(*args, **kwargs):
        raise error

    monkeypatch.setattr(train, "encode_images", fail)
    with pytest.raises(GpuMemoryError) as info:
        adapt(config.from_dict(study(toy)), "toy", "clip_svd", toy / "split1.json",
              toy / "store", tmp_path / "run")
    assert str(info.value) == (f"out of GPU memory on cpu{shown} with clip_svd.batch_size = 4; "
                               "lower clip_svd.batch_size (e.g. to 2) in the study config, or "
                               "free the GPU of other processes")
    assert not (tmp_path / "run").exists()


def test_other_runtime_errors_pass_unchanged(toy, tmp_path, monkeypatch):
    """Break caught: turning every RuntimeError into an out-of-memory message."""
    def fail(*args, **kwargs):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied (4x3 and 5x6)")

    monkeypatch.setattr(train, "encode_images", fail)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        adapt(config.from_dict(study(toy)), "toy", "clip_svd", toy / "split1.json",
              toy / "store", tmp_path / "run")


def test_model_and_support_set_transfers_name_their_keys(toy, tmp_path, monkeypatch):
    """A model that does not fit names `device`; a support set that does not fit names the
    dataset's `preprocessing.train_view`; evaluation's model transfer too. Break caught:
    model.to(device) and the support-set transfer outside the out-of-memory handling."""
    cfg = config.from_dict(study(toy))
    real_to = torch.nn.Module.to

    def model_to(self, *args, **kwargs):
        if args and isinstance(args[0], torch.device):
            raise RuntimeError("CUDA error: out of memory")
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(torch.nn.Module, "to", model_to)
    with pytest.raises(GpuMemoryError, match=r"^out of GPU memory on cpu \(CUDA error: out of "
                       r"memory\) while moving the model to it; .* or set device: cpu in the "
                       r"study config$"):
        adapt(cfg, "toy", "clip_svd", toy / "split1.json", toy / "store", tmp_path / "a")
    from clipsvd.evaluate import evaluate
    with pytest.raises(GpuMemoryError, match="while moving the model to it"):
        evaluate(cfg, "toy", "zero_shot", toy / "split1.json", toy / "store", tmp_path / "b",
                 features_path=tmp_path / "none.npy")
    monkeypatch.setattr(torch.nn.Module, "to", real_to)

    def support_to(tensor, device):
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(train, "to_device", support_to)
    with pytest.raises(GpuMemoryError, match=r"while moving the support set \(8 images of up "
                       r"to 40 x 40 px, 0 MB\) to it; lower datasets\[toy\]\.preprocessing\."
                       r"train_view \(now 512\)"):
        adapt(cfg, "toy", "clip_svd", toy / "split1.json", toy / "store", tmp_path / "c")
    assert not any((tmp_path / name).exists() for name in ("a", "c"))


# ----------------------------------------------------------------------------- lock folder


def test_lock_file_of_another_user_is_locked_read_only(tmp_path, monkeypatch):
    """Another user's lock file (0644 under umask 022) cannot be opened for writing; the slot
    is still claimed, through a read-only descriptor. Break caught: the unhandled
    PermissionError of os.open(O_RDWR)."""
    for name in ("SLURM_JOB_ID", devices.SLOTS_ENV, "CUDA_VISIBLE_DEVICES"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "gpu-0.lock").write_text("pid 1 since 0\n")
    real_open = os.open

    def open_as_other_user(path, flags, *args):
        if flags & (os.O_RDWR | os.O_WRONLY | os.O_CREAT):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(devices.os, "open", open_as_other_user)
    slot = devices.claim_gpu_slot(1, tmp_path, 0.01, fake=True)
    try:
        assert slot.index == 0
        assert (tmp_path / "gpu-0.lock").read_text() == "pid 1 since 0\n"  # not written
    finally:
        devices.release_gpu_slot(slot)


def test_lock_folder_that_forbids_new_files_is_one_line(tmp_path, monkeypatch):
    """A shared folder this user may not create lock files in: one line naming the folder,
    `chmod 1777` and CLIPSVD_GPU_LOCK_DIR. Break caught: the unhandled PermissionError."""
    real_open = os.open

    def open_denied(path, flags, *args):
        if flags & os.O_CREAT:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(devices.os, "open", open_denied)
    with pytest.raises(ConfigError) as info:
        devices.claim_gpu_slot(2, tmp_path, 0.01, fake=True)
    message = str(info.value)
    assert message.startswith(f"GPU lock folder {tmp_path}: this user may not create lock files")
    assert f"chmod 1777 {tmp_path}" in message and devices.LOCK_DIR_ENV in message
    assert "\n" not in message


NOBODY = 65534


@pytest.fixture
def shared_folder():
    """A folder every user can reach (pytest's own temporary folders are private to root)."""
    import shutil
    import tempfile

    folder = Path(tempfile.mkdtemp(prefix="clipsvd-two-users-"))
    folder.chmod(0o755)
    yield folder
    shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run a process as another user")
def test_two_users_share_a_lock_folder_for_real(shared_folder):
    """Root holds slot 0 (its lock file 0644) in a 1777 folder; a process of user nobody
    gets slot 1 and, once root's is free, slot 0 through a read-only descriptor. Break caught:
    the unhandled PermissionError on root's lock file."""
    import shutil

    folder = shared_folder / "slots"
    folder.mkdir()
    folder.chmod(0o1777)
    source = shared_folder / "src"
    shutil.copytree(ROOT / "src" / "clipsvd", source / "clipsvd",
                    ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run(["chmod", "-R", "a+rX", str(source)], check=True)
    script = ("import sys; from clipsvd import devices\n"
              "slot = devices.claim_gpu_slot(2, sys.argv[1], 0.01, fake=True)\n"
              "print(slot.index); devices.release_gpu_slot(slot)\n")
    mine = devices.claim_gpu_slot(1, folder, 0.01, fake=True)  # gpu-0.lock, root, 0644
    assert oct((folder / "gpu-0.lock").stat().st_mode & 0o777) == oct(0o666 & ~_umask())
    env = {"PYTHONPATH": str(source), "PATH": os.environ["PATH"], "HOME": str(shared_folder),
           "PYTHONDONTWRITEBYTECODE": "1"}

    def as_nobody():
        result = subprocess.run([sys.executable, "-c", script, str(folder)], env=env,
                                capture_output=True, text=True, user=NOBODY, group=NOBODY,
                                extra_groups=[], cwd=shared_folder)
        assert result.returncode == 0, result.stderr[-2000:]
        return int(result.stdout.strip())

    try:
        assert as_nobody() == 1
    finally:
        devices.release_gpu_slot(mine)
    assert as_nobody() == 0  # root's 0644 file, opened read-only by nobody


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


# ----------------------------------------------------------------------------- training views


def _marker_dataset(root: Path, **preprocessing) -> config.StudyConfig:
    """Two classes of 512 × 384 (width × height) images, dark with a bright 48 px square in
    the top-left corner, outside the centre 384 × 384 square."""
    (root / "raw").mkdir(parents=True)
    rows = ["path,label,split"]
    rng = np.random.default_rng(0)
    for label in ("cyst", "tumor"):
        for i, split in enumerate(["train"] * 3 + ["val", "test"]):
            pixels = rng.integers(0, 40, size=(384, 512), dtype=np.uint8)
            pixels[:48, :48] = 250
            Image.fromarray(pixels).save(root / "raw" / f"{label}{i}.png")
            rows.append(f"{label}{i}.png,{label},{split}")
    (root / "raw" / "manifest.csv").write_text("\n".join(rows) + "\n")
    raw = study(root, clip_svd={"epochs": 1, "batch_size": 6, "crop_scale": [1.0, 1.0],
                                "flip": False})
    raw["datasets"][0]["preprocessing"] = {"intensity": "none", "resize": "crop",
                                           **preprocessing}
    raw["datasets"][0]["sampling"] = {"max_val_shots": 1}
    return config.from_dict(raw)


def _first_training_batch(cfg, root: Path, tmp_path: Path, monkeypatch) -> torch.Tensor:
    prepare_dataset(cfg.dataset("toy"), root / "store", IMAGE_SIZE)
    split = sample_split(PreparedStore.open(root / "store"), "few_shot", 3, 1,
                         cfg.dataset("toy").sampling)
    write_split(root / "split.json", split)
    batches = []
    real = train.encode_images

    def spy(model, batch):
        batches.append(batch.detach().clone())
        return real(model, batch)

    monkeypatch.setattr(train, "encode_images", spy)
    adapt(cfg, "toy", "clip_svd", root / "split.json", root / "store", tmp_path / "run")
    loaded = load_model("tiny-clip", None, 0)
    mean = torch.tensor(loaded.mean).view(1, 3, 1, 1)
    std = torch.tensor(loaded.std).view(1, 3, 1, 1)
    return batches[0] * std + mean  # back to [0, 1]


def test_training_crop_at_full_scale_shows_the_corner_outside_the_centre_square(tmp_path,
                                                                               monkeypatch):
    """A crop at scale 1.0 of a 512 × 384 source covers the whole field of view: its top-left
    corner holds the marker, which the stored (evaluation) centre square does not; train.json
    says where the crops came from. Breaks caught: crops cut from images.npy (the centre
    square) as before issue 16; train.json's crops_from fixed to one file, or
    crop_source_size given as (width, height)."""
    cfg = _marker_dataset(tmp_path)
    crops = _first_training_batch(cfg, tmp_path, tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["crops_from"] == VIEWS_FILE
    assert summary["crop_source_size"] == [384, 512]
    assert crops.shape == (6, 3, IMAGE_SIZE, IMAGE_SIZE)
    # 48 of 512 columns and 48 of 384 rows at 64 px: the top-left 5 × 7 pixels are marker
    assert (crops[:, :, :7, :5] > 0.9).all()
    assert (crops[:, :, 20:, 20:] < 0.3).all()
    store = PreparedStore.open(tmp_path / "store")
    assert store.images.max(axis=(1, 2, 3)).max() < 160  # the evaluation square lacks it
    views = TrainingViews.open(tmp_path / "store")
    assert sorted(map(tuple, views.index[:, 2:].tolist())) == [(384, 512)] * 6  # train only
    train_rows = set(np.flatnonzero(store.index["split"].to_numpy() == "train"))
    assert set(views.index[:, 0].tolist()) == train_rows


def test_without_training_views_crops_come_from_the_stored_square(tmp_path, monkeypatch):
    """`train_view: 0` keeps no views: training crops the stored centre square (no marker),
    as the fallback for such stores does, and train.json says so. Breaks caught: views written
    although disabled; train.json's crops_from fixed to train_views.npy."""
    cfg = _marker_dataset(tmp_path, train_view=0)
    crops = _first_training_batch(cfg, tmp_path, tmp_path, monkeypatch)
    summary = json.loads((tmp_path / "run" / "train.json").read_text())
    assert summary["crops_from"] == "images.npy"
    assert summary["crop_source_size"] == [IMAGE_SIZE, IMAGE_SIZE]
    assert not (tmp_path / "store" / VIEWS_FILE).exists()
    assert not (tmp_path / "store" / INDEX_FILE).exists()
    assert crops.max() < 0.7


def test_training_views_keep_the_aspect_ratio_and_never_enlarge(tmp_path):
    """train_view 256: the 512 × 384 sources become 256 × 192 (aspect kept), a 100 × 60
    source stays as it is; the provenance says what was kept. Break caught: resizing the
    views to squares, or enlarging small ones."""
    cfg = _marker_dataset(tmp_path, train_view=256)
    Image.fromarray(np.full((60, 100), 7, dtype=np.uint8)).save(tmp_path / "raw" / "small.png")
    manifest = tmp_path / "raw" / "manifest.csv"
    manifest.write_text(manifest.read_text() + "small.png,cyst,train\n")
    prepare_dataset(cfg.dataset("toy"), tmp_path / "store", IMAGE_SIZE)
    store = PreparedStore.open(tmp_path / "store")
    views = TrainingViews.open(tmp_path / "store")
    shapes = sorted(map(tuple, views.index[:, 2:].tolist()))
    assert shapes == [(60, 100)] + [(192, 256)] * 6
    record = store.provenance["train_views"]
    assert record["n_views"] == 7 and record["longest_side"] == 256
    assert record["bytes"] == 3 * (60 * 100 + 6 * 192 * 256)
    assert (tmp_path / "store" / VIEWS_FILE).stat().st_size == 128 + record["bytes"]
    small = int(store.index.index[store.index["sample_id"] == "small.png"][0])
    image, size = views.stack(np.array([small]))
    assert size.tolist() == [[60, 100]] and int(image.max()) == 7


def test_views_mismatching_their_index_are_refused(tmp_path):
    """A truncated view file stops with one line asking to prepare again. Break caught:
    views read past the end of the file (an exception from numpy, or garbage)."""
    cfg = _marker_dataset(tmp_path)
    prepare_dataset(cfg.dataset("toy"), tmp_path / "store", IMAGE_SIZE)
    index = np.load(tmp_path / "store" / INDEX_FILE)
    index[-1, 1] += 10**6
    np.save(tmp_path / "store" / INDEX_FILE, index)
    from clipsvd.errors import DataError
    with pytest.raises(DataError, match="do not match; run `clipsvd prepare` again"):
        TrainingViews.open(tmp_path / "store")


# ----------------------------------------------------------------------------- first GPU run


def test_gpu_first_run_refuses_clearly_without_cuda():
    """Without CUDA the first-run script does nothing and says so in one line (exit 2)."""
    if torch.cuda.is_available():
        pytest.skip("this host has a GPU")
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_first_run.py")],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 2, result.stdout + result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA GPU is visible" in lines[0], result.stderr
    assert "--rehearse-on-cpu" in lines[0]
    assert result.stdout == ""


@pytest.mark.parametrize("args, named", [
    (["--device", "cpu"], "--device must name a CUDA device"),
    (["--device", "cuda:x"], "--device must name a CUDA device"),
    (["--budget", "30"], "--budget"),
])
def test_gpu_first_run_refuses_bad_arguments(args, named):
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_first_run.py"),
                             *args], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    assert result.returncode == 2 and named in result.stderr, result.stderr


@pytest.mark.slow
def test_gpu_first_run_rehearses_on_the_cpu(tmp_path):
    """The script's whole course on the CPU (fake GPU slot, tiny-clip step benchmark): every
    check that does not need CUDA passes, those that do are listed as skipped. Catches a
    first-run script that breaks before it reaches the GPU checks."""
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_first_run.py"),
                             "--rehearse-on-cpu", "--work", str(tmp_path / "work")],
                            capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    out = result.stdout
    assert result.returncode == 0, out[-6000:] + result.stderr[-4000:]
    assert "FAIL" not in out
    for check in ("tiny study", "jobs forked from a warm worker", "every GPU job claimed a slot",
                  "step benchmark"):
        assert f"PASS  {check}" in out, out[-4000:]
    assert "SKIP  CUDA streams per seed" in out

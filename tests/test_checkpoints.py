"""Local checkpoint files: corrupt ones refused from their header alone (validate and load
alike), and TorchScript archives (OpenAI's own .pt files) read as weights only."""
from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import warnings
import zipfile
from pathlib import Path

import open_clip
import pytest
import torch
import yaml
from safetensors.torch import save_file

from clipsvd import checkpoints
from clipsvd.errors import ModelError
from clipsvd.models import check_model_request, load_model, model_architecture

ROOT = Path(__file__).resolve().parents[1]


def _tiny_state(seed: int = 1) -> dict[str, torch.Tensor]:
    return {k: v.contiguous() for k, v in
            load_model("tiny-clip", None, init_seed=seed).model.state_dict().items()}


def _corrupt_files(tmp_path: Path) -> dict[str, Path]:
    """Files a user can end up with: random bytes, a download cut short, a misnamed file."""
    generator = torch.Generator().manual_seed(0)
    noise = bytes(torch.randint(0, 256, (300,), generator=generator, dtype=torch.uint8).tolist())
    files = {}
    files["random.safetensors"] = tmp_path / "random.safetensors"
    files["random.safetensors"].write_bytes(noise)
    files["random.pt"] = tmp_path / "random.pt"
    files["random.pt"].write_bytes(b"\x00" + noise)
    whole = tmp_path / "whole.safetensors"
    save_file(_tiny_state(), str(whole))
    files["truncated.safetensors"] = tmp_path / "truncated.safetensors"
    files["truncated.safetensors"].write_bytes(whole.read_bytes()[:-1000])
    saved = tmp_path / "whole.pt"
    torch.save(_tiny_state(), saved)
    files["truncated.pt"] = tmp_path / "truncated.pt"
    files["truncated.pt"].write_bytes(saved.read_bytes()[: saved.stat().st_size // 2])
    files["safetensors_named.pt"] = tmp_path / "safetensors_named.pt"
    files["safetensors_named.pt"].write_bytes(whole.read_bytes())
    files["empty.bin"] = tmp_path / "empty.bin"
    files["empty.bin"].write_bytes(b"")
    return files


CORRUPT = ["random.safetensors", "random.pt", "truncated.safetensors", "truncated.pt",
           "safetensors_named.pt", "empty.bin"]


@pytest.mark.parametrize("kind", CORRUPT)
def test_a_corrupt_checkpoint_is_refused_by_its_header_naming_the_file(tmp_path, kind):
    """Issue 15.5: 300 random bytes named .safetensors passed `validate`, then `features` died
    with a SafetensorError traceback naming no file. Now the header check refuses each file in
    one line naming it, before any model is built. Catches: the safetensors length/offset
    checks removed (random/truncated .safetensors pass), the zip directory check removed
    (truncated .pt passes), the suffix check removed (a safetensors file named .pt passes)."""
    path = _corrupt_files(tmp_path)[kind]
    for attempt in (lambda: check_model_request("tiny-clip", str(path)),
                    lambda: load_model("tiny-clip", str(path))):
        with pytest.raises(ModelError) as info:
            attempt()
        message = str(info.value)
        assert str(path) in message and "\n" not in message and "0x" not in message


def test_a_checkpoint_header_is_checked_without_reading_the_weights(tmp_path, monkeypatch):
    """validate reads headers only: with every way of reading tensors disabled, a good
    safetensors file and a good torch.save file still pass. Catches a check that loads the
    file (safetensors.torch.load_file, torch.load or torch.jit.load)."""
    good = tmp_path / "good.safetensors"
    save_file(_tiny_state(), str(good))
    saved = tmp_path / "good.pt"
    torch.save(_tiny_state(), saved)

    def refuse(*args, **kwargs):
        raise AssertionError("a header check read the weights")

    import safetensors.torch

    monkeypatch.setattr(safetensors.torch, "load_file", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(open_clip, "create_model", refuse)
    check_model_request("tiny-clip", str(good))
    check_model_request("tiny-clip", str(saved))
    assert checkpoints.checkpoint_format(good) == checkpoints.SAFETENSORS
    assert checkpoints.checkpoint_format(saved) == checkpoints.TORCH_ZIP


@pytest.mark.slow
def test_validate_and_prepare_refuse_a_corrupt_checkpoint_with_exit_2(tmp_path):
    """The user's view of issue 15.5: `clipsvd validate` no longer says "valid", and the first
    step that needs the model (`prepare`, for its input size) prints one line naming the file
    and exits 2, writing nothing. Catches the CLI turning a checkpoint ModelError into a
    traceback, or blaming model.name."""
    corrupt = tmp_path / "weights.safetensors"
    corrupt.write_bytes(bytes(range(256)) + bytes(44))
    config = yaml.safe_load((ROOT / "config" / "config.yaml").read_text())
    config["model"] = {"name": "tiny-clip", "pretrained": str(corrupt)}
    config_path = tmp_path / "study.yaml"
    config_path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}

    def clipsvd(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "clipsvd", *args, "--config",
                               str(config_path)], capture_output=True, text=True, env=env,
                              timeout=300, cwd=tmp_path)

    validate = clipsvd("validate")
    assert validate.returncode == 2, validate.stdout + validate.stderr
    assert "valid study" not in validate.stdout
    lines = validate.stderr.strip().splitlines()
    assert len(lines) == 1 and "model.pretrained" in lines[0] and str(corrupt) in lines[0]
    store = tmp_path / "store"
    prepare = clipsvd("prepare", "--dataset", "demo_scans", "--out", str(store))
    assert prepare.returncode == 2, prepare.stdout + prepare.stderr
    errors = [line for line in prepare.stderr.splitlines()
              if line.startswith("clipsvd prepare: error:")]
    assert len(errors) == 1 and str(corrupt) in errors[0], prepare.stderr
    assert "Traceback" not in prepare.stderr and not store.exists()


def _scripted_tiny(path: Path, quick_gelu: bool, seed: int = 4) -> torch.nn.Module:
    """A tiny CLIP saved as OpenAI saved theirs: a TorchScript archive of fp16 weights.
    Returns the float32 model whose weights the archive holds."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = open_clip.create_model("tiny-clip", force_quick_gelu=quick_gelu).eval()
    with torch.no_grad():  # the values fp16 can hold, so the float32 model is the archive's
        for tensor in model.state_dict().values():
            tensor.copy_(tensor.half().float())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scripted = torch.jit.script(model.half())
        torch.jit.save(scripted, str(path))
    return model.float()


def _activations(model: torch.nn.Module) -> set[str]:
    return {type(m).__name__ for m in model.modules()
            if isinstance(m, (torch.nn.GELU, open_clip.transformer.QuickGELU))}


@pytest.mark.parametrize("quick_gelu", [True, False])
def test_a_torchscript_checkpoint_loads_its_weights_without_running_its_code(
        tmp_path, monkeypatch, quick_gelu):
    """Issue 16.2: OpenAI's ViT-B-16.pt is a TorchScript archive, which weights_only loading
    refused with a message naming no way out. It now loads as a local checkpoint: the tensors
    are read from the zip as data (torch.jit.load and torch.load are disabled here), the fp16
    weights land exactly in the float32 model, and the model gets the activation the archive's
    modules have (OpenAI's: QuickGELU) even though tiny-clip's config says GELU. Catches:
    reading through torch.jit.load, a missing QuickGELU switch, weights not copied."""
    path = tmp_path / "tiny-openai.pt"
    source = _scripted_tiny(path, quick_gelu)

    def refuse(*args, **kwargs):
        raise AssertionError("the archive was opened by torch, which runs its TorchScript")

    monkeypatch.setattr(torch.jit, "load", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    assert checkpoints.checkpoint_format(path) == checkpoints.TORCHSCRIPT
    loaded = load_model("tiny-clip", str(path))
    assert _activations(loaded.model) == {"QuickGELU" if quick_gelu else "GELU"}
    assert model_architecture("tiny-clip", str(path))["model_cfg"].get("quick_gelu", False) \
        == quick_gelu
    state, expected = loaded.model.state_dict(), source.state_dict()
    assert state.keys() == expected.keys()
    assert all(torch.equal(state[k], expected[k]) for k in state)
    tokens = loaded.tokenizer(["a photo of a cat."])
    with torch.no_grad():
        assert torch.equal(loaded.model.encode_text(tokens), source.encode_text(tokens))


def _archive(path: Path, data_pkl: bytes, extra: dict[str, bytes] | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("model/data.pkl", data_pkl)
        archive.writestr("model/constants.pkl", pickle.dumps(()))
        archive.writestr("model/code/__torch__/model.py", "class CLIP(Module): pass\n")
        for name, content in (extra or {}).items():
            archive.writestr(f"model/{name}", content)
    return path


class _RunsACommand:
    """Pickles as a call of os.system, what a malicious checkpoint would hold."""

    def __reduce__(self):
        return (os.system, ("echo ran > /dev/null",))


def test_an_archive_that_would_run_code_is_refused_with_the_way_to_convert(tmp_path,
                                                                          monkeypatch):
    """A TorchScript archive whose data.pkl calls a Python function (here os.system) is refused,
    by validate and by load alike, in one line naming the file and giving the conversion
    command; the function never runs. Catches an unpickler that resolves arbitrary globals."""
    path = _archive(tmp_path / "evil.pt", pickle.dumps({"weight": _RunsACommand()}, protocol=2))
    calls = []
    monkeypatch.setattr(os, "system", lambda *args: calls.append(args) or 0)
    for attempt in (lambda: check_model_request("tiny-clip", str(path)),
                    lambda: load_model("tiny-clip", str(path))):
        with pytest.raises(ModelError) as info:
            attempt()
        message = str(info.value)
        assert str(path) in message and "torch.jit.load" in message and "\n" not in message
        assert "posix.system" in message or "os.system" in message
    assert calls == []


def test_an_archive_that_does_not_show_its_activation_is_refused(tmp_path):
    """An archive of a model without GELU or QuickGELU modules (the activation cannot be
    read from it) is refused rather than built with a guessed activation. Catches a default
    to either activation."""
    source = _scripted_tiny(tmp_path / "real.pt", quick_gelu=True)
    del source
    with zipfile.ZipFile(tmp_path / "real.pt") as real:
        names = real.namelist()
        top = names[0].split("/", 1)[0]
        data = real.read(f"{top}/data.pkl").replace(b"QuickGELU", b"Quick_ELU")
        with zipfile.ZipFile(tmp_path / "unknown.pt", "w") as copy:
            for name in names:
                copy.writestr(name, data if name == f"{top}/data.pkl" else real.read(name))
    with pytest.raises(ModelError, match="does not show whether its model uses QuickGELU"):
        load_model("tiny-clip", str(tmp_path / "unknown.pt"))


def test_an_archive_of_another_architecture_does_not_fit(tmp_path):
    """The archive's tensors must match the named model exactly: a tiny-clip archive named as
    tiny-timm-clip is refused in one line naming the file. Catches a non-strict copy."""
    _scripted_tiny(tmp_path / "tiny.pt", quick_gelu=True)
    with pytest.raises(ModelError, match=r"weights in .*tiny\.pt do not fit model 'tiny-timm-clip'"):
        load_model("tiny-timm-clip", str(tmp_path / "tiny.pt"))


def test_the_reader_refuses_a_tensor_outside_its_storage(tmp_path):
    """A tensor record pointing past its storage's end is a one-line refusal, not a crash."""
    storage = torch.zeros(4)
    buffer = io.BytesIO()

    class Storage:
        pass

    pickler = pickle.Pickler(buffer, protocol=2)
    pickler.persistent_id = lambda obj: (("storage", torch.FloatStorage, "0", "cpu", 4)
                                         if isinstance(obj, Storage) else None)

    class Tensor:
        def __reduce__(self):
            return (torch._utils._rebuild_tensor_v2, (Storage(), 2, (8,), (1,), False, {}))

    pickler.dump({"weight": Tensor()})
    path = _archive(tmp_path / "bad.pt", buffer.getvalue(),
                    {"data/0": storage.numpy().tobytes()})
    with pytest.raises(ModelError, match="does not fit its storage"):
        checkpoints.read_torchscript(path)

"""Local checkpoint files: which format a file holds, told from its header alone, and the
tensors of a TorchScript archive (OpenAI's own ``ViT-B-16.pt``) read without running its code.

:func:`checkpoint_format` reads only a file's first bytes, a safetensors header or a zip
directory, so ``clipsvd validate`` can refuse a corrupt or mislabelled file without reading
weights. :func:`read_torchscript` unpickles an archive's ``data.pkl`` with an unpickler that
builds nothing but tensors, dicts and inert stand-ins for the archive's own classes: no
TorchScript is compiled or run, and the pickle is interpreted opcode by opcode here rather
than by the pickle module, so a file from anywhere cannot execute code.
"""
from __future__ import annotations

import collections
import json
import os
import pickletools
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import ModelError

SAFETENSORS = "safetensors"
TORCH_ZIP = "torch zip"  # torch.save since PyTorch 1.6
TORCH_LEGACY = "torch legacy pickle"  # torch.save(..., _use_new_zipfile_serialization=False)
TORCHSCRIPT = "TorchScript archive"  # torch.jit.save, e.g. OpenAI's ViT-B-16.pt
NUMPY_ZIP = "numpy npz"  # big_vision (SigLIP) weights, read by open_clip

# What each file suffix is loaded as by open_clip (factory.load_checkpoint): .safetensors with
# safetensors, .npz/.npy with numpy, everything else with torch.load.
_SUFFIX_FORMATS = {".safetensors": (SAFETENSORS,), ".npz": (NUMPY_ZIP,), ".npy": (NUMPY_ZIP,)}
_TORCH_FORMATS = (TORCH_ZIP, TORCH_LEGACY, TORCHSCRIPT)
_MAX_SAFETENSORS_HEADER = 100 * 2**20  # the limit the safetensors library itself enforces
# torch.save's legacy format starts with its magic number pickled with protocol 2:
# PROTO 2, LONG1 of 10 bytes, STOP.
_LEGACY_MAGIC = (b"\x80\x02\x8a\x0a" + torch.serialization.MAGIC_NUMBER.to_bytes(10, "little")
                 + b".")

def convert_hint(path: Path) -> str:
    """The command a user can run once, on a file they trust, to turn a TorchScript archive
    into a state dict (torch.jit.load runs the archive's TorchScript; clipsvd never does)."""
    target = path.with_suffix(".safetensors")
    return ("convert it once, if you trust the file, with python -c \"import torch, "
            f"safetensors.torch as st; m = torch.jit.load('{path}', map_location='cpu'); "
            "st.save_file({k: v.float().contiguous() for k, v in m.state_dict().items() "
            "if k not in ('input_resolution', 'context_length', 'vocab_size')}, "
            f"'{target}')\" and give {target} as pretrained with the model name of its "
            "architecture (ViT-B-16-quickgelu for OpenAI's ViT-B-16 weights)")


def _refuse(path: Path, what: str) -> ModelError:
    return ModelError(f"checkpoint file {path} {what}; give a .safetensors file or a torch.save "
                      ".pt/.bin file of the model's state dict")


def _safetensors_header(path: Path, size: int) -> None:
    """Check a safetensors header: its length, JSON and tensor offsets covering the file."""
    with open(path, "rb") as handle:
        start = handle.read(8)
        if len(start) < 8:
            raise _refuse(path, f"is too short ({size} bytes) to be a safetensors file")
        length = int.from_bytes(start, "little")
        if not 2 <= length <= min(size - 8, _MAX_SAFETENSORS_HEADER):
            raise _refuse(path, "is not a valid safetensors file (its header length is "
                          "impossible: the file is corrupt or not safetensors)")
        raw = handle.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise _refuse(path, "is not a valid safetensors file (its header is not JSON: the file "
                      "is corrupt or not safetensors)") from None
    if not isinstance(header, dict):
        raise _refuse(path, "is not a valid safetensors file (its header is not a JSON object)")
    end = 0
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
        if (not isinstance(offsets, list) or len(offsets) != 2
                or not all(isinstance(v, int) for v in offsets) or not 0 <= offsets[0] <= offsets[1]
                or not isinstance(entry.get("shape"), list) or not isinstance(entry.get("dtype"), str)):
            raise _refuse(path, f"is not a valid safetensors file (header entry {key!r} is "
                          "malformed)")
        end = max(end, offsets[1])
    if end != size - 8 - length:
        raise _refuse(path, f"is truncated or padded: its header describes {end} bytes of "
                      f"tensors but {size - 8 - length} follow it (download or save it again)")


def _zip_format(path: Path) -> str:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise _refuse(path, "looks like a zip archive but its directory cannot be read (the "
                      "file is truncated or corrupt)") from None
    tops = {name.split("/", 1)[0] for name in names if "/" in name}
    if len(tops) == 1:
        top = next(iter(tops))
        if f"{top}/data.pkl" in names:
            return TORCHSCRIPT if f"{top}/constants.pkl" in names else TORCH_ZIP
    if names and all(name.endswith(".npy") for name in names):
        return NUMPY_ZIP
    raise _refuse(path, "is a zip archive but neither a torch.save file (no data.pkl) nor a "
                  "numpy .npz")


def checkpoint_format(path: str | os.PathLike) -> str:
    """The format of checkpoint file ``path``, from its header alone (no tensor is read).

    Raises a ModelError naming the file when it is missing, corrupt, of no format clipsvd
    loads, or named with a suffix that open_clip would load as another format.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"checkpoint file {path} not found; give an existing .safetensors or "
                         ".pt/.bin file as pretrained")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        start = handle.read(len(_LEGACY_MAGIC))
    if start[:4] == b"PK\x03\x04":
        found = _zip_format(path)
    elif start == _LEGACY_MAGIC:
        found = TORCH_LEGACY
    elif path.suffix.lower() == ".safetensors" or (len(start) >= 9 and start[8:9] == b"{"):
        _safetensors_header(path, size)
        found = SAFETENSORS
    else:
        raise _refuse(path, "is none of the formats clipsvd reads (safetensors, torch.save zip "
                      "or pickle, TorchScript): the file is corrupt or of another kind")
    expected = _SUFFIX_FORMATS.get(path.suffix.lower(), _TORCH_FORMATS)
    if found not in expected:
        suffix = ".safetensors" if found == SAFETENSORS else ".npz" if found == NUMPY_ZIP else ".pt"
        raise ModelError(f"checkpoint file {path} holds a {found} file but its name ends in "
                         f"{path.suffix or '(no suffix)'}, so it would be read as another "
                         f"format; rename it to end in {suffix}")
    return found


class _ArchiveObject:
    """Stands for an object of a class that the archive's own code defines (a module of the
    scripted model): it keeps the pickled state and runs nothing."""

    qualname = ""

    def __init__(self, *args: Any) -> None:
        self.state: Any = args

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass(frozen=True)
class _StorageType:
    dtype: torch.dtype


_STORAGE_TYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
}
# torch.jit._pickle's helpers are identities on plain Python values (they only restore static
# types that matter to TorchScript), so they are replaced by the identity here.
_IDENTITY_HELPERS = {"build_intlist", "build_tensorlist", "build_doublelist", "build_boollist",
                     "restore_type_tag"}


class _Unreadable(Exception):
    """Something in data.pkl that this reader will not build; the message says what."""


def _rebuild_tensor(storage: torch.Tensor, offset: int, size: tuple, stride: tuple,
                    requires_grad: bool = False, hooks: Any = None, metadata: Any = None
                    ) -> torch.Tensor:
    if not isinstance(storage, torch.Tensor):
        raise _Unreadable("a tensor without a storage")
    try:
        return torch.as_strided(storage, tuple(size), tuple(stride), int(offset))
    except RuntimeError as exc:
        raise _Unreadable(f"a tensor that does not fit its storage ({exc})") from None


def _rebuild_parameter(data: torch.Tensor, requires_grad: bool = False, hooks: Any = None
                       ) -> torch.Tensor:
    return data


class _WeightsReader:
    """Resolves the globals and persistent records of an archive's data.pkl: tensors from its
    data/ records, inert stand-ins for the archive's own classes, a few value constructors;
    every other global is refused."""

    def __init__(self, archive: zipfile.ZipFile, top: str, with_data: bool):
        self.archive = archive
        self.top = top
        self.with_data = with_data
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ArchiveObject,), {"qualname": qualified})
            return self.classes[qualified]
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if (module, name) == ("torch._utils", "_rebuild_parameter"):
            return _rebuild_parameter
        if module == "torch" and name in _STORAGE_TYPES:
            return _StorageType(_STORAGE_TYPES[name])
        if module == "torch.jit._pickle" and name in _IDENTITY_HELPERS:
            return _identity
        raise _Unreadable(f"it refers to {module}.{name}, which a weights-only reader does "
                          "not build")

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if (not isinstance(pid, tuple) or len(pid) != 5 or pid[0] != "storage"
                or not isinstance(pid[1], _StorageType)):
            raise _Unreadable(f"it holds a persistent record of an unknown kind ({pid!r:.60})")
        _, kind, key, _location, numel = pid
        key = str(key)
        if not self.with_data:  # structure only: shapes on the meta device, no bytes read
            if f"{self.top}/data/{key}" not in self.archive.NameToInfo:
                raise _Unreadable(f"its tensor data record data/{key} is missing")
            return torch.empty(int(numel), dtype=kind.dtype, device="meta")
        if key not in self.storages:
            try:
                raw = self.archive.read(f"{self.top}/data/{key}")
            except KeyError:
                raise _Unreadable(f"its tensor data record data/{key} is missing") from None
            flat = (torch.frombuffer(bytearray(raw), dtype=kind.dtype) if raw
                    else torch.empty(0, dtype=kind.dtype))
            if flat.numel() < int(numel):
                raise _Unreadable(f"its tensor data record data/{key} is truncated")
            self.storages[key] = flat
        return self.storages[key]


def _identity(value: Any, *_: Any) -> Any:
    return value


# Opcodes that push their argument (pickletools decodes it) or a constant.
_VALUE_OPCODES = {"BININT", "BININT1", "BININT2", "INT", "LONG", "LONG1", "LONG4", "BINFLOAT",
                  "FLOAT", "BINUNICODE", "SHORT_BINUNICODE", "BINUNICODE8", "UNICODE",
                  "BINSTRING", "SHORT_BINSTRING", "STRING", "BINBYTES", "SHORT_BINBYTES",
                  "BINBYTES8"}
_CONSTANT_OPCODES = {"NONE": None, "NEWTRUE": True, "NEWFALSE": False}


def _interpret(data: bytes, reader: _WeightsReader) -> Any:
    """Run a pickle's opcodes on a stack of plain values: the only calls are to what
    ``reader`` resolves (no module is imported, no pickle machinery builds objects)."""
    stack: list[Any] = []
    marks: list[int] = []
    memo: dict[Any, Any] = {}

    def since_mark() -> list[Any]:
        start = marks.pop()
        items = stack[start:]
        del stack[start:]
        return items

    for opcode, arg, _ in pickletools.genops(data):
        name = opcode.name
        if name in ("PROTO", "FRAME"):
            continue
        if name == "STOP":
            return stack.pop()
        if name in _VALUE_OPCODES:
            stack.append(arg)
        elif name in _CONSTANT_OPCODES:
            stack.append(_CONSTANT_OPCODES[name])
        elif name == "MARK":
            marks.append(len(stack))
        elif name in ("PUT", "BINPUT", "LONG_BINPUT"):
            memo[arg] = stack[-1]
        elif name == "MEMOIZE":
            memo[len(memo)] = stack[-1]
        elif name in ("GET", "BINGET", "LONG_BINGET"):
            stack.append(memo[arg])
        elif name == "GLOBAL":
            module, _, attribute = str(arg).partition(" ")
            stack.append(reader.find_class(module, attribute))
        elif name == "STACK_GLOBAL":
            attribute, module = stack.pop(), stack.pop()
            stack.append(reader.find_class(str(module), str(attribute)))
        elif name == "BINPERSID":
            stack.append(reader.persistent_load(stack.pop()))
        elif name in ("REDUCE", "NEWOBJ"):
            args, factory = stack.pop(), stack.pop()
            if name == "NEWOBJ" and not (isinstance(factory, type) and issubclass(
                    factory, (_ArchiveObject, collections.OrderedDict))):
                raise _Unreadable(f"it creates an object of {factory!r:.60}")
            if not callable(factory) or not isinstance(args, tuple):
                raise _Unreadable("it calls something that is not a constructor")
            stack.append(factory(*args))
        elif name == "BUILD":
            state = stack.pop()
            if not isinstance(stack[-1], _ArchiveObject):
                raise _Unreadable(f"it sets the state of {type(stack[-1]).__name__}")
            stack[-1].__setstate__(state)
        elif name == "EMPTY_TUPLE":
            stack.append(())
        elif name in ("TUPLE1", "TUPLE2", "TUPLE3"):
            count = int(name[-1])
            items = tuple(stack[-count:])
            del stack[-count:]
            stack.append(items)
        elif name == "TUPLE":
            stack.append(tuple(since_mark()))
        elif name == "EMPTY_LIST":
            stack.append([])
        elif name == "LIST":
            stack.append(since_mark())
        elif name == "APPEND":
            value = stack.pop()
            stack[-1].append(value)
        elif name == "APPENDS":
            items = since_mark()
            stack[-1].extend(items)
        elif name == "EMPTY_DICT":
            stack.append({})
        elif name == "DICT":
            items = since_mark()
            stack.append(dict(zip(items[::2], items[1::2])))
        elif name == "SETITEM":
            value, key = stack.pop(), stack.pop()
            stack[-1][key] = value
        elif name == "SETITEMS":
            items = since_mark()
            for key, value in zip(items[::2], items[1::2]):
                stack[-1][key] = value
        elif name == "POP":
            stack.pop()
        elif name == "POP_MARK":
            since_mark()
        elif name == "DUP":
            stack.append(stack[-1])
        else:
            raise _Unreadable(f"it uses the pickle instruction {name}, which a weights-only "
                              "reader does not run")
    raise _Unreadable("its data.pkl ends without a STOP")


@dataclass
class ScriptedCheckpoint:
    """What a TorchScript archive holds, read as data: every tensor attribute by its dotted
    path from the root module, and the qualified names of the archive's module classes."""

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    classes: set[str] = field(default_factory=set)

    def activation(self) -> str | None:
        """"QuickGELU" or "GELU" when the archive's modules say which one its MLPs use, else
        None (neither, or both)."""
        names = {qualified.rsplit(".", 1)[-1] for qualified in self.classes}
        quick, plain = "QuickGELU" in names, "GELU" in names
        if quick == plain:
            return None
        return "QuickGELU" if quick else "GELU"


def _collect(node: _ArchiveObject, prefix: str, found: ScriptedCheckpoint, seen: set[int]) -> None:
    if id(node) in seen:
        return
    seen.add(id(node))
    found.classes.add(node.qualname)
    state = node.state
    if not isinstance(state, dict):
        return
    for name, value in state.items():
        path = f"{prefix}{name}"
        if isinstance(value, torch.Tensor):
            found.tensors[path] = value
        elif isinstance(value, _ArchiveObject):
            _collect(value, f"{path}.", found, seen)


def read_torchscript(path: str | os.PathLike, with_data: bool = True) -> ScriptedCheckpoint:
    """The tensors and module classes of a TorchScript archive, without running its code.

    ``with_data`` False reads the structure only (tensors on the meta device: shapes and
    dtypes, no bytes), for checks that must not read weights.

    Raises a ModelError naming the file, with the command that converts it, when the archive
    holds anything this reader does not build.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            top = names[0].split("/", 1)[0]
            order = archive.read(f"{top}/byteorder").decode().strip() \
                if f"{top}/byteorder" in names else "little"
            if order != "little":
                raise _Unreadable(f"its tensors are stored {order}-endian")
            reader = _WeightsReader(archive, top, with_data)
            root = _interpret(archive.read(f"{top}/data.pkl"), reader)
    except _Unreadable as exc:
        raise ModelError(f"TorchScript file {path} cannot be read as weights only: {exc}; "
                         f"{convert_hint(path)}") from None
    except (zipfile.BadZipFile, EOFError, KeyError, IndexError, ValueError, TypeError,
            AttributeError, OSError) as exc:
        raise ModelError(f"TorchScript file {path} is corrupt ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0][:200] if str(exc) else 'no detail'}); "
                         "download it again") from None
    if not isinstance(root, _ArchiveObject):
        raise ModelError(f"TorchScript file {path} does not hold a module; "
                         f"{convert_hint(path)}")
    found = ScriptedCheckpoint()
    _collect(root, "", found, set())
    return found

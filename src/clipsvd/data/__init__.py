"""Data: sources -> one sample table -> MONAI preparation -> prepared store -> few-shot splits.

Modules: ``sources`` (folder, CSV manifest, MedMNIST npz, CoOp split JSON), ``groups``
(patients and studies: columns, patterns, DICOM ids, undeclared ids), ``readers`` (PIL modes
as a viewer shows them, why a file cannot be read), ``npz`` (arrays of an npz, streamed),
``prepare`` (MONAI chain, grouped split, store writer), ``fingerprint`` and ``listing`` (what
a store depends on, light enough for the workflow's DAG building), ``store`` (PreparedStore
reader, per-split summary), ``sampling`` (support sets, split files), ``demo`` (the offline
synthetic dataset). docs/data.md documents every format and option.
"""
from importlib import import_module

# Submodules load on first use, so light callers (the workflow's DAG building imports
# data.fingerprint) do not pay for MONAI, pandas and PIL.
_EXPORTS = {"generate_demo_dataset": "demo", "preparation_fingerprint": "fingerprint",
            "prepare_dataset": "prepare", "sample_split": "sampling", "write_split": "sampling",
            "read_source": "sources", "PreparedStore": "store"}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(import_module(f".{_EXPORTS[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

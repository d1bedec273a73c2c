"""Data: sources -> one sample table -> MONAI preparation -> prepared store -> few-shot splits.

Modules: ``sources`` (folder, CSV manifest, MedMNIST npz, CoOp split JSON), ``npz`` (arrays
of an npz, streamed), ``prepare`` (MONAI chain, grouped split, store writer, preparation
fingerprint), ``store`` (PreparedStore reader), ``sampling`` (support sets, split files),
``demo`` (the offline synthetic dataset). docs/data.md documents every format and option.
"""
from .demo import generate_demo_dataset
from .prepare import preparation_fingerprint, prepare_dataset
from .sampling import sample_split, write_split
from .sources import read_source
from .store import PreparedStore

__all__ = ["PreparedStore", "generate_demo_dataset", "preparation_fingerprint",
           "prepare_dataset", "read_source", "sample_split", "write_split"]

"""Data: sources -> one sample table -> MONAI preparation -> prepared store -> few-shot splits.

Modules: ``sources`` (folder / CSV manifest), ``prepare`` (MONAI chain, grouped split,
store writer), ``store`` (PreparedStore reader), ``sampling`` (support sets, split files),
``demo`` (the offline synthetic dataset).
"""
from .demo import generate_demo_dataset
from .prepare import prepare_dataset
from .sampling import sample_split, write_split
from .sources import read_source
from .store import PreparedStore

__all__ = ["PreparedStore", "generate_demo_dataset", "prepare_dataset", "read_source",
           "sample_split", "write_split"]

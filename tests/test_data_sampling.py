"""Few-shot sampling: counts, determinism, insufficient-class policies, nesting, base-to-novel."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from clipsvd.config import SamplingConfig
from clipsvd.data.sampling import sample_split, write_split
from clipsvd.data.store import PreparedStore
from clipsvd.errors import DataError
from clipsvd.io import write_json

CLASSES = ["a", "b", "c", "d", "e"]


def make_store(path: Path, per_split: dict[str, list[int]]) -> PreparedStore:
    """A tiny prepared store written directly: per_split[split][label] images of each class."""
    rows = []
    for split, counts in per_split.items():
        for label, count in enumerate(counts):
            for i in range(count):
                rows.append({"sample_id": f"{CLASSES[label]}/{split}_{i}.png",
                             "source_path": f"/data/{CLASSES[label]}/{split}_{i}.png",
                             "label": label, "class_name": CLASSES[label], "split": split,
                             "group": f"{CLASSES[label]}/{split}_{i}.png", "slice": ""})
    path.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(path / "index.csv", index=False)
    np.save(path / "images.npy", np.zeros((len(rows), 3, 4, 4), dtype=np.uint8))
    write_json(path / "classes.json", {"classes": CLASSES[:len(per_split["train"])]})
    write_json(path / "provenance.json", {"dataset": "toy", "source": {"root": "/data"}})
    return PreparedStore.open(path)


@pytest.fixture
def store(tmp_path) -> PreparedStore:
    return make_store(tmp_path / "store", {"train": [20, 20, 20, 20, 20], "val": [6] * 5,
                                           "test": [5, 6, 7, 8, 9]})


def test_counts_and_splits_respected(store):
    split = sample_split(store, "few_shot", 8, 1, SamplingConfig())
    assert len(split["train"]) == 8 * 5 and len(set(split["train"])) == 40
    assert len(split["val"]) == 4 * 5  # min(K, max_val_shots) per class
    index = store.index.set_index("sample_id")
    assert set(index.loc[split["train"], "split"]) == {"train"}
    assert set(index.loc[split["val"], "split"]) == {"val"}
    assert len(split["test"]) == 35 and set(index.loc[split["test"], "split"]) == {"test"}
    assert split["classes"] == CLASSES and "base_classes" not in split
    # Source paths relative to the dataset root: the same split file on every machine.
    assert "/data/" + split["train_paths"][0] == index.loc[split["train"][0], "source_path"]
    assert split["counts"]["c"]["train"] == {"available": 20, "wanted": 8, "drawn": 8,
                                             "unique": 8, "policy": "sampled"}
    assert store.rows(split["train"]).shape == (40,)


def test_byte_identical_for_same_seed_and_different_across_seeds(store, tmp_path):
    write_split(tmp_path / "one.json", sample_split(store, "few_shot", 4, 2, SamplingConfig()))
    write_split(tmp_path / "two.json", sample_split(store, "few_shot", 4, 2, SamplingConfig()))
    assert (tmp_path / "one.json").read_bytes() == (tmp_path / "two.json").read_bytes()
    other = sample_split(store, "few_shot", 4, 3, SamplingConfig())
    assert other["train"] != sample_split(store, "few_shot", 4, 2, SamplingConfig())["train"]


def test_zero_shot_has_only_a_test_list(store):
    split = sample_split(store, "few_shot", 0, 1, SamplingConfig())
    assert split["train"] == [] and split["val"] == [] and len(split["test"]) == 35


def test_insufficient_policies(tmp_path):
    small = make_store(tmp_path / "s", {"train": [10, 3, 10], "val": [4, 4, 4],
                                        "test": [2, 2, 2]})
    with pytest.raises(DataError) as info:
        sample_split(small, "few_shot", 5, 1, SamplingConfig())
    message = str(info.value)
    assert "'b' has 3" in message and "5" in message and "sampling.insufficient" in message
    replaced = sample_split(small, "few_shot", 5, 1, SamplingConfig(insufficient="replace"))
    b_ids = [i for i in replaced["train"] if i.startswith("b/")]
    assert len(b_ids) == 5 and len(set(b_ids)) == 3  # every image once, two repeats
    assert replaced["counts"]["b"]["train"]["policy"] == "replace"
    taken = sample_split(small, "few_shot", 5, 1, SamplingConfig(insufficient="all"))
    assert sorted(i for i in taken["train"] if i.startswith("b/")) == [
        f"b/train_{i}.png" for i in range(3)]
    assert taken["counts"]["b"]["train"]["policy"] == "all"
    assert taken["counts"]["a"]["train"]["policy"] == "sampled"


def test_nested_support_sets_are_prefixes(store):
    nested = SamplingConfig(nested=True)
    sets = {k: sample_split(store, "few_shot", k, 7, nested) for k in (1, 2, 4, 8)}
    for small, large in ((1, 2), (2, 4), (4, 8)):
        for name in CLASSES:
            inner = [i for i in sets[small]["train"] if i.startswith(f"{name}/")]
            outer = [i for i in sets[large]["train"] if i.startswith(f"{name}/")]
            assert outer[:small] == inner
    assert set(sets[2]["val"]) <= set(sets[4]["val"])
    assert sets[8]["policy"]["nested"] is True


def test_base_to_novel_groups(store):
    split = sample_split(store, "base_to_novel", 2, 1, SamplingConfig())
    assert split["base_classes"] == ["a", "b", "c"] and split["novel_classes"] == ["d", "e"]
    assert split["classes"] == ["a", "b", "c"]
    assert {i.split("/")[0] for i in split["train"] + split["val"]} == {"a", "b", "c"}
    assert {i.split("/")[0] for i in split["test"]} == {"a", "b", "c"}
    assert {i.split("/")[0] for i in split["test_novel"]} == {"d", "e"}
    assert len(split["test_novel"]) == 8 + 9 and not set(split["test"]) & set(split["test_novel"])
    few = sample_split(store, "few_shot", 2, 1, SamplingConfig())
    assert [i for i in few["train"] if i[0] in "abc"] == split["train"]  # same draw per class


def test_unknown_ids_and_settings(store):
    with pytest.raises(DataError, match="clipsvd sample"):
        store.rows(["nope.png"])
    with pytest.raises(DataError, match="unknown setting"):
        sample_split(store, "cross_dataset", 1, 1, SamplingConfig())

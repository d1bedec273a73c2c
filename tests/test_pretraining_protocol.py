"""Protocol 2 of the miniature (docs/miniature.md): nothing a study evaluates or draws support
sets from was in what the shipped model was pretrained on, checked by image content.

The overlap test reads the real MedMNIST files of ../shared/data/medmnist, hashes every image
the packaged pretraining recipe reads (its sources exactly as ``clipsvd pretrain`` opens them)
and every image of the miniature studies' test splits, validation splits and support pools
(their datasets exactly as ``clipsvd prepare`` reads them), and fails on any shared hash.
"""
from __future__ import annotations

import dataclasses
import gzip
from pathlib import Path

import numpy as np
import pytest

from clipsvd import config as study_config
from clipsvd.config import DatasetConfig, MedmnistConfig
from clipsvd.data import holdout
from clipsvd.data.demo import demo_images
from clipsvd.data.sources import classes_of, read_source
from clipsvd.errors import ConfigError, DataError
from clipsvd.models import format_prompts
from clipsvd.pretrain import evaluated_hashes, load_recipe, open_source

from test_medmnist_real import SHARED

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "src" / "clipsvd" / "pretrained" / "mini-clip-medmnist.yaml"
SHIPPED_LIST = holdout.hashes_path(RECIPE.with_suffix(".safetensors"))
MINIATURES = [ROOT / "config" / "studies" / name for name in ("miniature.yaml",)]

needs_medmnist = pytest.mark.skipif(
    not all((SHARED / f"{flag}.npz").is_file() for flag in ("bloodmnist", "organamnist",
                                                              "retinamnist")),
    reason=f"the MedMNIST files are not in {SHARED}")


def _recipe_hashes() -> dict[str, set[str]]:
    recipe = load_recipe(RECIPE)
    excluded = evaluated_hashes(recipe, SHARED)
    return {source.name: set(open_source(source, SHARED, 28, excluded=excluded).hashes())
            for source in recipe.sources}


def _study_datasets(path: Path) -> list[DatasetConfig]:
    cfg = study_config.load(path)
    return [dataclasses.replace(d, root=str(SHARED)) for d in cfg.datasets]


def _pools(dataset: DatasetConfig) -> dict[str, set[str]]:
    """The hashes of the dataset's test split, val split and support pool (its train split
    after the exclusion), as the prepare step keeps them."""
    table = read_source(dataset)
    if dataset.exclude_pretrained_on:
        table, _ = holdout.exclude_pretrained(table, dataset.exclude_pretrained_on, dataset.name)
    with np.load(table["source_path"].iloc[0]) as npz:
        arrays = {split: npz[f"{split}_images"] for split in ("train", "val", "test")}
    pools = {}
    for split, rows in table.groupby("split")["array_index"]:
        pools["support pool" if split == "train" else split] = set(
            holdout.array_hashes(arrays[split][rows.to_numpy()]))
    return pools


@needs_medmnist
def test_nothing_a_miniature_study_evaluates_or_draws_from_was_pretrained_on():
    pretrained = _recipe_hashes()
    corpus = set().union(*pretrained.values())
    assert len(corpus) > 10_000 and all(pretrained.values())
    # the shipped list is the recipe's, so studies exclude what the model really read
    assert holdout.read_hashes(SHIPPED_LIST) == corpus
    checked = 0
    for study in MINIATURES:
        for dataset in _study_datasets(study):
            assert dataset.exclude_pretrained_on == "mini-clip/medmnist", dataset.name
            for pool, hashes in _pools(dataset).items():
                shared = hashes & corpus
                assert not shared, (f"{study.name}: {len(shared)} images of {dataset.name}'s "
                                    f"{pool} are in the pretraining corpus")
                checked += len(hashes)
    assert checked > 50_000


def test_the_default_studys_demo_images_are_not_pretraining_images():
    recipe = load_recipe(RECIPE)
    demo = next(source for source in recipe.sources if source.demo is not None)
    pretrained = set(open_source(demo, None, 28).hashes())
    default = study_config.load(ROOT / "config" / "config.yaml").datasets[0].demo
    studied = {holdout.image_hash(np.rint(image * 255).astype(np.uint8))
               for *_, image in demo_images(default)}
    assert len(pretrained) == 400 and len(studied) == default.per_class * 4
    assert not pretrained & studied


def _tiny_medmnist(root: Path, flag: str = "retinamnist") -> Path:
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 20), ("val", 10), ("test", 10)):
        arrays[f"{split}_images"] = rng.integers(0, 256, (n, 28, 28, 3), dtype=np.uint8)
        arrays[f"{split}_labels"] = (np.arange(n) % 5).reshape(-1, 1)
    root.mkdir(parents=True, exist_ok=True)
    np.savez(root / f"{flag}.npz", **arrays)
    return root / f"{flag}.npz"


def _write_list(folder: Path, hashes) -> None:
    holdout.write_hashes(folder / "mini-clip-medmnist.images.txt.gz", hashes)


def test_exclusion_drops_pretrained_train_images_and_refuses_pretrained_test_images(
        tmp_path, monkeypatch):
    npz_path = _tiny_medmnist(tmp_path / "data")
    monkeypatch.setattr(holdout, "PRETRAINED_DIR", tmp_path)
    with np.load(npz_path) as npz:
        train, test = npz["train_images"], npz["test_images"]
    dataset = DatasetConfig(name="retina", format="medmnist", root=str(tmp_path / "data"),
                            medmnist=MedmnistConfig(flag="retinamnist"),
                            exclude_pretrained_on="mini-clip/medmnist")
    _write_list(tmp_path, holdout.array_hashes(train[:7]))
    table, summary = holdout.exclude_pretrained(read_source(dataset), "mini-clip/medmnist",
                                                "retina")
    kept = table[table["split"] == "train"]["array_index"].tolist()
    assert kept == list(range(7, 20))
    assert summary["train_images_dropped"] == 7 and summary["train_images_kept"] == 13
    assert len(table[table["split"] != "train"]) == 20

    _write_list(tmp_path, holdout.array_hashes(test[3:5]))
    with pytest.raises(DataError) as error:
        holdout.exclude_pretrained(read_source(dataset), "mini-clip/medmnist", "retina")
    message = str(error.value)
    assert "2 val/test image(s)" in message and "test/000003" in message
    assert "\n" not in message


def test_exclusion_names_the_key_when_the_model_ships_no_list(tmp_path):
    raw = {"study": "s", "datasets": [{"name": "d", "format": "medmnist", "root": str(tmp_path),
                                       "medmnist": {"flag": "retinamnist"},
                                       "exclude_pretrained_on": "mini-clip/openai"}]}
    with pytest.raises(ConfigError) as error:
        study_config.from_dict(raw, "s.yaml")
    assert "s.yaml: key 'datasets.0.exclude_pretrained_on'" in str(error.value)
    assert "mini-clip/medmnist" in str(error.value)


def test_the_partition_is_fixed_by_its_seed_and_share():
    first = holdout.pretraining_part(1080, 0.5, 0)
    assert first.sum() == 540
    assert np.array_equal(first, holdout.pretraining_part(1080, 0.5, 0))
    assert not np.array_equal(first, holdout.pretraining_part(1080, 0.5, 1))
    assert holdout.pretraining_part(10, 1.0, 0).all()


def test_the_hash_list_is_byte_identical_for_equal_content(tmp_path):
    holdout.write_hashes(tmp_path / "a.gz", ["b" * 64, "a" * 64, "b" * 64])
    holdout.write_hashes(tmp_path / "b.gz", ["a" * 64, "b" * 64])
    assert (tmp_path / "a.gz").read_bytes() == (tmp_path / "b.gz").read_bytes()
    assert gzip.decompress((tmp_path / "a.gz").read_bytes()).decode().split() == [
        "a" * 64, "b" * 64]


def test_retinamnist_grades_reach_the_prompt_in_words(tmp_path):
    _tiny_medmnist(tmp_path)
    miniature = {d.name: d for d in study_config.load(MINIATURES[0]).datasets}["retinamnist"]
    dataset = DatasetConfig(name="retinamnist", format="medmnist", root=str(tmp_path),
                            medmnist=MedmnistConfig(flag="retinamnist"),
                            templates=miniature.templates, class_names=miniature.class_names)
    table = read_source(dataset)
    classes = classes_of(table)
    prompts = format_prompts(classes, dataset.templates)
    assert prompts[2] == "a retinal fundus photograph showing moderate diabetic retinopathy."
    assert not any(grade in prompts for grade in ("0", "1", "2", "3", "4"))
    assert table["class_name"].iloc[4] == "proliferative diabetic retinopathy"
    assert table["source_class_name"].iloc[4] == "4"


def test_class_names_that_name_no_class_are_refused_in_one_line(tmp_path):
    _tiny_medmnist(tmp_path)
    dataset = DatasetConfig(name="retina", format="medmnist", root=str(tmp_path),
                            medmnist=MedmnistConfig(flag="retinamnist"),
                            class_names={"5": "very severe"})
    with pytest.raises(DataError) as error:
        read_source(dataset)
    assert "key 'class_names.5': no class of that name" in str(error.value)
    assert "\n" not in str(error.value)

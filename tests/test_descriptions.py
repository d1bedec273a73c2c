"""BiomedCoOp's class descriptions: the shipped files cover every class of the studies that
use them, in words mini-clip's vocabulary holds; a study is checked for its files when loaded."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from clipsvd import config
from clipsvd.data.demo import CLASSES as DEMO_CLASSES
from clipsvd.data.sources import medmnist_labels
from clipsvd.descriptions import SHIPPED, class_descriptions, shipped_file
from clipsvd.errors import ConfigError
from clipsvd.models import load_model

ROOT = Path(__file__).resolve().parents[1]
STUDIES = [ROOT / "config" / "config.yaml", ROOT / "config" / "studies" / "miniature.yaml"]


def prompt_classes(dataset) -> list[str]:
    """The class names the dataset's prompts use (its class_names applied)."""
    names = list(medmnist_labels(dataset.medmnist.flag)) if dataset.medmnist else list(DEMO_CLASSES)
    renamed = {str(k): v for k, v in (dataset.class_names or {}).items()}
    return [renamed.get(n, n) for n in names]


def bundled_datasets():
    for path in STUDIES:
        raw = yaml.safe_load(path.read_text())
        for d in raw["datasets"]:
            if d.get("root", "").startswith("../shared"):
                d["root"] = "x"  # the shared data is not needed to read the class names
        cfg = config.from_dict(raw, str(path))
        for dataset in cfg.datasets:
            yield path.name, dataset


@pytest.mark.parametrize("study,dataset", list(bundled_datasets()),
                         ids=lambda v: v if isinstance(v, str) else v.name)
def test_shipped_descriptions_cover_every_class_in_words_mini_clip_knows(study, dataset):
    """Catches a class renamed in a study without its descriptions, a file with unequal
    counts, and a sentence with a word mini-clip would spell out in letters or cut at its
    32-token context."""
    path = shipped_file(dataset)
    assert path is not None, f"{study}: {dataset.name} has no shipped description file"
    sentences = class_descriptions(path, prompt_classes(dataset))
    tokenizer = load_model("mini-clip", "medmnist").tokenizer
    for per_class in sentences:
        assert len(per_class) >= 5
        for sentence in per_class:
            ids = tokenizer([sentence])[0]
            assert int(ids[-1]) == 0, f"{path.name}: {sentence!r} fills the whole context"
            pieces = tokenizer.tokenizer.convert_ids_to_tokens([int(i) for i in ids if i])
            assert not [p for p in pieces if p.startswith("##")], (
                f"{path.name}: {sentence!r} has a word not in mini-clip's vocabulary: {pieces}")


def test_every_shipped_file_belongs_to_a_dataset():
    flags = {p.stem for p in SHIPPED.glob("*.yaml")}
    assert flags == {"demo", "bloodmnist", "organamnist", "retinamnist"}


def study(**dataset):
    return {"study": "s", "methods": ["zero_shot", "biomedcoop"],
            "datasets": [{"name": "d", "format": "csv", "root": "x", "manifest": "m.csv",
                          **dataset}]}


def test_a_study_is_checked_for_its_description_files_when_loaded(tmp_path):
    with pytest.raises(ConfigError, match=r"^<config>: key 'datasets.0.descriptions': BiomedCoOp "
                                          "needs class descriptions for this dataset and clipsvd "
                                          "ships none for it; write a YAML file"):
        config.from_dict(study())
    with pytest.raises(ConfigError, match=r"^<config>: key 'datasets.0.descriptions': .*none.yaml: "
                                          "description file not found"):
        config.from_dict(study(descriptions=str(tmp_path / "none.yaml")))
    bad = tmp_path / "bad.yaml"
    bad.write_text("cyst: sentences\n")
    with pytest.raises(ConfigError, match="bad.yaml: class 'cyst' needs a non-empty list"):
        config.from_dict(study(descriptions=str(bad)))
    good = tmp_path / "good.yaml"
    good.write_text("cyst: [a round lesion.]\ntumor: [a solid mass.]\n")
    cfg = config.from_dict(study(descriptions=str(good)))
    assert cfg.dataset("d").descriptions == str(good)
    assert cfg.biomedcoop.lr == 0.0025 and cfg.biomedcoop.batch_size == 4
    assert (cfg.biomedcoop.sccm_lambda, cfg.biomedcoop.kdsp_lambda, cfg.biomedcoop.tau) == (
        1.0, 1.0, 1.5)
    # without the method, no file is needed
    assert config.from_dict({**study(), "methods": ["zero_shot"]}).dataset("d").descriptions is None


def test_a_dataset_override_names_only_its_methods_settings(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text("cyst: [a round lesion.]\ntumor: [a solid mass.]\n")
    cfg = config.from_dict(study(descriptions=str(good),
                                 overrides={"biomedcoop": {"sccm_lambda": 0.25, "tau": 2.0}}))
    settings = cfg.training("biomedcoop", "d")
    assert (settings.sccm_lambda, settings.kdsp_lambda, settings.tau) == (0.25, 1.0, 2.0)
    with pytest.raises(ConfigError, match=r"key 'datasets.0.overrides.clip_svd.w': clip_svd has "
                                          "no such setting"):
        config.from_dict(study(descriptions=str(good), overrides={"clip_svd": {"w": 2.0}}))

"""The study config: defaults, and one line naming the key for every mistake."""
import pytest

from clipsvd import config
from clipsvd.errors import ConfigError

MINIMAL = {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "data"}]}


def with_(**changes):
    raw = {**MINIMAL, **changes}
    return raw


def test_default_study_loads():
    cfg = config.load("config/config.yaml")
    assert cfg.study == "demo"
    assert cfg.shots == (1, 2, 4) and cfg.seeds == (1, 2)
    assert cfg.methods == ("zero_shot", "linear_probe", "coop", "clip_lora", "comp_lora",
                           "clip_svd")
    assert cfg.datasets[0].demo is not None


def test_defaults_are_filled():
    cfg = config.from_dict(MINIMAL)
    assert cfg.settings == ("few_shot",)
    assert cfg.clip_svd.epochs == config.DEFAULT_EPOCHS
    assert cfg.clip_svd.matrices == ("q", "k", "v", "out", "mlp")
    assert cfg.datasets[0].preprocessing.intensity == "percentile"
    assert cfg.model.name == "tiny-clip"
    assert cfg.threads == 2 and cfg.clip_svd.execution == "auto"


def test_fingerprint_changes_with_content():
    a = config.from_dict(MINIMAL)
    b = config.from_dict(with_(shots=[1, 2]))
    assert a.fingerprint() == config.from_dict(MINIMAL).fingerprint()
    assert a.fingerprint() != b.fingerprint()


@pytest.mark.parametrize("raw, key", [
    (with_(shots=[-1]), "shots.0"),
    (with_(shots=[0]), "shots.0"),
    (with_(seeds=[]), "seeds"),
    (with_(methods=["prompt_tuning"]), "methods.0"),
    (with_(datasets=[{"name": "d", "format": "zip", "root": "r"}]), "datasets.0.format"),
    (with_(datasets=[{"name": "d e", "format": "folder", "root": "r"}]), "datasets.0.name"),
    (with_(datasets=[{"name": "d", "format": "folder", "root": "r"}] * 2), "datasets"),
    (with_(datasets=[{"name": "d", "format": "csv", "root": "r"}]), "datasets.0.manifest"),
    (with_(datasets=[{"name": "d", "format": "folder", "root": "r", "templates": ["no slot"]}]),
     "datasets.0.templates.0"),
    (with_(shotz=[1]), "shotz"),
    (with_(clip_svd={"layers": "top"}), "clip_svd.layers"),
    (with_(clip_svd={"epochs": 3, "iterations_per_shot": 100}), "clip_svd"),
    (with_(clip_svd={"crop_scale": [0.9, 0.1]}), "clip_svd.crop_scale"),
    (with_(model={"logit_scale": -1}), "model.logit_scale"),
    (with_(threads=0), "threads"),
    (with_(clip_svd={"execution": "fast"}), "clip_svd.execution"),
    (with_(settings=["base_to_novel"]), "methods"),  # default methods (probe), no few_shot
])
def test_errors_name_the_key(raw, key):
    with pytest.raises(ConfigError) as info:
        config.from_dict(raw, "study.yaml")
    message = str(info.value)
    assert message.startswith("study.yaml: key ") and f"'{key}'" in message
    assert "\n" not in message


def test_malformed_yaml_names_file_and_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("study: x\ndatasets: [\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: not valid YAML \(line"):
        config.load(path)


def test_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        config.load(tmp_path / "nope.yaml")


# The public CLIP-SVD configs (github.com/HealthX-Lab/CLIP-SVD at 022b1ed), transcribed:
# configs/few_shot/<name>.yaml and configs/base2new/<name>.yaml, as (lr, train_epochs,
# template, blocks of include_train_layers). Every one has batch_size 32, weight_decay 0,
# both encoders and q, k, v, o_proj and mlp trained; docs/studies.md compares the rest.
ALL_BLOCKS = tuple(range(12))
PUBLIC_FEW_SHOT = {
    "BTMRI": (7e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "BUSI": (2e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "CHMNIST": (7e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "COVID_19": (5e-4, 100, "a chest xray of {}.", ALL_BLOCKS),
    "CTKidney": (1e-3, 200, "a photo of a {}.", ALL_BLOCKS),
    "KneeXray": (8e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "Kvasir": (5e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "LungColon": (3e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "OCTMNIST": (1e-2, 100, "a photo of a {}.", ALL_BLOCKS),
    "RETINA": (7e-3, 100, "a photo of a {}.", ALL_BLOCKS),
}
PUBLIC_BASE_TO_NOVEL = {
    "BTMRI": (9e-3, 100, "a photo of a {}.", ALL_BLOCKS),
    "CHMNIST": (1e-3, 60, "a photo of a {}.", ALL_BLOCKS),
    "COVID_19": (2e-3, 50, "a photo of a {}.", ALL_BLOCKS),
    "CTKidney": (1e-2, 200, "a photo of a {}.", tuple(range(4, 12))),  # top_middle
    "KneeXray": (2e-3, 60, "a photo of a {}.", ALL_BLOCKS),
    "Kvasir": (3e-3, 60, "a photo of a {}.", ALL_BLOCKS),
    "LungColon": (1e-2, 100, "a photo of a {}.", ALL_BLOCKS),
    "OCTMNIST": (2e-2, 100, "a photo of a {}.", ALL_BLOCKS),
    "RETINA": (2e-2, 60, "a photo of a {}.", ALL_BLOCKS),
}


@pytest.mark.parametrize("study, public", [("biomedclip_few_shot", PUBLIC_FEW_SHOT),
                                           ("biomedclip_base_to_novel", PUBLIC_BASE_TO_NOVEL)])
def test_paper_studies_match_the_public_clip_svd_configs(study, public):
    """Issue 16.4: the base-to-novel study prompted COVID with the few-shot config's
    'a chest xray of {}.' and trained all blocks of CTKidney where the public config trains
    blocks 4-11. Each dataset's resolved CLIP-SVD settings (overrides applied) must equal
    the public config's, and the shared ones the public values (docs/studies.md). Catches
    either old value, and any later drift of a learning rate, length or template."""
    from clipsvd.adapters.svd import resolve_layers

    cfg = config.load(f"config/studies/{study}.yaml")
    assert {d.name for d in cfg.datasets} == set(public)
    assert cfg.model.name == "hf-hub:microsoft/BiomedCLIP-PubMedBERT_256-vit_base_patch16_224"
    assert cfg.model.logit_scale == "model" and cfg.seeds == (1, 2, 3)
    for dataset in cfg.datasets:
        lr, epochs, template, blocks = public[dataset.name]
        settings = cfg.training("clip_svd", dataset.name)
        assert (settings.lr, settings.epochs, settings.iterations_per_shot) == (lr, epochs, None)
        assert dataset.templates == (template,), dataset.name
        assert tuple(resolve_layers(settings.layers, 12)) == blocks, dataset.name
        assert (settings.batch_size, settings.weight_decay, settings.min_lr) == (32, 0.0, 1e-6)
        assert set(settings.encoders) == {"vision", "text"}
        assert set(settings.matrices) == {"q", "k", "v", "out", "mlp"}
        assert tuple(settings.crop_scale) == (0.08, 1.0) and settings.flip
        assert settings.precision == "fp16"
        for baseline in ("clip_lora", "comp_lora"):
            assert cfg.training(baseline, dataset.name).precision == "fp16"


def test_a_dataset_override_can_choose_the_layers():
    """`layers` in a dataset's overrides applies to that dataset only (the public CTKidney
    base-to-novel config); without an override the method's own layers hold. Catches a schema
    default for the override filling 'all' into every dataset that overrides anything."""
    raw = {**MINIMAL, "clip_svd": {"layers": "top4"}, "datasets": [
        {"name": "d", "format": "folder", "root": "data",
         "overrides": {"clip_svd": {"lr": 0.1, "layers": [4, 5]}}},
        {"name": "e", "format": "folder", "root": "data", "overrides": {"clip_svd": {"lr": 0.1}}}]}
    cfg = config.from_dict(raw)
    assert cfg.training("clip_svd", "d").layers == (4, 5)  # as a study-level list is
    assert cfg.training("clip_svd", "e").layers == "top4"
    with pytest.raises(ConfigError, match="overrides.clip_svd.layers"):
        config.from_dict({**raw, "datasets": [{"name": "d", "format": "folder", "root": "data",
                                               "overrides": {"clip_svd": {"layers": "upper"}}}]})


def test_linear_probe_sits_out_base_to_novel():
    """The probe has weights only for its training (base) classes: on novel classes it would
    score class i with base class i's weights, a silent wrong result. So it runs in few-shot
    only, and a study with no few-shot setting cannot ask for it. Catches the probe listed
    among base-to-novel's methods, and the check gone."""
    with pytest.raises(ConfigError, match="remove linear_probe from methods or add few_shot"):
        config.from_dict(with_(methods=["zero_shot", "linear_probe"], settings=["base_to_novel"]))
    assert config.from_dict(with_(methods=["zero_shot", "clip_svd"], settings=["base_to_novel"]))
    both = config.from_dict(with_(methods=["zero_shot", "linear_probe", "clip_svd"],
                                  settings=["few_shot", "base_to_novel"]))
    assert both.methods_of("few_shot") == ("zero_shot", "linear_probe", "clip_svd")
    assert both.methods_of("base_to_novel") == ("zero_shot", "clip_svd")


def test_command_line_values_are_typed_as_in_a_study_file():
    """Snakemake hands nested `--config` values over as strings (YAML's BaseLoader); they are
    read again as YAML scalars. Catches numbers or booleans left as strings (the schema then
    refuses `seeds=[3]`) and strings that only look like something else turned into it."""
    given = {"study": "s", "seeds": ["3"], "clip_svd": {"lr": "0.02", "min_lr": "1e-5",
                                                         "flip": "false", "layers": "top4"},
             "tracking": {"uri": "null"}, "datasets": [{"name": "nan", "templates": ["a {}"]}]}
    assert config.typed_overrides(given) == {
        "study": "s", "seeds": [3], "clip_svd": {"lr": 0.02, "min_lr": 1e-5, "flip": False,
                                                  "layers": "top4"},
        "tracking": {"uri": None}, "datasets": [{"name": "nan", "templates": ["a {}"]}]}
    assert config.typed_overrides({"threads": 2, "x": True}) == {"threads": 2, "x": True}


def test_small_numbers_survive_the_resolved_config_the_jobs_read(tmp_path):
    """The workflow writes the resolved config as JSON, which writes 1e-05 without a decimal
    point; read back through YAML 1.1 that is text, and every job of a study with a learning
    rate below 1e-4 failed (caught by the miniature's full fine-tuning at lr 1e-5)."""
    raw = {"study": "s", "datasets": [{"name": "d", "format": "folder", "root": "x"}],
           "full_finetune": {"lr": 1e-5}, "coop": {"warmup_lr": 5e-6}}
    config.write_resolved(raw, tmp_path / "s.json")
    assert '"lr": 1e-05' in (tmp_path / "s.json").read_text()
    cfg = config.load(tmp_path / "s.json")
    assert cfg.full_finetune.lr == 1e-5 and cfg.coop.warmup_lr == 5e-6


def test_an_exponent_without_a_decimal_point_is_explained(tmp_path):
    """YAML 1.1 (PyYAML, Snakemake) reads `1e-5` as text: the line says how to write it."""
    study = tmp_path / "s.yaml"
    study.write_text("study: s\ndatasets: [{name: d, format: folder, root: x}]\n"
                     "clip_svd: {lr: 1e-5}\n", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"key 'clip_svd.lr': '1e-5' is read as text by YAML, "
                                          r"not as a number; write it with a decimal point "
                                          r"\(1.0e-5\) or in plain decimals"):
        config.load(study)

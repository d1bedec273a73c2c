"""Patient grouping and the per-split table (issue 15, point 1, and the labels of point 5).

The manifest of the issue (72 images, 36 patients, 2 views each, headers filepath, diagnosis,
patient_id) and fabricated folder and DICOM datasets: declared, no patient lies in two splits;
undeclared, preparation stops and says how to declare the ids.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from data_helpers import assert_prepare_fails_cleanly
from clipsvd.config import (ColumnsConfig, ConfigError, DatasetConfig, GroupsConfig,
                            SamplingConfig, from_dict)
from clipsvd.data.prepare import prepare_dataset
from clipsvd.data.sampling import sample_split
from clipsvd.data.store import PreparedStore, split_summary
from clipsvd.errors import DataError

from test_data_prepare import blob, write_dicom, write_manifest, write_png

PATIENTS, VIEWS = 36, 2


def leaky_manifest(root: Path) -> Path:
    """The issue's manifest: filepath, diagnosis, patient_id; views of a patient side by side."""
    lines = ["filepath,diagnosis,patient_id"]
    for patient in range(PATIENTS):
        for view in range(VIEWS):
            number = patient * VIEWS + view
            write_png(root / "img" / f"scan_{number:03d}.png", blob(number, 8))
            lines.append(f"img/scan_{number:03d}.png,{'tumor' if patient % 2 else 'normal'},"
                         f"PT-{patient:03d}")
    (root / "manifest.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def csv_dataset(root: Path, columns: ColumnsConfig = ColumnsConfig(),
                groups: GroupsConfig = GroupsConfig(), **extra) -> DatasetConfig:
    return DatasetConfig(name="leak", format="csv", root=str(root), manifest="manifest.csv",
                         columns=columns, groups=groups, **extra)


def crossing(store: PreparedStore) -> int:
    """Groups (patients) that lie in more than one split."""
    return int((store.index.groupby("group")["split"].nunique() > 1).sum())


def prepared(dataset: DatasetConfig, out: Path) -> PreparedStore:
    prepare_dataset(dataset, out, 8)
    return PreparedStore.open(out)


RENAMED = ColumnsConfig(path="filepath", label="diagnosis")


def test_manifest_headers_are_named_in_the_config(tmp_path):
    """Catches: a manifest whose headers differ cannot be read without editing the file; each
    header missing is a line of one error."""
    root = leaky_manifest(tmp_path / "m")
    assert_prepare_fails_cleanly(csv_dataset(root), tmp_path,
                                 "manifest.csv: needs a 'path' column (has: filepath, diagnosis, "
                                 "patient_id); rename the header that holds the image paths, "
                                 "or name it in the dataset's columns.path",
                                 "manifest.csv: needs a 'label' column (has: filepath, diagnosis, "
                                 "patient_id); rename the header that holds the class names or "
                                 "ids, or name it in the dataset's columns.label")
    assert_prepare_fails_cleanly(csv_dataset(root, ColumnsConfig(path="file")), tmp_path,
                                 "has no column 'file' (columns.path",
                                 "needs a 'label' column")


def test_declared_patient_column_keeps_every_patient_in_one_split(tmp_path):
    """The issue's acceptance: with the patient column declared, zero patients in two splits.
    Catches: the group column ignored (21 of 36 patients crossed splits in the issue)."""
    root = leaky_manifest(tmp_path / "m")
    store = prepared(csv_dataset(root, ColumnsConfig(path="filepath", label="diagnosis",
                                                     group="patient_id")), tmp_path / "p")
    assert crossing(store) == 0
    assert store.index["group"].nunique() == PATIENTS
    assert "patient_id" not in store.index.columns  # it is the group now
    splits = store.provenance["splits"]
    assert sum(s["groups"] for s in splits.values()) == PATIENTS
    assert sum(s["images"] for s in splits.values()) == PATIENTS * VIEWS
    assert store.provenance["groups"]["images_by_source"] == {"column": PATIENTS * VIEWS}


def test_undeclared_patient_column_stops_with_how_to_declare_it(tmp_path):
    """The issue's acceptance: without the declaration preparation stops. Catches: a split made
    image by image while a patient_id column sits in the manifest."""
    root = leaky_manifest(tmp_path / "m")
    assert_prepare_fails_cleanly(
        csv_dataset(root, RENAMED), tmp_path,
        "manifest.csv: column 'patient_id' looks like patient or study ids (36 values over 72 "
        "rows) but is not the group; set the dataset's columns.group: patient_id, or "
        "groups.independent: true if every image is independent")


def test_independent_images_are_an_explicit_choice(tmp_path):
    """groups.independent: true splits image by image, as asked (and says so in provenance);
    with a group column in the manifest too, it stops: the two contradict each other."""
    root = leaky_manifest(tmp_path / "m")
    store = prepared(csv_dataset(root, RENAMED, GroupsConfig(independent=True)), tmp_path / "p")
    assert store.index["group"].nunique() == PATIENTS * VIEWS
    assert store.provenance["groups"]["independent"] is True
    manifest = root / "manifest.csv"
    manifest.write_text(manifest.read_text().replace("patient_id", "group", 1))
    assert_prepare_fails_cleanly(csv_dataset(root, RENAMED, GroupsConfig(independent=True)),
                                 tmp_path, "groups.independent is true, but the manifest's "
                                           "group column gives 72 images a group")


def folder_with_ids(root: Path, layout: str) -> Path:
    """24 patients in two classes, 3 images each; the id in the file name or a sub-folder."""
    for patient in range(24):
        label = "glioma" if patient % 2 else "normal"
        for view in range(3):
            name = (f"{label}/patient{patient:02d}_view{view}.png" if layout == "names"
                    else f"{label}/P{patient:03d}/slice{view}.png")
            write_png(root / name, blob(patient * 3 + view, 8))
    return root


@pytest.mark.parametrize("layout, message, pattern, first_group", [
    ("names", "file names look like they hold patient ids (e.g. 'patient01' in "
              "'glioma/patient01_view0.png'; 24 ids over 72 images) but no group is declared; "
              "set the dataset's groups.pattern, e.g. '(patient[-_ ]?[0-9]+)'",
     "(patient[0-9]+)_", "patient00"),
    ("folders", "images sit in sub-folders of the class folders (e.g. "
                "'glioma/P001/slice0.png'; 24 sub-folders over 72 images)",
     "^[^/]+/([^/]+)/", "P000"),
])
def test_folder_format_groups_by_pattern(tmp_path, layout, message, pattern, first_group):
    """Undeclared ids in file or folder names stop preparation; the pattern groups by them.
    Catches: every image of the folder format being its own group."""
    root = folder_with_ids(tmp_path / layout, layout)
    dataset = DatasetConfig(name="f", format="folder", root=str(root))
    assert_prepare_fails_cleanly(dataset, tmp_path, message)
    store = prepared(DatasetConfig(name="f", format="folder", root=str(root),
                                   groups=GroupsConfig(pattern=pattern)), tmp_path / "p")
    assert crossing(store) == 0 and store.index["group"].nunique() == 24
    assert first_group in set(store.index["group"])


def test_a_pattern_that_misses_an_image_stops(tmp_path):
    root = folder_with_ids(tmp_path / "f", "names")
    write_png(root / "glioma" / "unnamed.png", blob(99, 8))
    dataset = DatasetConfig(name="f", format="folder", root=str(root),
                            groups=GroupsConfig(pattern="(patient[0-9]+)_"))
    assert_prepare_fails_cleanly(dataset, tmp_path, "groups.pattern '(patient[0-9]+)_' finds "
                                                    "no group in 'glioma/unnamed.png'")


def write_patient_dicom(path: Path, patient: str, study: str, seed: int) -> None:
    import pydicom

    write_dicom(path, np.random.default_rng(seed).integers(0, 2000, (8, 8)))
    ds = pydicom.dcmread(path)
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.save_as(path, enforce_file_format=True)


def dicom_folder(root: Path, same_patient: bool = False) -> Path:
    """24 patients, one study each with two images; file names carry no id."""
    for patient in range(24):
        label = "cancer" if patient % 2 else "benign"
        for view in range(2):
            number = patient * 2 + view
            write_patient_dicom(root / label / f"image_{number:03d}.dcm",
                                "ANONYMOUS" if same_patient else f"P{patient:02d}",
                                f"1.2.3.{patient}", number)
    return root


def test_dicom_images_are_grouped_by_patient_by_default(tmp_path):
    """The fabricated DICOM case: PatientID groups by default, StudyInstanceUID on request.
    Catches: DICOM files split image by image (their PatientID unused)."""
    root = dicom_folder(tmp_path / "d")
    store = prepared(DatasetConfig(name="d", format="folder", root=str(root)), tmp_path / "p")
    assert crossing(store) == 0
    assert sorted(set(store.index["group"]))[:2] == ["P00", "P01"]
    assert store.provenance["groups"]["images_by_source"] == {"dicom": 48}
    by_study = prepared(DatasetConfig(name="d", format="folder", root=str(root),
                                      groups=GroupsConfig(dicom="study")), tmp_path / "s")
    assert "1.2.3.0" in set(by_study.index["group"]) and crossing(by_study) == 0


def test_anonymised_dicom_ids_stop_instead_of_one_group(tmp_path):
    root = dicom_folder(tmp_path / "d", same_patient=True)
    assert_prepare_fails_cleanly(
        DatasetConfig(name="d", format="folder", root=str(root)), tmp_path,
        "all 48 DICOM images have PatientID 'ANONYMOUS' (anonymised?), so they would form one "
        "group and one split; set groups.dicom: study (StudyInstanceUID)")


def test_given_split_that_puts_a_group_in_two_splits_is_reported(tmp_path, caplog):
    """A manifest split column that puts patient p1 in train and test: a warning naming it,
    and provenance.json counts it. Catches: a crossing given split passing without a word."""
    root = tmp_path / "s"
    lines = ["path,label,split,group"]
    for i in range(12):
        write_png(root / f"{i}.png", blob(i, 8))
        split = ("train", "val", "test")[i % 3]
        lines.append(f"{i}.png,{'ab'[i % 2]},{split},p{i // 2}")
    write_manifest(root, lines)
    with caplog.at_level(logging.WARNING, logger="clipsvd.data.prepare"):
        store = prepared(csv_dataset(root), tmp_path / "p")
    crossed = store.provenance["split"]["groups_in_several_splits"]
    assert crossed["count"] == 6
    assert crossed["examples"][0] == {"group": "p0", "splits": ["train", "val"]}
    assert "6 group(s) lie in more than one split of the source (e.g. 'p0' in train and val)" \
        in caplog.text
    assert any("6 group(s)" in w for w in store.provenance["warnings"])


def test_coop_split_file_with_a_pattern_reports_crossing_patients(tmp_path, caplog):
    root = tmp_path / "BUSI"
    entries = {"train": [], "val": [], "test": []}
    for i in range(9):
        rel = f"{'ab'[i % 2]}/case{i // 3}_{i}.png"
        write_png(root / "BUSI" / rel, blob(i, 8))
        entries[("train", "val", "test")[i % 3]].append([rel, i % 2, "ab"[i % 2]])
    (root / "split_BUSI.json").write_text(json.dumps(entries))
    dataset = DatasetConfig(name="busi", format="coop_json", root=str(root),
                            groups=GroupsConfig(pattern="(case[0-9]+)_"))
    with caplog.at_level(logging.WARNING, logger="clipsvd.data.prepare"):
        store = prepared(dataset, tmp_path / "p")
    assert store.provenance["split"]["groups_in_several_splits"]["count"] == 3
    assert "3 group(s) lie in more than one split" in caplog.text


def test_split_summary_counts_images_groups_and_classes(tmp_path, caplog):
    """provenance.json 'splits' and the log line; every class in every split's per_class.
    Catches: no per-split table anywhere (the issue), a class missing from a split not shown."""
    root = leaky_manifest(tmp_path / "m")
    dataset = csv_dataset(root, ColumnsConfig(path="filepath", label="diagnosis",
                                              group="patient_id"))
    with caplog.at_level(logging.INFO, logger="clipsvd.data.prepare"):
        store = prepared(dataset, tmp_path / "p")
    summary = split_summary(store.index)
    assert store.provenance["splits"] == summary
    for split, row in summary.items():
        part = store.index[store.index["split"] == split]
        assert row == {"images": len(part), "groups": part["group"].nunique(),
                       "classes": part["class_name"].nunique(),
                       "per_class": {"normal": int((part["class_name"] == "normal").sum()),
                                     "tumor": int((part["class_name"] == "tumor").sum())}}
    line = (f"dataset 'leak' per split: train {summary['train']['images']} images / "
            f"{summary['train']['groups']} groups / 2 classes")
    assert line in caplog.text
    lonely = split_summary(store.index[(store.index["class_name"] == "normal")
                                       | (store.index["split"] == "train")])
    assert lonely["test"]["per_class"]["tumor"] == 0 and lonely["test"]["classes"] == 1


def test_a_class_with_one_image_is_named_and_sampling_says_what_to_do(tmp_path, caplog):
    """A class with one image gets 0 val and 0 test images: a warning names it; sampling then
    stops with advice that does not contradict itself. Catches: no word at preparation, and
    "replace cannot help ... set replace" in one message."""
    root = tmp_path / "r"
    lines = ["path,label"]
    for i in range(9):
        write_png(root / f"{i}.png", blob(i, 8))
        lines.append(f"{i}.png,common")
    write_png(root / "rare.png", blob(50, 8))
    lines.append("rare.png,rare")
    write_manifest(root, lines)
    with caplog.at_level(logging.WARNING, logger="clipsvd.data.prepare"):
        store = prepared(csv_dataset(root), tmp_path / "p")
    warning = ("class 'rare' has 1 image(s) in 1 group(s), too few for the split: it gets 0 "
               "val and 0 test images; add images of it (3 groups or more) or remove the class")
    assert warning in caplog.text and any(warning in w for w in store.provenance["warnings"])
    for policy in ("error", "replace", "all"):
        with pytest.raises(DataError) as info:
            sample_split(store, "few_shot", 1, 1, SamplingConfig(insufficient=policy))
        message = str(info.value)
        assert message.startswith("class 'rare' has no images in the val split")
        assert "cannot help" in message and "set the dataset's sampling" not in message


@pytest.mark.parametrize("labels, named", [
    (["NaN"] * 4, "manifest.csv: line 2 has label 'NaN', a missing-value marker (4 of 4 rows)"),
    (["a", "a", "N/A", "b"], "manifest.csv: line 4 has label 'N/A', a missing-value marker"),
    (["a"] * 4, "manifest.csv: dataset 'leak' has one class ('a'); a classifier needs two or "
                "more"),
])
def test_missing_labels_and_one_class_datasets_stop(tmp_path, labels, named):
    """Catches: a manifest whose every label is the text NaN becoming a one-class dataset."""
    root = tmp_path / "n"
    for i in range(len(labels)):
        write_png(root / f"{i}.png", blob(i, 8))
    write_manifest(root, ["path,label", *[f"{i}.png,{label}" for i, label in enumerate(labels)]])
    assert_prepare_fails_cleanly(csv_dataset(root), tmp_path, named)


@pytest.mark.parametrize("dataset, key", [
    ({"format": "folder", "columns": {"path": "file"}}, "datasets.0.columns': only format 'csv'"),
    ({"format": "medmnist", "medmnist": {"flag": "bloodmnist"}, "groups": {"pattern": "(x)"}},
     "datasets.0.groups.pattern': MedMNIST files hold no patient ids"),
    ({"format": "csv", "manifest": "m.csv", "columns": {"group": "pid"},
      "groups": {"pattern": "(x)"}}, "the group is already the manifest's column 'pid'"),
    ({"format": "folder", "groups": {"pattern": "(x", "independent": False}},
     "datasets.0.groups.pattern': not a valid regular expression"),
    ({"format": "folder", "groups": {"pattern": "(a)(b)"}}, "2 capture groups"),
    ({"format": "folder", "groups": {"pattern": "(a)", "independent": True}},
     "groups.independent': true says every image is its own group"),
    ({"format": "csv", "manifest": "m.csv", "columns": {"path": "x", "label": "x"}},
     "header 'x' is given for two fields"),
    ({"format": "folder", "groups": {"dicom": "series"}}, "datasets.0.groups.dicom'"),
])
def test_grouping_config_errors_name_the_key(dataset, key):
    raw = {"study": "s", "datasets": [{"name": "d", "root": "/data", **dataset}]}
    with pytest.raises(ConfigError, match=key.replace("(", r"\(").replace(")", r"\)")):
        from_dict(raw, "s.yaml")


def test_an_empty_test_split_stops_sampling(tmp_path):
    """Catches: a split file with no test image, which evaluate met as an sklearn traceback
    ("Found empty input array")."""
    from test_data_sampling import make_store

    store = make_store(tmp_path / "s", {"train": [3, 3], "val": [2, 2], "test": [0, 0]})
    with pytest.raises(DataError, match="the test split holds no image of the classes few_shot "
                                        "uses, so nothing could be evaluated"):
        sample_split(store, "few_shot", 1, 1, SamplingConfig())


def test_a_spreadsheet_manifest_with_a_byte_order_mark_is_read(tmp_path):
    """Excel's "CSV UTF-8" starts the file with a byte-order mark. Catches: a header read as
    '\\ufeffpath', so that "needs a 'path' column (has: path, label)" made no sense."""
    root = tmp_path / "bom"
    for i in range(6):
        write_png(root / f"{i}.png", blob(i, 8))
    text = "path,label\n" + "".join(f"{i}.png,{'ab'[i % 2]}\n" for i in range(6))
    (root / "manifest.csv").write_bytes(b"\xef\xbb\xbf" + text.encode())
    store = prepared(csv_dataset(root), tmp_path / "p")
    assert len(store.index) == 6

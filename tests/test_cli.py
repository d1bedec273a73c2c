"""The command line: help for every argument, --version, a console free of library chatter."""
import argparse
import logging
import subprocess
import sys
from pathlib import Path

import pytest

import clipsvd
from clipsvd import cli

ROOT = Path(__file__).resolve().parents[1]


def subcommands() -> dict[str, argparse.ArgumentParser]:
    parser = cli.build_parser()
    (action,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(action.choices)


def test_every_argument_of_every_subcommand_has_help():
    """Catches: an option added without help= (as --split, --store, --run-dir, --dataset were)."""
    commands = subcommands()
    assert {"validate", "demo-data", "prepare", "sample", "features", "adapt", "evaluate",
            "interpret", "sync", "report"} <= set(commands)
    missing = [f"{name} {action.option_strings or action.dest}"
               for name, parser in commands.items() for action in parser._actions
               if not isinstance(action, argparse._HelpAction)
               and (not action.help or action.help == argparse.SUPPRESS)]
    assert not missing


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out.strip() == f"clipsvd {clipsvd.__version__}"


def test_library_chatter_stays_out_of_the_console(tmp_path, capfd):
    """open_clip's INFO lines and the expected random-weights warning reach the job log at
    DEBUG, not the console; clipsvd's own lines reach both. Catches: a console handler without
    the filter, open_clip's root-logger INFO printed, the random-init warning as a WARNING."""
    from clipsvd.models import load_model

    log_file = tmp_path / "job.log"
    try:
        cli._setup_logging(str(log_file))
        logging.getLogger("clipsvd.test").info("our own progress line")
        load_model("tiny-clip")  # open_clip logs "Parsing model identifier…" on the root logger
        logging.getLogger("some.library").warning("a library warning")
        for handler in logging.getLogger().handlers:
            handler.flush()
        console = capfd.readouterr().err
        logged = log_file.read_text()
    finally:
        logging.basicConfig(force=True, handlers=[logging.NullHandler()])
    assert "our own progress line" in console and "a library warning" in console
    assert "Parsing model identifier" not in console
    assert "initialized randomly" not in console
    assert "DEBUG root: Parsing model identifier" in logged
    assert "our own progress line" in logged and "initialized randomly" in logged


def test_demo_data_without_a_config(tmp_path):
    """`clipsvd demo-data --out DIR` makes the data the template study's comment asks for."""
    out = tmp_path / "my_scans"
    assert cli.main(["demo-data", "--out", str(out), "--per-class", "4"]) == 0
    lines = (out / "manifest.csv").read_text().splitlines()
    assert lines[0] == "path,label,group" and len(lines) == 1 + 4 * 4


def test_demo_data_needs_an_out_dir_without_a_config(capsys):
    assert cli.main(["demo-data"]) == 2
    assert "give --out DIR" in capsys.readouterr().err


# Commands that take no study config: those that make the package's pretrained model, and
# select, which reads finished runs' directories.
NO_STUDY_COMMANDS = {"pretrain": "--recipe", "vocabulary": "--out", "select": "--out"}


def test_help_runs_for_every_subcommand():
    for name in subcommands():
        result = subprocess.run([sys.executable, "-m", "clipsvd", name, "--help"],
                                capture_output=True, text=True, cwd=ROOT)
        assert result.returncode == 0, name
        assert NO_STUDY_COMMANDS.get(name, "--config") in result.stdout, name


def test_a_jobs_log_ends_with_its_wall_time_and_the_compute_it_did(tmp_path, run_cli):
    """benchmarks/demo_study.py sets a study's wall time against the compute its jobs did, read
    from this line. Catches: a job that no longer says it (the benchmark would count nothing)
    or that counts nothing of its work."""
    import re

    code, _ = run_cli("demo-data", "--out", tmp_path / "d", "--per-class", "3",
                      "--log", tmp_path / "demo.log")
    assert code == 0
    last = (tmp_path / "demo.log").read_text().strip().splitlines()[-1]
    found = re.search(r"clipsvd demo-data: job time ([\d.]+) s; compute ([\d.]+) s "
                      r"\(demo data ([\d.]+) s\)$", last)
    assert found, last
    job, compute, part = map(float, found.groups())
    assert 0 < part == compute <= job


def test_ui_says_what_to_do_without_a_store_or_with_a_server(tmp_path, run_cli, monkeypatch):
    """`clipsvd ui` serves a database store: before the study has run there is none, and a
    tracking server has its own UI. One line each, naming the file or key; no server starts.
    Catches: mlflow started on a missing store (it creates an empty one)."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    study = tmp_path / "study.yaml"
    study.write_text((ROOT / "config" / "config.yaml").read_text())
    code, err = run_cli("ui", "--config", study)
    assert code != 0 and "no MLflow store yet; run the study" in err
    assert str(tmp_path / "results" / "mlflow.db") in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "results").exists()
    study.write_text(study.read_text().replace("uri: null", "uri: http://127.0.0.1:5999"))
    code, err = run_cli("ui", "--config", study)
    assert code != 0 and "key 'tracking.uri'" in err and "a server already" in err

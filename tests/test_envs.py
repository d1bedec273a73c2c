"""The conda environment of the rules, pyproject.toml and constraints.txt must agree."""
import re
import tomllib
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]


def pins(lines):
    out = {}
    for line in lines:
        line = line.split("#")[0].strip()
        if line:
            req = Requirement(line)
            (spec,) = req.specifier
            assert spec.operator == "==", f"{line}: pin with =="
            out[canonicalize_name(req.name)] = spec.version
    return out


def test_conda_env_pins_what_the_package_needs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    needed = {canonicalize_name(Requirement(r).name): Requirement(r) for r in project["dependencies"]}
    constraints = pins((ROOT / "constraints.txt").read_text().splitlines())
    env = yaml.safe_load((ROOT / "envs" / "clipsvd.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = pins(pip_section)
    python = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
    assert re.fullmatch(r"python=3\.1[0-3]", python)
    for name, req in needed.items():
        if name in {"snakemake"}:  # runs the workflow; not needed inside the rules' environment
            continue
        assert name in conda_pins, f"envs/clipsvd.yaml lacks {name}"
        assert req.specifier.contains(conda_pins[name]), f"{name}=={conda_pins[name]} violates {req}"
        assert conda_pins[name] == constraints[name], f"{name}: env and constraints.txt differ"


def test_every_rule_names_the_conda_env():
    for smk in (ROOT / "workflow" / "rules").glob("*.smk"):
        text = smk.read_text()
        rules = len(re.findall(r"^rule \w+:", text, re.M))
        assert text.count("conda:") == rules, f"{smk.name}: a rule has no conda: directive"

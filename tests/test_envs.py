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


# Modules that only the Snakemake process submitting the jobs imports (the workflow installs
# them there; no rule's job runs them): their packages are Snakemake's, not the rules' env's.
SUBMITTING_PROCESS_ONLY = ("slurm.py",)


def _third_party_imports() -> set[str]:
    """Top-level modules that the package (which every rule runs) imports, stdlib excluded."""
    import ast
    import sys

    modules = set()
    for path in (ROOT / "src" / "clipsvd").rglob("*.py"):
        if path.name in SUBMITTING_PROCESS_ONLY:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                modules.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                modules.add(node.module.split(".")[0])
    return {m for m in modules if m not in sys.stdlib_module_names and m != "clipsvd"}


def test_every_package_the_rules_import_is_in_the_conda_env():
    from importlib.metadata import packages_distributions

    env = yaml.safe_load((ROOT / "envs" / "clipsvd.yaml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_pins = pins(pip_section)
    distributions = packages_distributions()
    for module in sorted(_third_party_imports()):
        names = {canonicalize_name(d) for d in distributions.get(module, [])}
        assert names, f"src/clipsvd imports {module!r}, which no installed distribution provides"
        provided = names & set(conda_pins)
        # A module can come in through a pinned package's own dependencies (e.g. scipy's via
        # scikit-learn is pinned explicitly; PIL is pillow); require an explicit pin.
        assert provided, f"src/clipsvd imports {module!r} ({', '.join(sorted(names))}): pin it in envs/clipsvd.yaml"

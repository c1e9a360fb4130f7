"""The package metadata: environment.yml agrees with pyproject.toml; no torchvision anywhere."""

from __future__ import annotations

import re

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _name(req: str) -> str:
    return re.split(r"[<>=!~\[ ;]", req.strip(), maxsplit=1)[0].lower().replace("_", "-")


def _pyproject():
    return tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]


def _environment_lines():
    lines = [ln.split("#")[0].strip() for ln in (ROOT / "environment.yml").read_text().splitlines()]
    return [re.sub(r"^- ", "", ln).strip() for ln in lines]


def test_environment_yml_lists_every_runtime_dependency():
    env = {_name(x) for x in _environment_lines() if x and not x.startswith(("--", "-e", "name:", "channels", "dependencies", "pip:", "conda-forge"))}
    missing = {_name(r) for r in _pyproject()["dependencies"]} - env
    assert not missing, f"environment.yml lacks {missing}"


def test_environment_yml_installs_the_package_with_existing_extras():
    lines = [x for x in _environment_lines() if x.startswith("-e .")]
    assert lines, "environment.yml must pip-install the package itself (-e .[...])"
    extras = set(re.search(r"\[(.*)\]", lines[0]).group(1).split(","))
    assert extras <= set(_pyproject()["optional-dependencies"]), extras


def test_environment_versions_match_pyproject():
    env = {_name(x): x for x in _environment_lines() if re.match(r"^[A-Za-z]", x) and not x.endswith(":")}
    for req in _pyproject()["dependencies"]:
        name = _name(req)
        if name in env and re.search(r"[<>=]", req):
            spec = re.sub(r"^[A-Za-z0-9_.-]+", "", req).replace(" ", "")
            assert spec in env[name].replace(" ", ""), f"{name}: pyproject {req!r} vs environment.yml {env[name]!r}"


def test_no_torchvision_dependency():
    text = (ROOT / "pyproject.toml").read_text() + (ROOT / "environment.yml").read_text()
    assert "torchvision" not in text
    for py in (ROOT / "agu_lib").rglob("*.py"):
        assert "import torchvision" not in py.read_text(), py


def test_prose_has_no_control_characters():
    """A Python string without r"" once turned "\\bar\\theta" in book/method.md into a backspace and a tab."""
    files = [ROOT / "README.md", ROOT / "results" / "README.md", *(ROOT / "book").glob("*.md"), *(ROOT / "notebooks").glob("*.ipynb")]
    bad = {str(f.relative_to(ROOT)): i + 1 for f in files for i, line in enumerate(f.read_text().splitlines())
           if re.search(r"[\x00-\x08\x0b-\x1f]", line)}
    assert len(files) > 5 and not bad, f"control characters at (file: line) {bad}"

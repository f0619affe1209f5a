"""The container recipes install exactly pyproject.toml's requirement set (they cannot be built here)."""

import re
import shlex
import tomllib
from pathlib import Path

REPO = Path(__file__).parent.parent


def _pip_requirements(text: str) -> list[list[str]]:
    """Every `pip install` command's requirement arguments (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    out = []
    for m in re.finditer(r"pip install ([^\n&]*)", joined):
        args = [a for a in shlex.split(m.group(1)) if not a.startswith("-")]
        out.append(args)
    return out


def test_dockerfile_and_apptainer_install_the_pyproject_dependencies():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    deps = project["dependencies"] + project["optional-dependencies"]["cu13"]  # the images are for CUDA 13
    for recipe in ("docker/Dockerfile", "docker/dgucdir.def"):
        installs = _pip_requirements((REPO / recipe).read_text())
        dep_lists = [args for args in installs if any("==" in a or ">=" in a for a in args)]
        assert len(dep_lists) == 1, recipe
        assert sorted(dep_lists[0]) == sorted(deps), recipe
        assert ["/opt/dgucdir"] in installs, recipe  # the project itself, with --no-deps
        text = (REPO / recipe).read_text()
        assert "nvidia/cuda:" in text and "python3.11" in text


def test_dockerfile_runs_as_a_non_root_user_with_the_cli_as_entry_point():
    text = (REPO / "docker/Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["dgucdir"]' in text

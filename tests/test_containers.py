"""The container recipes install the project at the tested versions of constraints.txt (they cannot be built here)."""

import re
import shlex
from pathlib import Path

REPO = Path(__file__).parent.parent


def _pip_installs(text: str) -> list[list[str]]:
    """Every `pip install` command's arguments (continuation lines joined)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    return [shlex.split(m.group(1)) for m in re.finditer(r"pip install ([^\n&]*)", joined)]


def test_dockerfile_and_apptainer_install_the_project_at_the_tested_versions():
    """The project with its cu13 extra, every install pinned by constraints.txt, which the recipe copies in."""
    for recipe in ("docker/Dockerfile", "docker/dgucdir.def"):
        text = (REPO / recipe).read_text()
        installs = [args for args in _pip_installs(text) if args != ["--upgrade", "pip"]]
        assert ["-c", "/opt/dgucdir/constraints.txt", "/opt/dgucdir[cu13]"] in installs, recipe
        assert all(args[:2] == ["-c", "/opt/dgucdir/constraints.txt"] for args in installs), recipe
        assert re.search(r"constraints\.txt\s+/opt/dgucdir/", text), recipe  # copied into the image
        assert "nvidia/cuda:13" in text and "python3.11" in text  # the Python the constraints were made on


def test_dockerfile_runs_as_a_non_root_user_with_the_cli_as_entry_point():
    text = (REPO / "docker/Dockerfile").read_text()
    users = re.findall(r"^USER (\S+)", text, flags=re.M)
    assert users and users[-1] not in ("root", "0")
    assert 'ENTRYPOINT ["dgucdir"]' in text

"""Every shell command the README, docs/RUNNING.md and docs/INSTALL.md show, run as written or in a cheap
form, so that a changed flag, key or file in the docs fails the suite.

The commands are the fenced ``bash`` blocks and the commands in the launch tables. Cheap forms:
- `dgucdir submit ...`: run with `--dry-run` (the sbatch script is printed, nothing queued);
- `dgucdir train|config CONFIG overrides`: parsed by the CLI's own parser and the config validated
  with the overrides (what the command does before it touches data);
- any other `dgucdir` command: parsed by the CLI's own parser (flags, choices, arity);
- `accelerate launch --config_file F ... -m dgucdir ...`: F exists, the dgucdir part as above;
- a script: its `--help` names every flag the docs give it;
- `make X`: the Makefile has the target; `pip install`: the files it names exist (the resolver
  itself is tested offline in test_install.py).
What cannot run here is listed in NOT_RUN with the reason; any other command fails the test.
"""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import REPO

DOCS = ["README.md", "docs/RUNNING.md", "docs/INSTALL.md"]
NOT_RUN = {
    "mlflow ui": "starts a web server",
    "docker ": "needs a Docker engine (the images are checked by test_containers.py)",
    "apptainer ": "needs Apptainer (the definition is checked by test_containers.py)",
}
PLACEHOLDERS = {"{0,1}": "0", "NODE0": "10.0.0.1", "$USER": "user", "~/": "/home/user/"}


def doc_commands() -> list[tuple[str, str]]:
    """(where, command) for every command of the docs: fenced bash lines (continuations joined, comments
    dropped) and inline `code` in table rows that starts with a command word."""
    found = []
    for doc in DOCS:
        text = (REPO / doc).read_text()
        for block in re.findall(r"```(?:bash|sh)\n(.*?)```", text, re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s+#.*$", "", line).strip()
                if line and not line.startswith("#"):
                    found.append((doc, line))
        for row in (line for line in text.splitlines() if line.startswith("|")):
            for code in re.findall(r"`([^`]+)`", row):
                if re.match(r"(dgucdir|accelerate launch) \S+ \S", code) and "…" not in code:
                    found.append((f"{doc} (table)", code))
    return found


COMMANDS = doc_commands()


def _words(command: str) -> list[str]:
    command = command.replace("$(bash scripts/setup_env.sh)", "$PY")  # the project's interpreter
    for placeholder, value in PLACEHOLDERS.items():
        command = command.replace(placeholder, value)
    words = shlex.split(command)
    if words[:1] in (["$PY"], ["$(bash scripts/setup_env.sh)"], ["python3"], ["python"]):
        words = [sys.executable, *words[1:]]
    if words[:3] == [sys.executable, "-m", "dgucdir"]:
        words = ["dgucdir", *words[3:]]
    return words


def _check_dgucdir(args: list[str]) -> None:
    from dgucdir.cli import build_parser
    from dgucdir.config import load_config

    if args[0] == "submit":
        dry = args if "--dry-run" in args else [*args, "--dry-run"]
        res = subprocess.run([sys.executable, "-m", "dgucdir", *dry], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
        assert res.returncode == 0, res.stderr[-2000:]
        assert "#SBATCH" in res.stdout and "# precision:" in res.stdout
        return
    try:
        parsed = build_parser().parse_args(args)
    except SystemExit as exc:
        raise AssertionError(f"`dgucdir {' '.join(args)}` does not parse (exit {exc.code})") from None
    if args[0] in ("train", "config") and getattr(parsed, "config", None):
        load_config(parsed.config, parsed.overrides)  # unknown keys, bad values, impossible splits


def _check_script(words: list[str]) -> None:
    script = next(w for w in words if w.endswith((".py", ".sh")))
    path = REPO / "scripts" / Path(script).name
    assert path.is_file(), f"no {path}"
    if path.suffix == ".sh":
        usage = path.read_text()
    else:
        res = subprocess.run([sys.executable, str(path), "--help"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        usage = res.stdout
    for flag in (w.split("=")[0] for w in words if w.startswith("--")):
        assert flag in usage, f"{script}: {flag} is not in its usage"


def check(command: str) -> str:
    """Runs ``command``'s cheap form; returns how it was checked."""
    for prefix, reason in NOT_RUN.items():
        if command.startswith(prefix):
            return f"not run: {reason}"
    words = _words(command)
    if re.fullmatch(r"[A-Z]+=\S+", words[0]) and len(words) == 1:
        return "an assignment for the lines after it"
    if words[0] == "make":
        targets = re.findall(r"^([a-z-]+):", (REPO / "Makefile").read_text(), re.M)
        assert words[1] in targets, f"the Makefile has no target {words[1]}"
        return "Makefile target"
    if words[0] == "dgucdir":
        _check_dgucdir(words[1:])
        return "parsed / dry run"
    if words[:2] == ["accelerate", "launch"]:
        config = words[words.index("--config_file") + 1]
        assert (REPO / config).is_file(), f"no accelerate config {config}"
        _check_dgucdir(words[words.index("-m") + 2:])
        return "accelerate config exists; dgucdir part parsed"
    if words[:2] == ["pip", "install"]:
        for i, word in enumerate(words):
            if words[i - 1] == "-c":
                assert (REPO / word).is_file(), f"no {word}"
        assert (REPO / "pyproject.toml").is_file()  # '.[cu13]' from the clone's root
        return "the files it names exist"
    if any(w.endswith((".py", ".sh")) for w in words[:2]):
        _check_script(words)
        return "--help names its flags"
    raise AssertionError(f"no cheap form for `{command}`: teach test_doc_commands.py how to check it")


@pytest.mark.parametrize("where, command", COMMANDS, ids=[f"{w}: {c[:60]}" for w, c in COMMANDS])
def test_documented_command_works(where, command):
    check(command)


def test_the_check_fails_on_a_broken_command():
    """One flag changed, one key misspelt, one impossible override: each is caught."""
    with pytest.raises(AssertionError, match="does not parse"):
        check("dgucdir search runs/x/checkpoints/ckpt-1 --galery sketch --query q.jpg")
    with pytest.raises(Exception, match="train.epoch"):
        check("dgucdir train configs/demo.yaml train.epoch=5")
    with pytest.raises(Exception, match="sketch"):
        check("dgucdir train configs/pacs.yaml model.moco_init=none data.train_domains=[photo,sketch]")
    with pytest.raises(AssertionError):
        check("dgucdir submit configs/pacs.yaml --nodes 2 --dry-run")  # no model.moco_init: refused


def test_the_docs_show_the_commands_users_run_first():
    shown = " ".join(c for _, c in COMMANDS)
    for needed in ("make demo", "make test", "dgucdir train configs/pacs.yaml model.moco_init=",
                   "accelerate launch --config_file launch/accelerate/1node_8gpu.yaml", "dgucdir submit",
                   "scripts/device_check.py"):
        assert needed in shown, needed


def _help_examples() -> list[str]:
    from dgucdir import cli, submit

    lines = [line.strip() for text in (cli.EPILOG, submit.__doc__) for line in text.splitlines()]
    examples = [re.sub(r"\s+#.*$", "", line) for line in lines
                if line.startswith(("dgucdir ", "accelerate launch ", "python -m launch.slurm "))]
    return [e.replace("python -m launch.slurm", "dgucdir submit") for e in examples]


@pytest.mark.parametrize("command", _help_examples())
def test_the_examples_of_the_help_work(command):
    check(command)

"""The docs say only what exists: relative links resolve, `dgucdir` commands and their flags are in
`--help`, and every config key they name is in the schema."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from dgucdir.cli import build_parser
from dgucdir.config import schema

REPO = Path(__file__).parent.parent
DOCS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]
SECTIONS = ("data", "augment", "model", "loss", "optim", "train", "eval", "tracking", "launch")
FILE_SUFFIXES = {"py", "yaml", "json", "md", "sh", "txt", "png", "pt", "tsv", "log"}


def _subcommands() -> dict[str, str]:
    """Every subcommand's --help text (submit parses its own arguments)."""
    from dgucdir.submit import build_parser as submit_parser

    parser = build_parser()
    subs = next(a for a in parser._actions if a.dest == "command").choices
    helps = {name: p.format_help() for name, p in subs.items()}
    helps["submit"] = submit_parser().format_help()
    return helps


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        assert (doc.parent / target.split("#")[0]).exists(), f"{doc.name}: broken link {target}"


def test_every_dgucdir_command_and_flag_named_in_the_readme_exists():
    helps = _subcommands()
    text = (REPO / "README.md").read_text()
    named = 0
    for sub, rest in re.findall(r"\bdgucdir ([a-z][a-z-]*)([^\n`|;&]*)", text):
        if sub not in helps:
            continue  # prose ("dgucdir writes ..."), not a command: the parser is the authority
        named += 1
        for flag in re.findall(r"(?<![\w-])(--[a-z][a-z-]*)", rest):
            assert flag in helps[sub], f"README: `dgucdir {sub} {flag}` is not in `dgucdir {sub} --help`"
    assert named >= 10
    for sub in ("train", "eval", "search", "export", "pack", "ablate", "runs", "bench", "submit", "demo"):
        assert f"dgucdir {sub}" in text, f"README never shows `dgucdir {sub}`"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_every_config_key_named_in_the_docs_is_in_the_schema(doc):
    keys = {key for key, *_ in schema()}
    pattern = rf"(?<![\w./-])((?:{'|'.join(SECTIONS)})\.[a-z_]+)(?![\w/-]|\.[a-z])"
    text = doc.read_text()
    for match in re.finditer(pattern, text):
        key = match.group(1)
        if key.rsplit(".", 1)[1] in FILE_SUFFIXES or text[: match.start()].endswith("-m "):
            continue  # a file name, or a module run with `python -m launch.slurm`
        assert key in keys, f"{doc.name} names config key {key}, which the schema does not have"

"""The docs say only what exists: relative links and their #anchors resolve, `dgucdir` commands and their flags are in
`--help`, every config key they name is in the schema, and the README's ablation figures are the generated results'."""

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


def _anchors(doc: Path) -> set[str]:
    """The #fragments GitHub gives the headings of a markdown file (outside code blocks): lower case,
    punctuation dropped, spaces as hyphens, a repeated heading numbered."""
    anchors: set[str] = set()
    fenced = False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        heading = None if fenced else re.match(r"#{1,6} (.+)", line)
        if heading:
            slug = re.sub(r"[^\w\- ]", "", heading.group(1).strip().lower()).replace(" ", "-")
            n = sum(1 for a in anchors if re.fullmatch(re.escape(slug) + r"(-\d+)?", a))
            anchors.add(f"{slug}-{n}" if n else slug)
    return anchors


def test_heading_anchors_follow_github(tmp_path):
    doc = tmp_path / "a.md"
    doc.write_text("# Choosing settings (`dgucdir select`)\n## Why: 64 px, P@1\n```bash\n# not a heading\n```\n"
                   "### Why: 64 px, P@1\n")
    assert _anchors(doc) == {"choosing-settings-dgucdir-select", "why-64-px-p1", "why-64-px-p1-1"}


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.name)
def test_relative_links_and_their_anchors_resolve(doc):
    for target in re.findall(r"\]\(([^)\s]+)\)", doc.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = doc.parent / path if path else doc
        assert linked.exists(), f"{doc.name}: broken link {target}"
        if anchor and linked.suffix == ".md":
            assert anchor in _anchors(linked), f"{doc.name}: no heading in {path or doc.name} for #{anchor}"


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


def _results_rows(config: str) -> dict[str, tuple[str, str]]:
    """variant -> (P@1, mAP@All) as `mean ± std` from the table of docs/RESULTS.md's section for ``config``."""
    text = (REPO / "docs" / "RESULTS.md").read_text()
    name = Path(config).stem
    section = text.split(f"<!-- ablation {name} -->", 1)[1].split(f"<!-- end ablation {name} -->", 1)[0]
    return {row[0]: (row[2], row[3]) for row in (
        [cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
        if line.startswith("| ") and not line.startswith("| variant"))}


def _quoted(text: str, variant: str, figure: str) -> bool:
    """Whether ``text`` names ``variant`` and then gives ``figure`` in the same clause (up to `;` or `.`): the
    decimal point of the variant's own figure ends the search before the next variant's. A line break is a space,
    as markdown renders it."""
    return re.search(rf"\(`{variant}`\)[^;.]*?{re.escape(figure)}", " ".join(text.split())) is not None


def test_quoted_pairs_a_figure_with_its_own_variant_only():
    text = "with it (`full`) 45.38 ± 0.86, without (`no_fourier`) 38.08 ±\n3.45; plain MoCo (`rgb_only`): 27.78 ± 1.13."
    assert _quoted(text, "full", "45.38 ± 0.86") and _quoted(text, "no_fourier", "38.08 ± 3.45")
    assert _quoted(text, "rgb_only", "27.78 ± 1.13")
    assert not _quoted(text, "full", "38.08 ± 3.45") and not _quoted(text, "no_fourier", "27.78 ± 1.13")
    assert not _quoted(text, "no_fourier", "45.38 ± 0.86")


@pytest.mark.parametrize("config", ["configs/demo.yaml", "configs/shapes.yaml"])
def test_the_readmes_ablation_figures_are_those_of_the_generated_results(config):
    """The README quotes both embedded sets' ablations (mAP@All of every variant; the demo's trained P@1 and
    mAP@All in its table); a rerun of `make results` that moves a figure must move it there too."""
    readme = (REPO / "README.md").read_text()
    rows = _results_rows(config)
    assert {"full", "no_fourier", "rgb_only"} <= rows.keys()
    if config == "configs/demo.yaml":  # the full method in the demo's table, each ablation in the text below it
        p1, map_all = rows.pop("full")
        assert f"| P@1 | **{p1}** |" in readme and f"| mAP@All | **{map_all}** |" in readme
        text = readme
    else:  # every variant in the one paragraph that names the config
        text = next(p for p in readme.split("\n\n") if f"`{config}`" in p)
    for variant, (_, figure) in rows.items():
        assert _quoted(text, variant, figure), (variant, figure)

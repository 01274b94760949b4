"""The README and docs/ against the code: the log lines the README quotes have the shape
the code prints (each pattern is built from the code's own formatting function, so a
changed format fails here), every docs page is linked from the README and every link
resolves inside the repository, and the generated tables of docs/cli.md and
docs/results.md are what ``fedmpi.reference`` generates now."""

from __future__ import annotations

import math
import re
from pathlib import Path
from types import SimpleNamespace

import pytest
from conftest import REPO

from fedmpi import reference
from fedmpi import results_keys as rk
from fedmpi.comm import log
from fedmpi.config import config_fields
from fedmpi.prepare import startup_line
from fedmpi.round import progress_line
from fedmpi.train import _round_summary

README = REPO / "README.md"
DOCS = sorted((REPO / "docs").glob("*.md"))
MAX_README_LINES = 300
NUMBER = re.compile(r"\d+(?:\.(\d+))?")


def shape_of(line: str) -> re.Pattern:
    """A pattern for lines shaped like ``line``: its text literally, each number as any
    number with the same count of decimals."""
    parts, end = [], 0
    for number in NUMBER.finditer(line):
        parts.append(re.escape(line[end : number.start()]))
        decimals = number.group(1)
        parts.append(r"\d+" + (rf"\.\d{{{len(decimals)}}}" if decimals else ""))
        end = number.end()
    parts.append(re.escape(line[end:]))
    return re.compile("".join(parts))


def logged(message: str, capsys) -> str:
    """``message`` as rank 0 prints it (``fedmpi.comm.log``)."""
    log(SimpleNamespace(is_root=True), message)
    return capsys.readouterr().out.rstrip("\n")


def quoted_run() -> list[str]:
    """The rank-0 lines of the default run the README quotes (its first ``[fedmpi]`` block)."""
    blocks, block = [], None
    for line in README.read_text().splitlines():
        if line.startswith("```"):
            block = [] if block is None else blocks.append(block)
        elif block is not None:
            block.append(line)
    return next(b for b in blocks if b and b[0].startswith("[fedmpi] "))


def test_the_readme_is_short():
    lines = len(README.read_text().splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move detail to docs/"


def test_the_quoted_start_up_line_is_what_prepare_prints(capsys):
    lines = quoted_run()
    for device, threads in (("cpu", 1), ("cuda:0", 1)):
        pattern = shape_of(logged(startup_line(4, 4, device, threads, "mimalloc"), capsys))
        pattern = re.compile(pattern.pattern.replace("mimalloc", r"\S+"))
        if device == "cpu":
            assert pattern.fullmatch(lines[0]), (lines[0], pattern.pattern)
        else:
            assert not pattern.fullmatch(lines[0])  # the pattern tells formats apart


def test_the_quoted_round_lines_are_what_train_prints(capsys):
    row = {
        rk.TRAIN_LOSS: 0.6806,
        rk.TEST_ACCURACY: 0.548,
        rk.TEST_MACRO_F1: 0.354,
        rk.TEST_LOSS: 0.6694,
        **{rk.timing(p): 1.5 for p in ("train", "wait", "allreduce", "eval", "round")},
    }
    summary = shape_of(logged(_round_summary(1, 3, row), capsys))
    progress = shape_of(logged(progress_line(1, 3, 0, 3, 32, 0.6936), capsys))
    lines = quoted_run()
    rounds = [line for line in lines if re.match(r"\[fedmpi\] round \d+/\d+ \|", line)]
    steps = [line for line in lines if re.match(r"\[fedmpi\] round \d+/\d+ client", line)]
    assert len(rounds) == 3 and steps, lines
    for line in rounds:
        assert summary.fullmatch(line), (line, summary.pattern)
    for line in steps:
        assert progress.fullmatch(line), (line, progress.pattern)

    # The optional parts the README mentions are where it says they are.
    row[rk.VAL_ACCURACY] = 0.7
    assert "| val acc 0.7000 |" in _round_summary(1, 3, row)
    row[rk.TEST_ACCURACY] = math.nan  # a round not evaluated drops the test part
    assert not summary.fullmatch(logged(_round_summary(1, 3, row), capsys))


def test_the_shape_pattern_fails_on_a_changed_format():
    line = "round 1/3 | train loss 0.6806 | 80.9s (train 73.2, wait 0.40)"
    pattern = shape_of(line)
    assert pattern.fullmatch("round 12/30 | train loss 1.0000 | 8.0s (train 7.0, wait 0.01)")
    for changed in (
        "round 1/3 | train loss 0.681 | 80.9s (train 73.2, wait 0.40)",  # precision
        "round 1/3 | loss 0.6806 | 80.9s (train 73.2, wait 0.40)",  # wording
        "round 1/3 | train loss 0.6806 | 80.9s (train 73.2, wait 0.40, eval 1.0)",  # a field
    ):
        assert not pattern.fullmatch(changed), changed


def links(page: Path) -> list[str]:
    """Targets of the page's Markdown links (inline code spans left out)."""
    text = re.sub(r"`[^`\n]*`", "", page.read_text())
    return re.findall(r"\]\(([^)\s]+)\)", text)


def slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return {slug(h) for h in re.findall(r"^#+ (.*)$", text, flags=re.M)}


def test_every_docs_page_is_linked_from_the_readme_and_exists():
    linked = {t.split("#")[0] for t in links(README) if t.startswith("docs/")}
    pages = {f"docs/{p.name}" for p in DOCS}
    assert linked - pages == set(), "README.md links docs pages that do not exist"
    assert pages - linked == set(), "docs pages that README.md does not link"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_every_link_resolves_inside_the_repository(page):
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        resolved = (page.parent / path).resolve() if path else page
        assert resolved.is_relative_to(REPO), f"{page.name}: {target} points outside"
        assert resolved.exists(), f"{page.name}: {target} does not exist"
        if anchor and resolved.suffix == ".md":
            assert anchor in anchors(resolved), f"{page.name}: no heading #{anchor} in {path}"


@pytest.mark.parametrize("page", [README, *DOCS], ids=lambda p: p.name)
def test_no_page_names_a_file_outside_the_repository(page):
    text = page.read_text()
    for outside in ("shared/design", "/work/", "../../"):
        assert outside not in text, f"{page.name} names {outside!r}"


@pytest.mark.parametrize("page", sorted(reference.PAGES))
def test_the_generated_tables_are_the_codes(page):
    source, generate = reference.PAGES[page]
    block = reference.generated_block((REPO / page).read_text(), source)
    assert block is not None, f"{page} lost its generated-table markers"
    assert block == generate(), f"{page} differs from the code: run python -m fedmpi.reference"


def test_docs_cli_documents_every_flag():
    """The full flag table (docs/cli.md) names every setting, once, in --help's groups."""
    text = (REPO / "docs" / "cli.md").read_text()
    for f in config_fields():
        flag = "--" + f.name.replace("_", "-")
        assert text.count(f"| `{flag}`") == 1, f"{flag} is not one row of docs/cli.md's table"
        assert f"### {f.metadata['group']}\n" in text, f.metadata["group"]


def test_the_readme_flag_table_names_real_flags():
    flags = {"--" + f.name.replace("_", "-") for f in config_fields()}
    text = README.read_text()
    table = text[text.index("## Main flags") :].split("\n## ", 1)[0]
    named = re.findall(r"^\| `(--[a-z0-9-]+)`(?:, `(--[a-z0-9-]+)`)?", table, flags=re.M)
    named = [flag for row in named for flag in row if flag]
    assert len(named) >= 20, named
    assert set(named) <= flags, set(named) - flags


def test_every_results_key_in_the_docs_table():
    text = (REPO / "docs" / "results.md").read_text()
    for name in rk.KEYS:
        assert f"| `{name}` |" in text, name

"""The README is a short first page and the pages it links stay true: README.md has at most 300 lines and links
every page of docs/, every relative link in README.md and docs/*.md leads to a file (and heading) that exists, and
every --flag they write is a flag of one of the project's command lines or of a tool they call (torchrun, pip,
tensorboard), so a renamed or removed flag cannot linger in the docs."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
DOCS = REPO / "docs"
MAX_README_LINES = 300

# Flags of other programs the docs show, each with the program it belongs to. torchrun's are checked against
# torchrun's own parser below, so this list cannot go stale either.
TORCHRUN_FLAGS = frozenset({"--standalone", "--nnodes", "--nproc_per_node", "--nproc-per-node", "--node_rank",
                            "--node-rank", "--master_addr", "--master-addr", "--master_port", "--master-port",
                            "--rdzv-backend", "--rdzv_backend", "--rdzv-endpoint", "--rdzv_endpoint", "--rdzv-id",
                            "--rdzv_id"})
PIP_FLAGS = frozenset({"--index-url", "--no-build-isolation"})  # pip install
TENSORBOARD_FLAGS = frozenset({"--logdir"})  # tensorboard --logdir DIR
# lm_eval's (docs/evaluation.md), checked against lm_eval's own parser below when it is installed
LM_EVAL_FLAGS = frozenset({"--model", "--model_args", "--include_path", "--tasks", "--batch_size", "--log_samples",
                           "--output_path", "--device"})
OTHER_TOOLS_FLAGS = TORCHRUN_FLAGS | PIP_FLAGS | TENSORBOARD_FLAGS | LM_EVAL_FLAGS

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")  # an inline Markdown link: [text](target)
FLAG = re.compile(r"(?<![\w-])--[A-Za-z][\w-]*")  # --flag, not part of a longer word or a Markdown rule
FENCE = re.compile(r"^\s*(```|~~~)")


def doc_pages() -> list[Path]:
    """README.md and every Markdown page of docs/."""
    return [README, *sorted(DOCS.glob("*.md"))]


def prose_lines(text: str) -> list[str]:
    """The lines outside fenced code blocks (a '# comment' in a bash block is not a heading, nor a link)."""
    lines, in_code = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            in_code = not in_code
        elif not in_code:
            lines.append(line)
    return lines


def heading_anchor(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped (hyphens and underscores kept), spaces to
    hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(text: str) -> set[str]:
    return {heading_anchor(line.lstrip("#")) for line in prose_lines(text) if re.match(r"#{1,6} ", line)}


def broken_links(text: str, base: Path) -> list[str]:
    """Each relative link of `text` (a page in folder `base`) whose file, or heading anchor, does not exist."""
    broken = []
    for line in prose_lines(text):
        for target in LINK.findall(line):
            if re.match(r"[a-z][a-z0-9+.-]*:", target):  # https:, mailto:: not a file of this repository
                continue
            path_part, _, anchor = target.partition("#")
            path = (base / path_part).resolve() if path_part else None
            if path is not None and not path.exists():
                broken.append(f"{target} (no such file)")
            elif anchor and (path is None or path.suffix == ".md"):
                page = text if path is None else path.read_text(encoding="utf-8")
                if anchor not in anchors(page):
                    broken.append(f"{target} (no such heading)")
    return broken


def written_flags(text: str) -> set[str]:
    return set(FLAG.findall(text))


def unknown_flags(text: str, known: set[str]) -> list[str]:
    """The --flags written in `text` that no known parser or tool has."""
    return sorted(written_flags(text) - known)


def option_strings(parser: argparse.ArgumentParser) -> set[str]:
    return {option for action in parser._actions for option in action.option_strings}


def project_parsers() -> dict[str, argparse.ArgumentParser]:
    """The parser of every command line the docs describe (scripts/gpu_check.py takes only OUTDIR)."""
    import exp6_trainer
    from inference import decode_benchmark, generate
    from training import benchmark, lm_eval_task, study
    from training.command import build_parser

    return {"python exp6_trainer.py": exp6_trainer.build_parser(),
            "python -m training.study": build_parser(study.STUDY),
            "python -m inference.generate": generate.build_parser(),
            "python -m inference.decode_benchmark": decode_benchmark.build_parser(),
            "python -m training.benchmark": benchmark.build_parser(),
            "python -m training.lm_eval_task": lm_eval_task.build_parser()}


@pytest.fixture(scope="module")
def known_flags() -> set[str]:
    known = set(OTHER_TOOLS_FLAGS)
    for parser in project_parsers().values():
        known |= option_strings(parser)
    return known


def test_the_readme_is_a_short_first_page_that_links_every_docs_page():
    text = README.read_text(encoding="utf-8")
    lines = len(text.splitlines())
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines; move reference material into docs/"
    linked = {(REPO / target.partition("#")[0]).resolve()
              for line in prose_lines(text) for target in LINK.findall(line)}
    pages = sorted(DOCS.rglob("*.md"))  # the pages; their figures are checked as their links (broken_links)
    assert pages, "docs/ holds no page"
    missing = [str(page.relative_to(REPO)) for page in pages if page.resolve() not in linked]
    assert not missing, f"README.md does not link {missing}"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_relative_link_leads_to_a_file_that_exists(page: Path):
    broken = broken_links(page.read_text(encoding="utf-8"), page.parent)
    assert not broken, f"{page.relative_to(REPO)} has broken links: {broken}"


@pytest.mark.parametrize("page", sorted(DOCS.glob("*.md")), ids=lambda page: page.name)
def test_every_docs_page_has_a_title_says_what_it_covers_and_links_back(page: Path):
    lines = [line for line in page.read_text(encoding="utf-8").splitlines() if line.strip()]
    assert lines[0].startswith("# "), f"{page.name} starts with {lines[0]!r}, not a '# Title'"
    assert "](../README.md" in lines[1], f"{page.name}: its second line says what it covers and links README.md"


@pytest.mark.parametrize("page", doc_pages(), ids=lambda page: str(page.relative_to(REPO)))
def test_every_flag_in_the_docs_is_a_flag_of_its_command(page: Path, known_flags: set[str]):
    unknown = unknown_flags(page.read_text(encoding="utf-8"), known_flags)
    assert not unknown, f"{page.relative_to(REPO)} names flags that no parser has: {unknown}"


def test_the_torchrun_flags_allowed_are_torchruns():
    from torch.distributed.run import get_args_parser

    assert TORCHRUN_FLAGS <= option_strings(get_args_parser())


def test_the_lm_eval_flags_allowed_are_lm_evals():
    pytest.importorskip("lm_eval")
    from lm_eval._cli import HarnessCLI

    run = HarnessCLI()._subparsers.choices["run"]
    assert LM_EVAL_FLAGS <= option_strings(run)


def test_a_flag_no_parser_has_and_a_broken_link_are_reported(known_flags: set[str], tmp_path: Path):
    sample = ("Run `python exp6_trainer.py --seeds 42 43 --no-such-flag` or\n"
              "`torchrun --nproc_per_node 2 exp6_trainer.py --parralel data`; a rule | --- | is no flag.\n")
    assert unknown_flags(sample, known_flags) == ["--no-such-flag", "--parralel"]
    (tmp_path / "there.md").write_text("# There\n\n## A heading: with `code`\n", encoding="utf-8")
    page = ("[ok](there.md) [ok](there.md#a-heading-with-code) [ok](https://example.org/x) [ok](#here)\n"
            "[gone](missing.md) [no heading](there.md#nowhere)\n\n## Here\n```\n[not a link](in-code.md)\n```\n")
    assert broken_links(page, tmp_path) == ["missing.md (no such file)", "there.md#nowhere (no such heading)"]

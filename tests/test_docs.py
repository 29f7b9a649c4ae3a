"""The repository explains itself: every doc link resolves, every citation in code points at
a section that exists, nothing cites a document outside the checkout, README stays short."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
# Documents of the team folder beside the checkout, which a user never has (spelled in parts
# so that this file does not cite them itself).
OUTSIDE = ["DESIGN" + ".md", "METHOD" + ".md", "MEASUREMENTS" + ".md", "../" + "shared"]
SKIP_DIRS = {".git", "__pycache__", ".pytest_cache", "data", "runs", "results", "wheelhouse"}


def _tracked_files() -> list[Path]:
    try:
        out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO,
                             capture_output=True, text=True, check=True).stdout.split("\n")
        return [REPO / p for p in out if p and (REPO / p).is_file()]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: walk the tree
        return [p for p in REPO.rglob("*") if p.is_file()
                and not SKIP_DIRS & set(p.relative_to(REPO).parts[:-1]) and ".egg-info" not in str(p)]


def _text_files(suffixes: tuple[str, ...]) -> list[Path]:
    return [p for p in _tracked_files() if p.suffix in suffixes]


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(md: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    in_code = False
    for line in md.read_text().splitlines():
        if line.startswith("```"):
            in_code = not in_code
        m = re.match(r"(#{1,6}) (.+)", line)
        if m and not in_code:
            a = anchor(m.group(2))
            n = seen.get(a, 0)
            seen[a] = n + 1
            out.add(a if n == 0 else f"{a}-{n}")
    return out


def test_anchor_rule_matches_github():
    assert anchor("Weight decay chosen on validation (issue 18 study)") == \
        "weight-decay-chosen-on-validation-issue-18-study"
    assert anchor("Pseudo-label store, 5,600,000 x 600 (issue 4)") == "pseudo-label-store-5600000-x-600-issue-4"
    assert anchor("Using a trained model: `stream-pml`") == "using-a-trained-model-stream-pml"


def test_nothing_cites_a_document_outside_the_repository():
    offenders = []
    for path in _tracked_files():
        if path.name == "PROVENANCE.md" or path.suffix in (".png", ".jpg", ".npz", ".tar", ".csv"):
            continue
        try:
            text = path.read_text()
        except UnicodeDecodeError:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if any(word in line for word in OUTSIDE):
                offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()[:80]}")
    assert not offenders, "\n".join(offenders)


MD_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("md", _text_files((".md",)), ids=lambda p: str(p.relative_to(REPO)))
def test_every_markdown_link_resolves(md):
    broken = []
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    for target in MD_LINK.findall(text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file_part, _, frag = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            broken.append(f"{target}: no such file")
        elif frag and dest.suffix == ".md" and frag not in anchors(dest):
            broken.append(f"{target}: no section #{frag} in {dest.relative_to(REPO)}")
    assert not broken, f"{md.relative_to(REPO)}: " + "; ".join(broken)


def test_every_docs_citation_in_code_points_at_a_section():
    cite = re.compile(r"docs/([\w/]+\.md)#([\w\-]+)")
    broken = []
    for path in _text_files((".py", ".yaml", ".sh", ".md", ".toml")):
        for n, line in enumerate(path.read_text().splitlines(), 1):
            for doc, frag in cite.findall(line):
                target = REPO / "docs" / doc
                if not target.exists() or frag not in anchors(target):
                    broken.append(f"{path.relative_to(REPO)}:{n}: docs/{doc}#{frag}")
    assert not broken, "\n".join(broken)


def test_readme_is_a_newcomers_page():
    readme = (REPO / "README.md").read_text()
    assert len(readme.splitlines()) <= 250
    # The two commands come first, and .ci/run runs exactly the second one.
    commands = re.findall(r"```bash\n\s*(.+?)\n\s*```", readme)
    assert commands[0].startswith("pip install -e . && shard-tools build digits")
    assert commands[1] == "pip install -e '.[dev]' && python -m pytest -q"
    assert commands[1] in (REPO / ".ci/run").read_text()

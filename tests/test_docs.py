"""The README stays a short user's document whose links lead somewhere, and keeps the two
code blocks that CI runs (.ci/run reads the block after each ``<!-- ci:... -->``)."""

import re
import subprocess

import pytest

from tests.conftest import ROOT

README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def relative_links(page) -> list[str]:
    """Targets of the page's markdown links that are paths, without their #anchor."""
    targets = (t.split("#")[0] for t in LINK.findall(page.read_text()))
    return [t for t in targets if t and not re.match(r"[a-z][a-z0-9+.-]*:", t)]


def test_readme_is_at_most_8000_characters():
    assert len(README.read_text()) <= 8000


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    missing = sorted({t for t in relative_links(page) if not (page.parent / t).exists()})
    assert not missing, f"{page.relative_to(ROOT)} links to missing files: {missing}"


def test_the_link_check_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("[a](docs/none.md#x) [b](https://example.org/x) [c](page.md)")
    assert relative_links(page) == ["docs/none.md", "page.md"]


@pytest.mark.parametrize(
    "marker, command",
    [("setup", "pip install"), ("test", "pytest")],
)
def test_ci_reads_both_commands_from_the_readme(marker, command):
    # The same extraction as .ci/run's readme_block.
    script = (ROOT / ".ci" / "run").read_text()
    awk = re.search(r"awk -v marker=.*?' README.md", script, re.DOTALL).group(0)
    block = subprocess.run(
        ["bash", "-c", awk.replace("$1", marker)], cwd=ROOT, capture_output=True, text=True
    ).stdout
    assert command in block and block.count("\n") == 1, block

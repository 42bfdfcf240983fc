"""The README's tables match the code: every launcher variable and every metric tag is documented."""

import re

from preference_dpo.metrics import METRIC_TAGS, PTUNE_METRIC_TAGS
from preference_dpo.variables import LAUNCHER_VARIABLES

from .conftest import REPO

README = (REPO / "README.md").read_text(encoding="utf-8")
LAUNCHER = (REPO / "fast_train.sh").read_text(encoding="utf-8")


def test_variable_table_matches_config():
    rows = dict(re.findall(r"^\| `([A-Z_]+)` \| `--([a-z_]+)` \|", README, flags=re.M))
    assert rows == LAUNCHER_VARIABLES


def test_every_variable_is_in_the_launcher_block():
    for variable in LAUNCHER_VARIABLES:
        assert re.search(rf'^{variable}="\$\{{{variable}:?-', LAUNCHER, flags=re.M), variable


def test_metric_table_lists_every_tag():
    rows = re.findall(r"^\| `([a-z_/]+)` \| `([a-z_/]+)` \|", README, flags=re.M)
    assert set(rows) == set(METRIC_TAGS.values()) | set(PTUNE_METRIC_TAGS.values())


def test_ci_runs_the_readme_test_command():
    command = "python3 -m pip install -r requirements.txt -r requirements-dev.txt && ruff check . && python3 -m pytest"
    assert command in README
    assert command in (REPO / ".ci" / "run").read_text()


def test_method_definition_lives_in_the_repository():
    """Code and docs point to docs/method.md; nothing points to a spec outside the repository."""
    import subprocess

    files = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    assert (REPO / "docs" / "method.md").is_file()
    spec = "METHOD" + ".md"  # spelled so that this file does not name it
    for name in files:
        if name.endswith((".py", ".md", ".sh")) and (REPO / name).is_file():
            assert spec not in (REPO / name).read_text(encoding="utf-8"), name


def test_relative_links_in_the_docs_resolve():
    docs = ("README.md", "README.zh-CN.md", "docs/method.md", "docs/operations.md")
    for doc in (REPO / name for name in docs):
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", doc.read_text(encoding="utf-8")):
            assert (doc.parent / target).exists(), f"{doc.name}: {target}"


def test_every_method_section_the_code_cites_exists():
    """`docs/method.md, "Section"` in the package's docstrings and comments names a heading of method.md."""
    method = (REPO / "docs" / "method.md").read_text(encoding="utf-8")
    headings = [line.lstrip("#").strip() for line in method.splitlines() if line.startswith("#")]
    cited = []
    for path in sorted((REPO / "preference_dpo").glob("*.py")):
        text = re.sub(r"\s+", " ", path.read_text(encoding="utf-8"))
        cited += [(path.name, name) for name in re.findall(r'docs/method\.md,? "([^"]+)"', text)]
        cited += [(path.name, name) for name in re.findall(r'"([^"]+)" in docs/method\.md', text)]
    assert len(cited) >= 8
    missing = [(file, name) for file, name in cited if not any(h.startswith(name) for h in headings)]
    assert missing == []


def test_the_method_report_keeps_the_hand_written_reading():
    """METHOD_RESULTS.md is rewritten by `python -m bench.method.report`: the hand-written reading of the
    numbers, which the README points to, must survive that rewrite, after the real-model section."""
    from bench.method.report import READING_END, READING_START, kept_sections

    kept = kept_sections(REPO / "METHOD_RESULTS.md")
    assert READING_START in kept and READING_END in kept and "## Reading the results" in kept
    assert kept.index("<!-- realmodel:start -->") < kept.index(READING_START)

"""The README's tables match the code: every launcher variable and every metric tag is documented."""

import re

from preference_dpo.config import LAUNCHER_VARIABLES
from preference_dpo.metrics import METRIC_TAGS, PTUNE_METRIC_TAGS

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

"""deploy/prometheus/slurp-alerts.yml: valid rules, passing their promtool unit tests, and
built only from metrics a node exports (node/daemon/metrics.py)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from node.daemon.metrics import METRIC_NAMES

RULES_DIR = Path(__file__).resolve().parent.parent / "deploy" / "prometheus"
RULES = RULES_DIR / "slurp-alerts.yml"
RULE_TESTS = RULES_DIR / "slurp-alerts.test.yml"
needs_promtool = pytest.mark.skipif(
    shutil.which("promtool") is None, reason="needs promtool (Debian prometheus; scripts/test)"
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], capture_output=True, text=True, cwd=RULES_DIR, timeout=120,
        check=False,
    )  # fmt: skip


@needs_promtool
def test_rules_are_valid() -> None:
    result = promtool("check", "rules", RULES.name)
    assert result.returncode == 0, result.stdout + result.stderr


@needs_promtool
def test_rules_pass_their_unit_tests() -> None:
    result = promtool("test", "rules", RULE_TESTS.name)
    assert result.returncode == 0, result.stdout + result.stderr


def test_rules_use_only_exported_metrics() -> None:
    """Every slurp_* name in an expression is a metric the node exports."""
    names = set(re.findall(r"\bslurp_[a-z_]+", RULES.read_text()))
    assert names, "the rules name no slurp metric"
    assert sorted(names - set(METRIC_NAMES)) == []


def test_every_alert_has_a_unit_test() -> None:
    """Each alert of the rules file is evaluated in the promtool tests."""
    alerts = set(re.findall(r"^\s+- alert: (\w+)", RULES.read_text(), re.MULTILINE))
    tested = set(re.findall(r"^\s+alertname: (\w+)", RULE_TESTS.read_text(), re.MULTILINE))
    assert alerts
    assert sorted(alerts - tested) == []

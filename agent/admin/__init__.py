"""The agent's admin API (a root-only Unix socket) and the node's flow log, read by `nodemesh`.

The agent implements `AdminSources`, owns one `FlowRing` (the proxy calls `ring.add(record)`), and
runs `AdminServer(sources, ring, admin_socket_path(node))`. See docs/cli.md. With proxy workers,
the main process's server reads theirs (`WorkerPeers`, `WorkerFlowFeed`): see agent/workers.py.
"""

from agent.admin.flow_feed import WorkerFlowFeed
from agent.admin.flows import Dropped, FlowEvent, FlowFilter, FlowRecord, FlowRing, Subscription, Verdict
from agent.admin.paths import admin_socket_path
from agent.admin.peers import WorkerPeers
from agent.admin.server import AdminError, AdminServer
from agent.admin.sources import (
    AdminSources,
    AgentStatus,
    CertInfo,
    ConnectionInfo,
    ConnPath,
    ControllerLink,
    DatapathStatus,
    MeshSettings,
    ProxyState,
    ProxyStatus,
    ProxyWorker,
    Workers,
)

__all__ = [
    "AdminError",
    "AdminServer",
    "AdminSources",
    "AgentStatus",
    "CertInfo",
    "ConnPath",
    "ConnectionInfo",
    "ControllerLink",
    "DatapathStatus",
    "Dropped",
    "FlowEvent",
    "FlowFilter",
    "FlowRecord",
    "FlowRing",
    "MeshSettings",
    "ProxyState",
    "ProxyStatus",
    "ProxyWorker",
    "Subscription",
    "Verdict",
    "WorkerFlowFeed",
    "WorkerPeers",
    "Workers",
    "admin_socket_path",
]

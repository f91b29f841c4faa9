"""L4 authorization for the node proxy and `nodemesh policy explain` (sans-IO).

`PolicyIndex.build(policy_objects, root_namespace)` compiles Istio AuthorizationPolicy objects once;
`evaluate(index, Connection(...))` returns a `Decision` per new connection. `PeerAuthIndex` resolves
the effective PeerAuthentication mTLS mode of a workload port. Semantics: docs/authorization.md.
"""

from api.authz.compile import DEFAULT_ROOT_NAMESPACE, PolicyIndex, compile_policy
from api.authz.evaluate import evaluate
from api.authz.model import (
    Action,
    AuthzError,
    CompiledPolicy,
    Connection,
    ConnectionInputError,
    Decision,
    DryRunResult,
    PolicyCompileError,
    PolicyRef,
    Reason,
)
from api.authz.peerauth import Level, MtlsMode, PeerAuthDecision, PeerAuthIndex

__all__ = [
    "DEFAULT_ROOT_NAMESPACE",
    "Action",
    "AuthzError",
    "CompiledPolicy",
    "Connection",
    "ConnectionInputError",
    "Decision",
    "DryRunResult",
    "Level",
    "MtlsMode",
    "PeerAuthDecision",
    "PeerAuthIndex",
    "PolicyCompileError",
    "PolicyIndex",
    "PolicyRef",
    "Reason",
    "compile_policy",
    "evaluate",
]

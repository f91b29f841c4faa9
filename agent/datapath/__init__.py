"""nodemesh eBPF datapath: loading the programs of ``bpf/``, enrolling pods, reading maps.

Only this package touches bcc and ctypes. Callers use the :class:`Datapath` protocol; the bcc
implementation lives in :mod:`agent.datapath.bcc_datapath`, an in-memory fake for unit tests in
:mod:`agent.datapath.fake`.
"""

from agent.datapath.errors import DatapathError
from agent.datapath.interface import Datapath, EnrolledPod, PodRef

__all__ = ["Datapath", "DatapathError", "EnrolledPod", "PodRef"]

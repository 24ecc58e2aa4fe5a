"""Child processes that do not outlive their parent.

Envoy beside `agentmesh serve`, and the processes of `agentmesh mesh`, are stopped by their
parent on a clean shutdown. A parent killed with SIGKILL runs no shutdown, so on Linux each
child asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG), and drains as
on any SIGTERM. Elsewhere this is a no-op: such children are left to the operator.
"""

import ctypes
import os
import signal
import sys

PR_SET_PDEATHSIG = 1


def terminate_with_parent(parent: int) -> None:
    """`preexec_fn` of a child: SIGTERM when `parent` (the spawning process) dies."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    if os.getppid() != parent:  # it died between the fork and the prctl
        os.kill(os.getpid(), signal.SIGTERM)

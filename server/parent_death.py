"""Child processes that do not outlive their parent.

Envoy beside `agentmesh serve`, and the processes of `agentmesh mesh`, are stopped by their
parent on a clean shutdown. A parent killed with SIGKILL runs no shutdown, so on Linux each
child asks the kernel for SIGTERM when its parent dies (PR_SET_PDEATHSIG), and drains as
on any SIGTERM. Elsewhere (or without util-linux's `setpriv`) this is a no-op: such
children are left to the operator.

The child is started through `setpriv --pdeathsig TERM`, not with a `preexec_fn` calling
prctl: a preexec_fn makes Python fork and run Python code in the child, which runs the
interpreter's at-fork handlers, and gRPC's abort the child (SIGABRT before Envoy even
started) when a gRPC thread of the parent was busy at that moment. Without one, the child is
spawned with vfork and exec, and nothing of the parent runs in it.
"""

import shutil
import sys
from collections.abc import Sequence


def dying_with_parent(command: Sequence[str]) -> list[str]:
    """`command`, started so that it gets SIGTERM when the process that spawns it dies."""
    setpriv = shutil.which("setpriv") if sys.platform.startswith("linux") else None
    if setpriv is None:
        return list(command)
    return [setpriv, "--pdeathsig", "TERM", "--", *command]

"""How a ``safegrad`` process ends after a distributed run (``torchrun -m safegrad_kernels``).

A gloo process group's worker threads outlive ``destroy_process_group`` (the C++ group stays
alive past it), and such a thread may still be dropping its last collective's tensors when the
interpreter starts finalizing. Taking the GIL then ends the thread by forced unwinding through
a ``noexcept`` destructor: ``terminate called without an active exception`` and SIGABRT, after
a run that finished and saved everything (pytorch/pytorch#117762; seen here on torch 2.10 with
2 CPU ranks, 6 times in 43 runs with two busy cores beside them). The program therefore closes
its process group and leaves without finalizing the interpreter, once the work finalizing
would have done is done: non-daemon threads joined, ``atexit`` callbacks run (logging,
trackers), streams flushed.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import sys
import threading
from typing import NoReturn


def end_process_group() -> bool:
    """Close the default process group if one is open; True if it was."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return False
    dist.destroy_process_group()
    return True


def exit_without_finalizing(code: int) -> NoReturn:
    """End the process with ``code`` as a normal exit would, minus the interpreter's teardown."""
    main_thread = threading.main_thread()
    for thread in threading.enumerate():
        if thread is not main_thread and not thread.daemon:
            thread.join()
    atexit._run_exitfuncs()  # CPython's own exit path runs these; os._exit would skip them
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):  # closed, or the reader went away
            stream.flush()
    os._exit(code)

"""How a ``safegrad`` process ends after a distributed run (``cli.shutdown``).

The abort it prevents (a gloo worker thread taking the GIL during interpreter teardown) is a
race that no test can provoke on demand; these tests pin down the two halves of the remedy:
the exit path does everything a normal exit does except the teardown, and the program takes
that path exactly when it closed a process group.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

from helpers_launch import free_port, needs_gloo, worker_env


def _python(source: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(source)
    return subprocess.run(
        [sys.executable, "-c", code], env=worker_env(), capture_output=True, text=True, timeout=120
    )


def test_exit_without_finalizing_does_what_an_exit_does():
    """Non-daemon threads finish, then atexit callbacks run, buffered output is kept, and the
    code is the process's exit status; nothing after the call runs."""
    proc = _python(
        """
        import atexit, sys, threading, time
        from safegrad_kernels.cli import shutdown

        atexit.register(lambda: print("atexit ran"))
        def late():
            time.sleep(0.3)
            print("thread finished")
        threading.Thread(target=late).start()
        sys.stdout.write("buffered, no newline;")
        shutdown.exit_without_finalizing(3)
        print("after the exit")
        """
    )
    assert proc.returncode == 3, proc.stderr
    assert proc.stdout == "buffered, no newline;thread finished\natexit ran\n"


def test_end_process_group_without_a_group_is_a_no_op():
    from safegrad_kernels.cli import shutdown

    assert shutdown.end_process_group() is False


_GROUP = """
    import atexit, sys
    import torch.distributed as dist
    from safegrad_kernels.cli import main

    dist.init_process_group(
        "gloo", init_method="tcp://127.0.0.1:{port}", rank=0, world_size=1
    )
    atexit.register(lambda: print("group open at exit:", dist.is_initialized()))
    sys.argv = ["safegrad", "info", "--json"]
    code = main({argv})
    print("main returned", code, "group open:", dist.is_initialized())
"""


@needs_gloo
def test_the_program_closes_its_group_and_skips_the_teardown():
    """As the program (``argv=None``, what torchrun's ``-m safegrad_kernels`` runs) with a
    process group open: the group is closed, atexit still runs, and main never returns."""
    proc = _python(_GROUP.format(port=free_port(), argv=""))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-1] == "group open at exit: False"
    assert not any(line.startswith("main returned") for line in lines)


@needs_gloo
def test_main_called_as_a_function_closes_the_group_and_returns():
    """A caller passing argv keeps its process: main closes the group and returns."""
    proc = _python(_GROUP.format(port=free_port(), argv='["info", "--json"]'))
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[-2:] == ["main returned 0 group open: False", "group open at exit: False"]

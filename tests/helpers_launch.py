"""What the multi-process tests share: gloo's availability, a free port, the workers'
environment, and running the ranks of one group to the end or a deadline."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest
import torch.distributed as dist
from paths import ROOT

needs_gloo = pytest.mark.skipif(
    not (dist.is_available() and dist.is_gloo_available()),
    reason="needs torch.distributed with gloo",
)


def free_port() -> int:
    """A port nobody listens on (port 0 would hang a static rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_env(**overrides: str) -> dict[str, str]:
    """This process's environment with the checkout first on PYTHONPATH and one OpenMP
    thread per process (the ranks share the cores); ``overrides`` win."""
    path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path, **overrides}


def run_ranks(commands: list[tuple[list[str], dict[str, str]]], timeout_s: float) -> list[str]:
    """Starts every ``(argv, env)`` at once and returns each one's output (stdout and stderr).

    Past ``timeout_s`` on any of them, all are killed and a last entry says so.
    """
    procs = [
        subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for argv, env in commands
    ]
    try:
        return [p.communicate(timeout=timeout_s)[0] for p in procs]
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        return [*(p.communicate()[0] for p in procs), f"workers timed out after {timeout_s} s"]

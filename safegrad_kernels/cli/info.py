"""`safegrad info`: versions, devices, backends and why a backend is unavailable."""

from __future__ import annotations

import argparse
import json
from typing import Any

from .. import compat
from ..environment import collect_info

__all__ = ["HELP", "NAME", "add_arguments", "run"]

NAME = "info"
HELP = "versions, backends and why a backend is unavailable"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    parser.add_argument(
        "--aot",
        action="store_true",
        help="also compile the Triton kernels for NVIDIA (sm_80, sm_90) and AMD (gfx942, gfx90a) targets and report registers, "
        "spills and load widths (takes a while)",
    )


def _print_info(info: dict[str, Any]) -> None:
    versions = info["versions"]
    print(
        f"safegrad_kernels {info['safegrad_kernels']}  (python {info['python']}, {info['platform']})"
    )
    print("versions: " + ", ".join(f"{k} {v or 'not installed'}" for k, v in versions.items()))
    rows = (compat.VersionRow(**row) for row in info["supported_ranges"])
    for line in compat.out_of_range_warnings(rows):
        print(line)
    cuda = info["cuda"]
    gpus = ", ".join(cuda["devices"]) if cuda["available"] else "none"
    print(f"cpu: {info['cpu']['processor']}, {info['cpu']['threads']} torch threads; cuda: {gpus}")
    for key, value in info["env"].items():
        print(f"{key}={value if value is not None else '(unset: auto)'}")
    print("backends:")
    for name, row in info["backends"].items():
        state = "available" if row["available"] else f"unavailable: {row['reason']}"
        print(f"  {name:<7} {state}")
    auto = ", ".join(f"{dev} -> {name}" for dev, name in info["auto_backend"].items() if name)
    print(f"auto selection: {auto}")
    if info.get("cpp_build"):
        print("cpp build: " + ", ".join(f"{k}={v}" for k, v in info["cpp_build"].items()))
    if "triton_aot" in info:
        report = info["triton_aot"]
        print("triton AOT report (compiled here for NVIDIA and AMD targets; no GPU needed):")
        if isinstance(report, list):
            from ..ops.triton_aot import format_report

            print(format_report(report))
        else:
            print(f"  unavailable: {report['error']}")


def run(args: argparse.Namespace) -> int:
    info = collect_info(aot=args.aot)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0

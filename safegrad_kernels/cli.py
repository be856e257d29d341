"""The ``safegrad`` command: ``info | demo | train | eval``.

Heavy dependencies (transformers, peft, the demo's plotting) are imported only by the
subcommand that needs them, so ``safegrad info`` needs nothing but torch. Exit codes: 0
success; 2 bad arguments or bad data (the message names the file, line and field); 1 an
unavailable backend or demo.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import sys
from collections.abc import Sequence
from typing import Any

from . import compat
from .data import DataError
from .ops.dispatch import BackendUnavailable

__all__ = ["build_parser", "collect_info", "main"]

_VERSIONED = ("torch", "triton", "transformers", "peft", "accelerate", "numpy")


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _aot_report() -> Any:
    """Rows of ``ops.triton_aot.aot_report()`` (registers, spills, access widths), or an error."""
    try:
        from .ops import triton_aot

        return triton_aot.aot_report()
    except Exception as exc:  # no triton, no compiler target...: report, never crash `info`
        return {"error": f"{type(exc).__name__}: {str(exc).strip()[-2000:]}"}


def collect_info(*, aot: bool = False) -> dict[str, Any]:
    """Everything ``safegrad info`` prints, as a JSON-serialisable dict."""
    import torch

    import safegrad_kernels
    from safegrad_kernels.ops import dispatch

    cuda = torch.cuda.is_available()
    info: dict[str, Any] = {
        "safegrad_kernels": safegrad_kernels.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": {name: _version(name) for name in _VERSIONED},
        "cpu": {
            "threads": torch.get_num_threads(),
            "processor": platform.processor() or platform.machine(),
        },
        "cuda": {
            "available": cuda,
            "version": torch.version.cuda,
            "devices": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
            if cuda
            else [],
        },
        "env": {dispatch.ENV_VAR: os.environ.get(dispatch.ENV_VAR)},
        "backends": {
            name: {"available": ok, "reason": reason}
            for name, (ok, reason) in safegrad_kernels.available_backends().items()
        },
    }
    info["auto_backend"] = {}
    for device in ("cpu", "cuda"):
        if device == "cuda" and not cuda:
            info["auto_backend"][device] = None
            continue
        try:
            info["auto_backend"][device] = dispatch.resolve(None, torch.device(device)).name
        except Exception as exc:  # e.g. SAFEGRAD_BACKEND names an unavailable backend
            info["auto_backend"][device] = f"error: {exc}"
    # Installed frameworks against the ranges pyproject.toml declares (compat.version_rows).
    info["supported_ranges"] = [row._asdict() for row in compat.version_rows()]
    build_info = getattr(dispatch.get_backend("cpp"), "build_info", None)
    info["cpp_build"] = build_info() if callable(build_info) else None
    if aot:
        info["triton_aot"] = _aot_report()
    return info


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
    env = info["env"]
    for key, value in env.items():
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
        print("triton AOT report (compiled here for NVIDIA targets; no GPU needed):")
        if isinstance(report, list):
            from .ops.triton_aot import format_report

            print(format_report(report))
        else:
            print(f"  unavailable: {report['error']}")


def _cmd_info(args: argparse.Namespace) -> int:
    info = collect_info(aot=args.aot)
    if args.json:
        print(json.dumps(info, indent=2, default=str))
    else:
        _print_info(info)
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from . import train

    train.run(args)
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    from . import evaluate

    metrics = evaluate.run(args)
    for section in ("harmful", "task"):
        if section in metrics:
            row = metrics[section]
            values = ", ".join(f"{k} {v:.2f}" for k, v in row.items() if isinstance(v, float))
            print(f"{section}: n={row['n']}, {values}")
    print(f"metrics written to {metrics['output']}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    demo.run(args)
    return 0


class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser.

    The demo package (model, world, plotting) is imported for its options only when
    ``command == "demo"``, so other subcommands never pay for it or depend on it.
    """
    parser = argparse.ArgumentParser(
        prog="safegrad",
        description="Gradient-surgery kernels and safe LoRA fine-tuning (SafeGrad, SPF, PCGrad).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    info = sub.add_parser("info", help="versions, backends and why a backend is unavailable")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.add_argument(
        "--aot",
        action="store_true",
        help="also compile the Triton kernels for NVIDIA targets and report registers, "
        "spills and load widths (takes a while)",
    )
    info.set_defaults(handler=_cmd_info)

    demo = sub.add_parser(
        "demo", help="the embedded miniature: harmful fine-tuning vs SafeGrad, on CPU"
    )
    if command == "demo":
        try:
            from . import demo as demo_module

            demo_module.add_arguments(demo)
        except ImportError as exc:  # e.g. the demo extras are not installed
            demo.set_defaults(demo_import_error=str(exc))
    demo.set_defaults(handler=_cmd_demo)

    from . import evaluate, train

    train_parser = sub.add_parser(
        "train",
        help="LoRA fine-tuning of a local model with gradient surgery",
        description=train.__doc__.split("\n\n")[0],
        formatter_class=_DefaultsFormatter,
    )
    train.add_arguments(train_parser)
    train_parser.set_defaults(handler=_cmd_train)

    eval_parser = sub.add_parser(
        "eval",
        help="harmful score and task accuracy of a model + adapter",
        description=evaluate.__doc__.split("\n\n")[0],
        formatter_class=_DefaultsFormatter,
    )
    evaluate.add_arguments(eval_parser)
    eval_parser.set_defaults(handler=_cmd_eval)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safegrad`` console script; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
    if getattr(args, "demo_import_error", None):
        print(f"safegrad demo: unavailable ({args.demo_import_error})", file=sys.stderr)
        return 1
    try:
        return args.handler(args)
    except DataError as err:
        print(f"safegrad {args.command}: error: {err}", file=sys.stderr)
        return 2
    except BackendUnavailable as err:
        print(f"safegrad {args.command}: error: {err}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`safegrad info | head`): not an error. Point stdout at
        # devnull so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0

"""The ``safegrad`` command: ``info | demo | study | train | eval | example``, one module per command.

A command module declares ``NAME``, ``HELP``, ``add_arguments(parser)`` and
``run(args) -> exit code``; the work is library code (``environment``, ``training_run``,
``evaluation_run``, the ``demo`` package). Heavy dependencies (transformers, peft, the
demo's plotting) are imported only by the command that runs, so ``safegrad --help`` and
``safegrad info`` need nothing but torch.

Exit codes: 0 success; 2 bad arguments, paths or data, told in one line (the message names
the flag and path, or the file, line and field), never a traceback; 1 an unavailable
backend or demo.

Offline: ``main`` sets the hub's offline switches before any command imports transformers
(``hf_loading.enable_offline_mode``); model, adapter and judge flags take local folders only.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from .. import BackendUnavailable
from ..data import DataError
from ..environment import collect_info
from ..hf_loading import enable_offline_mode
from . import demo as demo_command
from . import eval as eval_command
from . import example as example_command
from . import info as info_command
from . import shutdown
from . import study as study_command
from . import train as train_command
from .args import BriefErrorParser, DefaultsFormatter

__all__ = ["build_parser", "collect_info", "main"]

COMMANDS = (info_command, demo_command, study_command, train_command, eval_command, example_command)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The argument parser, holding the options of ``command`` (None: of every command whose
    options import nothing more, i.e. all but the demo's)."""
    parser = BriefErrorParser(
        prog="safegrad",
        description="Gradient-surgery kernels and safe LoRA fine-tuning (SafeGrad, SPF, PCGrad).",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="COMMAND", parser_class=BriefErrorParser
    )
    for module in COMMANDS:
        sub_parser = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__.split("\n\n")[0],
            formatter_class=DefaultsFormatter,
        )
        only_when_chosen = getattr(module, "OPTIONS_ONLY_WHEN_CHOSEN", False)
        if command == module.NAME or (command is None and not only_when_chosen):
            module.add_arguments(sub_parser)
        sub_parser.set_defaults(handler=module.run)
    if command in sub.choices:
        parser.command = command
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``safegrad`` console script; returns the exit code.

    ``argv=None`` means this process is the program (the console script, ``python -m
    safegrad_kernels``): a process group still open after the command (torchrun) is closed
    and the process ends there with the code, skipping the interpreter's teardown
    (``shutdown``). With an argv list the group is closed and the code returned.
    """
    enable_offline_mode()  # before any command imports transformers / huggingface_hub
    as_program = argv is None
    code = _run(list(sys.argv[1:] if as_program else argv))
    if shutdown.end_process_group() and as_program:
        shutdown.exit_without_finalizing(code)
    return code


def _run(argv: list[str]) -> int:
    command = next((a for a in argv if not a.startswith("-")), None)
    args = build_parser(command).parse_args(argv)
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

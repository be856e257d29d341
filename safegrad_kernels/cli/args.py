"""What the `safegrad` commands share: argparse value types, the help formatter, option groups
and the delegation of a command to a package imported only when it runs.

Only the standard library and ``data`` are imported here, so building any parser stays fast
and works without transformers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn, TypeVar

from ..data import PROMPT_STYLES, check_ratio

__all__ = [
    "BriefErrorParser",
    "DefaultsFormatter",
    "add_model_arguments",
    "add_prompt_style",
    "add_values",
    "delegated",
    "non_negative_float",
    "non_negative_int",
    "positive_int",
    "ratio",
]

T = TypeVar("T", int, float)
Options = argparse._ActionsContainer  # a parser or one of its argument groups
# An option taking one value: (flag, type, default, help).
Value = tuple[str, Callable[[str], Any], Any, str]


def _checked(convert: Callable[[str], T], accept: Callable[[T], bool], what: str):
    """An argparse type: ``convert(text)`` if it parses and ``accept`` holds, else a usage error."""

    def parse(text: str) -> T:
        try:
            value = convert(text)
            ok = accept(value)
        except ValueError:  # also check_ratio's DataError
            ok = False
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}")
        return value

    return parse


positive_int = _checked(int, lambda v: v >= 1, "a positive integer")
non_negative_int = _checked(int, lambda v: v >= 0, "a non-negative integer")
# `v >= 0` is False for nan, so nan is refused too.
non_negative_float = _checked(float, lambda v: v >= 0, "a non-negative number")
# check_ratio (the one definition of a valid ratio) raises DataError, a ValueError, otherwise.
ratio = _checked(float, lambda v: check_ratio(v) == v, "a number in [0, 1]")


class BriefErrorParser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose usage errors are the error line and where to find help.

    argparse's own ``error`` prints the whole usage first (33 lines for ``safegrad train``)
    and the one line that matters last; here it is two lines on stderr, exit code 2.
    Subparsers inherit the class, so ``safegrad train --bad`` answers the same way.
    """

    # Set on the top-level parser to the chosen command: argparse reports unrecognised
    # arguments from there, and the useful help is the command's.
    command: str | None = None

    def error(self, message: str) -> NoReturn:
        where = f"{self.prog} {self.command}" if self.command else self.prog
        self.exit(2, f"{where}: error: {message}\n(`{where} --help` for usage)\n")


class DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a default only where there is one (not None, not a flag's False)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default in (None, False) or "default" in (action.help or ""):
            return action.help
        return super()._get_help_string(action)


def add_values(group: Options, values: Sequence[Value]) -> None:
    """Add each ``(flag, type, default, help)`` option: the table form of ``add_argument``."""
    for flag, kind, default, text in values:
        group.add_argument(flag, type=kind, default=default, help=text)


def add_model_arguments(group: Options) -> None:
    """``--model`` and ``--trust-remote-code``: the base model every HF command loads."""
    group.add_argument(
        "--model", required=True, help="local Hugging Face causal LM directory (never downloaded)"
    )
    group.add_argument(
        "--trust-remote-code", action="store_true", help="allow model code from --model's directory"
    )


def add_prompt_style(group: Options, *, default: str | None, help: str) -> None:
    """``--prompt-style``: the template that turns an example into the model's prompt."""
    group.add_argument("--prompt-style", choices=PROMPT_STYLES, default=default, help=help)


def delegated(
    command: str, module: str
) -> tuple[Callable[[argparse.ArgumentParser], None], Callable[[argparse.Namespace], int]]:
    """``(add_arguments, run)`` of a command whose options and run are ``module``'s own.

    ``module`` (e.g. the demo package, with its model and plotting) is imported only when
    ``command`` is chosen. If it cannot be imported (the demo extras are not installed), the
    parser still builds and the command says why it is unavailable, exit code 1.
    """
    missing = f"{command}_import_error"

    def add_arguments(parser: argparse.ArgumentParser) -> None:
        try:
            target = importlib.import_module(module)
        except ImportError as exc:
            parser.set_defaults(**{missing: str(exc)})
            return
        target.add_arguments(parser)

    def run(args: argparse.Namespace) -> int:
        if getattr(args, missing, None):
            print(f"safegrad {command}: unavailable ({getattr(args, missing)})", file=sys.stderr)
            return 1
        importlib.import_module(module).run(args)
        return 0

    return add_arguments, run

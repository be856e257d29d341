"""``python -m safegrad_kernels.demo [options]``: the same as ``safegrad demo``."""

from ..cli.args import BriefErrorParser
from . import add_arguments, run


def main() -> None:
    parser = BriefErrorParser(
        prog="python -m safegrad_kernels.demo",
        description="SafeGrad versus SFT, mixed and SPF on a toy aligned Llama (CPU, offline).",
    )
    add_arguments(parser)
    run(parser.parse_args())


if __name__ == "__main__":
    main()

"""Where the tests and the checkout live, for tests in any sub-folder of ``tests/``."""

from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

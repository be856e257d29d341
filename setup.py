"""Packaging hook: bundle the C++ sources into the package for wheels.

The C++ extension is compiled just in time on first use (torch.utils.cpp_extension
with ninja, cached), so building this package never needs torch or a compiler and
pip's isolated build never pulls a CUDA torch. An editable install reads the sources
from the repository's csrc/; a wheel carries a copy in safegrad_kernels/_csrc/.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        if self.editable_mode:
            return
        target = Path(self.build_lib) / "safegrad_kernels" / "_csrc"
        target.mkdir(parents=True, exist_ok=True)
        for src in sorted((ROOT / "csrc").iterdir()):
            if src.suffix in {".cpp", ".h", ".hpp"}:
                shutil.copy2(src, target / src.name)


setup(cmdclass={"build_py": BuildPyWithSources})

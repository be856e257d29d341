"""The op families ``bench_ops`` measures, in the order of its tables."""

from __future__ import annotations

from benchmarks import bench_dot_norms, bench_gram, bench_pcgrad, bench_project
from benchmarks.cases import OpFamily

FAMILIES: dict[str, OpFamily] = {
    f.op: f
    for f in (bench_dot_norms.FAMILY, bench_project.FAMILY, bench_gram.FAMILY, bench_pcgrad.FAMILY)
}

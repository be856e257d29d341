"""The benchmark scripts run end to end in a tiny mode, so they cannot rot unnoticed.

No timing is asserted: only that every provider agrees with the float64 reference
(bench_ops checks that itself before timing) and that the tables and CSV come out.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import bench_ops, bench_step
from benchmarks.workloads import WORKLOADS


def test_workload_shapes_match_the_models():
    # Llama-2-7B r=16 all linear: 448 tensors, 40.0M; q,v r=8: 4.2M; Llama-3-70B: 1120.
    assert (WORKLOADS["W1"].n_tensors, WORKLOADS["W1"].numel) == (448, 39_976_960)
    assert (WORKLOADS["W2"].n_tensors, WORKLOADS["W2"].numel) == (128, 4_194_304)
    assert (WORKLOADS["W3"].n_tensors, WORKLOADS["W3"].numel) == (1120, 207_093_760)
    w4 = WORKLOADS["W4"]
    assert w4.n_tensors == 5000
    assert all(1024 <= s[0] <= 4096 for s in w4.shapes)


def test_bench_ops_tiny(tmp_path):
    out_csv, out_md = tmp_path / "ops.csv", tmp_path / "ops.md"
    rows = bench_ops.main(
        ["--tiny", "--strict", "--dtypes", "fp32,bf16", "--csv", str(out_csv), "--md", str(out_md)]
    )
    ops = {r.case.op for r in rows}
    assert ops == set(bench_ops.ALL_OPS)
    providers = {r.provider for r in rows}
    assert {"loop", "cat", "eager", "flat", "torch"} <= providers
    with out_csv.open() as f:
        written = list(csv.DictReader(f))
    assert len(written) == len(rows)
    assert all(float(r["median_ms"]) > 0 for r in written)
    assert "| provider |" in out_md.read_text()


def test_bench_step_tiny():
    results = bench_step.time_methods("tiny", bench_step.METHODS, steps=1, warmup=0, seed=0)
    assert [r["method"] for r in results] == list(bench_step.METHODS)
    for r in results:
        assert r["step_ms_mean"] > 0
        assert set(r["phases_ms"]) == set(bench_step.PHASES)
        if r["method"] in ("safegrad", "spf", "authors"):
            assert r["phases_ms"]["surgery"] > 0
        r.update(base_rss_mib=100.0, peak_rss_mib=120.0)
    lines = bench_step.table(results)
    assert lines[2].startswith("| sft |")
    assert any("surgery share" in v for v in bench_step.verdicts(results))

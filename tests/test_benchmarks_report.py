"""bench_ops's history and current tables: the CSV keeps every run, a table the latest of each case."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import report
from benchmarks.cases import Case, Row
from benchmarks.families import FAMILIES
from benchmarks.harness import Timing, append_csv, read_csv
from benchmarks.workloads import WORKLOADS, tiny_workload


def _records(work, op, m, conflict, date, threads, scale):
    case = Case(work, torch.float32, FAMILIES[op], m, conflict)
    prov = {
        "date": date,
        "commit": "abc123",
        "machine": "test cpu",
        "cores": "2",
        "threads": threads,
        "torch": "x",
        "triton": "y",
        "device": "cpu",
        "loadavg": "0.5 0.25 0.125",
    }
    rows = [  # loop 3x and flat 1.5x slower than cpp; three samples each, median in the middle
        Row(
            case,
            name,
            Timing([scale * slower * s * 1e-3 for s in (3.0, 2.0, 4.0)]),
            1.5,
            37.0,
            9.0,
            3e-7,
        )
        for name, slower in (("cpp", 1.0), ("loop", 3.0), ("flat", 1.5))
    ]
    return [report.record(r, prov) for r in rows]


def test_current_table_keeps_the_latest_run_of_each_case(tmp_path):
    path, w1 = tmp_path / "ops.csv", WORKLOADS["W1"]
    old = _records(w1, "gram", 4, True, "2026-01-01T00:00:00Z", "1", 7.0)
    kept = _records(w1, "pcgrad_", 2, False, "2026-01-01T00:00:00Z", "1", 11.0)
    new = _records(w1, "gram", 4, True, "2026-02-01T00:00:00Z", "1", 5.0)
    other_threads = _records(w1, "gram", 4, True, "2025-12-01T00:00:00Z", "2", 13.0)
    for batch in (old + kept, new, other_threads):
        append_csv(path, report.CSV_FIELDS, batch)
    assert len(read_csv(path)) == 12  # the history keeps every run
    cases = report.latest(read_csv(path))
    dates = sorted((c[0]["threads"], c[0]["op"], c[0]["date"]) for c in cases)
    assert dates == [
        ("1", "gram", "2026-02-01T00:00:00Z"),
        ("1", "pcgrad_", "2026-01-01T00:00:00Z"),
        ("2", "gram", "2025-12-01T00:00:00Z"),
    ]
    written = report.write_tables(path, str(tmp_path / "ops_{workload}.md"), ["W1"])
    assert written == [tmp_path / "ops_w1.md"]
    text = written[0].read_text()
    assert text.count("### W1 fp32 gram m=4 conflict") == 2  # one per thread count
    assert "### W1 fp32 pcgrad_ m=2 no-conflict" in text
    # The newer gram run's cpp median (5 x 3 ms) is shown, not the older one's (7 x 3 ms);
    # spread = 20th-80th percentile of 10, 15, 20 ms; x loop = 45 / 15; / flat = 15 / 22.5.
    assert "| cpp | 15.0 | 12.0-18.0 | 1.5 | 37 | 3.0 | 0.67 | 3e-07 | 3 |" in text
    assert "| cpp | 21.0 |" not in text
    assert "| cpp | 39.0 |" in text  # the 2-thread run's, in its own section


def test_one_file_for_several_workloads_without_a_placeholder(tmp_path):
    path = tmp_path / "ops.csv"
    tiny = tiny_workload()
    append_csv(
        path, report.CSV_FIELDS, _records(tiny, "dot_norms", 2, True, "2026-01-01", "1", 2.0)
    )
    append_csv(
        path,
        report.CSV_FIELDS,
        _records(WORKLOADS["W4"], "dot_norms", 2, True, "2026-01-01", "1", 3.0),
    )
    (out,) = report.write_tables(path, str(tmp_path / "all.md"), ["tiny", "W4"])
    text = out.read_text()
    assert text.index("# bench_ops: tiny") < text.index("# bench_ops: W4")
    assert "### tiny fp32 dot_norms\n" in text  # dot_norms ignores the conflict setting


def test_append_csv_never_misaligns_a_file_with_other_columns(tmp_path):
    path = tmp_path / "h.csv"
    append_csv(path, ["date", "a"], [{"date": "d1", "a": "1"}])
    append_csv(path, ["date", "a", "b"], [{"date": "d2", "a": "2", "b": "3"}])
    append_csv(path, ["date", "b"], [{"date": "d3", "b": "4"}])
    with path.open() as f:
        assert next(csv.reader(f)) == ["date", "a", "b"]
    assert read_csv(path) == [
        {"date": "d1", "a": "1", "b": ""},
        {"date": "d2", "a": "2", "b": "3"},
        {"date": "d3", "a": "", "b": "4"},
    ]

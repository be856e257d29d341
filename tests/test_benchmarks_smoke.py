"""The benchmark scripts run end to end in a tiny mode, so they cannot rot unnoticed.

No timing is asserted: only that every provider agrees with the float64 reference
(bench_ops checks that itself before timing) and that the tables and CSV come out.
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest
import torch

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


def test_bench_step_variants_use_the_trainer_mechanisms(monkeypatch):
    import safegrad_kernels.losses
    from safegrad_kernels.reference_store import ReferenceStore

    runner = bench_step.StepRunner("tiny", "safegrad+cache+every=2+ab=1", seed=0)
    assert runner.surgeon.alignment_every == 2
    assert [len(idx) for _, idx in runner.align] == [1] * len(runner.align)
    runner.prefill()
    # +cache is SafeGradTrainer(cache_reference=True)'s exact store of the alignment set ...
    assert isinstance(runner.store, ReferenceStore) and runner.store.top_k is None
    assert len(runner.store) == sum(len(idx) for _, idx in runner.align)
    reads = []
    store_get = runner.store.get
    monkeypatch.setattr(runner.store, "get", lambda *a, **k: reads.append(a) or store_get(*a, **k))

    def no_reference_forward(*a, **k):
        raise AssertionError("a +cache step ran the reference forward")

    monkeypatch.setattr(safegrad_kernels.losses, "reference_logits", no_reference_forward)
    for _ in range(5):
        runner.step()
    assert runner.alignment_passes == 4  # steps 0, 1, 2, 4 (SafeGrad.refresh_due)
    assert len(reads) == 4  # ... read on every alignment pass, never recomputed
    # +topk=K is the trainer's reference_top_k=K store.
    topk = bench_step.StepRunner("tiny", "safegrad+topk=4+cache", seed=0)
    assert topk.variant.label == "safegrad+cache+topk=4"
    topk.prefill()
    assert topk.store.top_k == 4 and topk.store.nbytes < runner.store.nbytes
    topk.step()
    bad_variants = ("safegrad+every=0", "sft+cache", "spf+cache", "mixed+every=2")
    for bad in (*bad_variants, "safegrad+fast", "safegrad+topk=4", "safegrad+cache+topk=0"):
        with pytest.raises(ValueError):
            bench_step.parse_variant(bad)
    assert bench_step.parse_variant("safegrad+ab=2+cache").label == "safegrad+cache+ab=2"
    assert bench_step.cost_study("cpu-large")[-2:] == ["safegrad+ab=2", "safegrad+ab=1"]


def test_bench_step_ratios_and_target_verdicts():
    methods = ["sft", "safegrad+every=2", "safegrad+cache"]
    results = bench_step.time_methods("tiny", methods, steps=1, warmup=0, seed=0)
    assert [r["steps"] for r in results] == [2, 2, 2]  # rounded up to a whole period
    assert [len(r["period_ratios"]) for r in results] == [1, 1, 1]
    assert results[0]["period_ratios"] == [1.0]
    for r, extra in zip(results, (10.0, 11.0, 30.0)):
        r.update(base_rss_mib=100.0, peak_rss_mib=100.0 + extra)
    lines = bench_step.ratio_table(results)
    assert lines[2].startswith("| sft |") and len(lines) == 2 + len(methods)
    assert lines[4].endswith("| 30 | 3.00 |")
    ratio = results[2]["period_ratios"][0]
    targets = [
        ("tiny", "safegrad+cache", "time", ratio + 0.01),
        ("tiny", "safegrad+cache", "time", ratio - 0.01),
        ("tiny", "safegrad*", "memory", 2.0),
        ("tiny", "safegrad+cache+every=4", "time", 1.35),
        ("other", "safegrad", "time", 1.0),
    ]
    said = bench_step.target_verdicts("tiny", results, targets)
    assert len(said) == 5
    assert said[0].endswith(": MET") and said[1].endswith(": NOT MET")
    # "safegrad*": one line per SafeGrad variant measured (every=2: 11 MiB, cache: 30 MiB)
    assert "1.10x sft" in said[2] and said[2].endswith(": MET")
    assert "3.00x sft" in said[3] and said[3].endswith(": NOT MET")
    assert said[4].endswith("not measured in this run")


@pytest.mark.parametrize("logits_path", ["safegrad", "safegrad+cache", "spf", "sft"])
def test_bench_step_fused_losses_equal_the_logits_paths(logits_path):
    # +fused is SafeGradTrainer(fused_loss=True)'s path: same losses and task gradient as
    # the logits path on the same model and batches (KL, stored KL, safety CE, task CE).
    fused = f"{logits_path}+fused"
    runners = [bench_step.StepRunner("tiny", m, seed=0) for m in (logits_path, fused)]
    losses, grads = [], []
    for r in runners:
        r.prefill()
        task = r.task_loss(r.user[0])
        task.backward()
        grads.append([p.grad.clone() for p in r.params])
        align = r.alignment_loss(0, r.alignment_reference(0)) if r.spec.needs_alignment else task
        losses.append(torch.stack([task.detach(), align.detach()]))
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=0)
    for g_fused, g_logits in zip(grads[1], grads[0]):
        torch.testing.assert_close(g_fused, g_logits, rtol=1e-5, atol=1e-7)


def test_bench_step_fused_variants_never_materialise_the_logits():
    methods = ["sft", "sft+fused", "safegrad+fused", "safegrad+cache+every=2+fused"]
    runners = [bench_step.StepRunner("tiny", m, seed=0) for m in methods]
    assert [r.variant.fused for r in runners] == [False, True, True, True]
    seq = bench_step.CONFIGS["tiny"][2]
    positions = {}  # method -> the sequence length of every output of the LM head
    for r in runners:
        r.prefill()
        seen = positions.setdefault(r.method, [])
        head = r.model.get_output_embeddings()
        hook = head.register_forward_hook(
            lambda mod, args, out, seen=seen: seen.append(out.shape[1])
        )
        try:
            for _ in range(2):
                r.step()
        finally:
            hook.remove()
    assert set(positions["sft"]) == {seq}  # the logits path: [B, T, V] logits
    # +fused: only fused_head's one position per forward reaches the head (task, live
    # reference and alignment forwards on both steps; the store has no reference forward,
    # and every=2 aligns on both, since steps 0 and 1 refresh: SafeGrad.refresh_due).
    assert positions["sft+fused"] == [1, 1]
    assert positions["safegrad+fused"] == [1] * 6
    assert positions["safegrad+cache+every=2+fused"] == [1] * 4
    with pytest.raises(ValueError, match="fused_loss"):
        bench_step.parse_variant("authors+fused")
    assert bench_step.parse_variant("safegrad+fused+cache").label == "safegrad+cache+fused"
    assert {"safegrad+cache+fused", "safegrad+cache+every=4+fused"} <= set(
        bench_step.cost_study("vocab128k")
    )


def test_bench_step_fused_memory_target_is_checked_against_sft():
    assert ("vocab128k", "safegrad*+fused", "memory", 0.4) in bench_step.ISSUE13_TARGETS
    train = {"sft": 10, "sft+fused": 2, "safegrad": 11, "safegrad+fused": 3, "safegrad+ab=1": 4}
    results = [
        {"method": m, "base_rss_mib": 100.0, "peak_rss_mib": 100.0 + mib}
        for m, mib in train.items()
    ]
    targets = [("tiny", "safegrad*+fused", "memory", 0.4), ("tiny", "safegrad*", "memory", 0.35)]
    said = bench_step.target_verdicts("tiny", results, targets)
    # one line per matching variant, each against sft on the logits path (10 MiB)
    assert said[0].startswith("safegrad+fused training memory: 0.30x sft (3 vs 10 MiB")
    assert said[0].endswith(": MET")
    assert [s.split(" ")[0] for s in said[1:]] == ["safegrad", "safegrad+fused", "safegrad+ab=1"]
    assert [s.endswith(": MET") for s in said[1:]] == [False, True, False]


def test_gpu_check_without_cuda_says_so_and_exits_0(capsys):
    from benchmarks import gpu_check

    if __import__("torch").cuda.is_available():
        pytest.skip("this machine has CUDA: the real check would run")
    assert gpu_check.main([]) == 0
    assert "no CUDA device" in capsys.readouterr().out
    assert gpu_check.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    for stage in ("tests", "ops", "launches", "overhead", "step"):
        assert stage in plan
    assert "8 minutes" in plan


def test_gpu_check_plumbing_on_cpu(tmp_path):
    # The stages' report and CSV writing, in tiny sizes on CPU (no GPU may ever be here).
    from benchmarks import gpu_check

    argv = ["--self-test", "--only", "ops,overhead,step", "--out", str(tmp_path)]
    assert gpu_check.main(argv) == 0
    (md,) = tmp_path.glob("gpu-*.md")
    text = md.read_text()
    assert "## Verdicts" in text and "tiny fp32 project_conflicting_ conflict" in text
    assert "step safegrad / sft" in text and "host overhead step" in text
    (csv_path,) = tmp_path.glob("gpu-*.csv")
    rows = list(csv.DictReader(csv_path.open()))
    assert {r["section"] for r in rows} == {"ops", "overhead", "step"}
    assert all(float(r["median_ms"]) > 0 for r in rows)


def test_kl_fused_memory_empty_output_paths_write_nothing():
    from benchmarks import kl_fused_memory

    args = kl_fused_memory._parser().parse_args(["--md", "", "--csv", ""])
    assert args.md is None and args.csv is None  # not Path(""), the current directory
    defaults = kl_fused_memory._parser().parse_args([])
    assert defaults.md.name == "kl_fused_memory.md" and defaults.csv.suffix == ".csv"


def test_bench_overhead_times_both_layouts(capsys):
    from benchmarks import bench_overhead

    rows = bench_overhead.main(["--counts", "3,17", "--backends", "cpp,torch", "--repeats", "3"])
    assert [(r["backend"], r["n"]) for r in rows] == [
        (b, n) for b in ("cpp", "torch") for n in (3, 17)
    ]
    for row in rows:
        for stage in (
            "step",
            "flat step",
            "flat reference() ctx",
            "flat zero_grad()",
            "pcgrad(3) flat step",
        ):
            assert row[stage] > 0, stage
    out = capsys.readouterr().out
    assert "flat_grads step" in out and "default step" in out and "target" in out

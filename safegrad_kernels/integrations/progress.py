"""What a person reads while ``SafeGradTrainer`` trains: a line per log, a summary, curves.

``TrainingConsole`` replaces the Trainer's progress printer (which writes each log as a
dict of 10+ stringified floats into the progress bar): one line per logging step with the
task loss, the alignment loss, the conflict rate and the cosine between the task and
alignment gradients, written through ``tqdm.write`` so the bar never splits a line. At the
end it draws ``training_curves.png`` (loss, alignment loss, cosine and conflict rate
against the step) and ``summary`` gives the closing lines. It reads only the ``logs`` dicts
the trainer emits (``loss``, ``align_loss``, ``surgery/...``, ``learning_rate``).

Reading the numbers: with a KL alignment loss, the first steps of a fresh LoRA adapter show
``align 0`` and ``cos 0``: the adapter's B factor starts at zero, so the model *is* the
reference and the KL and its gradient g_a are exactly 0 until an update moves it (with
warm-up, the first update has lr 0). The line says so. A SafeGrad coefficient like -3.6e4
next to ``||g_a||^2 = 2e-11`` is the small-g_a regime, not a blow-up: the update removes
``c g_a``, whose norm is ``|<g_u, g_a>| / ||g_a|| <= ||g_u||``.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback

__all__ = ["CURVES_FILE", "TrainingConsole", "format_log_line", "write_training_curves"]

CURVES_FILE = "training_curves.png"

# (log key, panel title) of each curve; SPF logs its conflict share under another name.
_CURVES = (
    (("loss",), "task loss"),
    (("align_loss",), "alignment loss"),
    (("surgery/cosine",), "cos(g_u, g_a)"),
    (("surgery/conflict_rate", "surgery/conflict_fraction"), "conflict rate"),
)
_AT_START = {
    "surgery": "(g_a = 0 at the start: model == reference)",
    "kl": "(KL = 0 at the start: model == reference)",
    "residue": "(g_a ~ 0 at the start: model == reference, up to the stored reference's rounding)",
}


def _first(logs: dict[str, Any], keys: tuple[str, ...]) -> float | None:
    for key in keys:
        value = logs.get(key)
        if isinstance(value, (int, float)):
            return float(value)
    return None


def _number(value: float) -> str:
    return "0" if value == 0 else f"{value:.3g}"


def format_log_line(logs: dict[str, Any], step: int, max_steps: int) -> str:
    """One training log (the Trainer's ``logs`` dict) as one line."""
    width = len(str(max_steps))
    parts = [f"step {step:>{width}}/{max_steps}", f"loss {logs['loss']:.4g}"]
    align = logs.get("align_loss")
    if isinstance(align, (int, float)):
        parts.append(f"align {_number(align)}")
    conflict = _first(logs, _CURVES[3][0])
    if conflict is not None:
        parts.append(f"conflict {conflict:.0%}")
    cosine = logs.get("surgery/cosine")
    if isinstance(cosine, (int, float)):
        parts.append(f"cos {cosine:+.2f}")
    removed = logs.get("surgery/removed_energy")
    if isinstance(removed, (int, float)):
        parts.append(f"removed {removed:.1%} of |g_u|^2")
    lr = logs.get("learning_rate")
    if isinstance(lr, (int, float)):
        parts.append(f"lr {_number(lr)}")
    # While the adapters are still at their start, model == reference and g_a is 0; with
    # the reference store (built from differently padded batches, equal to the live
    # reference only to fp32 rounding) it is a rounding residue, ~1e-18 of ||g_u||^2.
    ref_norm_sq = logs.get("surgery/ref_norm_sq")
    grad_norm_sq = logs.get("surgery/grad_norm_sq")
    if ref_norm_sq == 0:
        parts.append(_AT_START["surgery"])
    elif ref_norm_sq is not None and grad_norm_sq and ref_norm_sq <= 1e-12 * grad_norm_sq:
        parts.append(_AT_START["residue"])
    elif align == 0 and ref_norm_sq is None:
        parts.append(_AT_START["kl"])
    return "  ".join(parts)


def write_training_curves(history: list[dict[str, Any]], path: Path) -> str | None:
    """Draw the curves of ``history`` (``state.log_history``) into ``path``.

    Returns None when written, else why not (matplotlib is optional; no training log).
    """
    rows = [row for row in history if "loss" in row and "step" in row]
    if not rows:
        return "no training step was logged"
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed (pip install matplotlib)"
    fig, axes = plt.subplots(2, 2, figsize=(9, 6), sharex=True)
    for ax, (keys, title) in zip(axes.flat, _CURVES):
        points = [(row["step"], _first(row, keys)) for row in rows]
        points = [(x, y) for x, y in points if y is not None]
        if points:
            ax.plot(*zip(*points), marker="o", markersize=3)
        else:
            ax.text(0.5, 0.5, "not logged by this method", ha="center", va="center",
                    transform=ax.transAxes, color="grey")  # fmt: skip
        ax.set_title(title)
        ax.grid(alpha=0.3)
    for ax in axes[1]:
        ax.set_xlabel("optimizer step")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return None


def _written(folder: Path) -> str:
    names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
    checkpoints = sorted(
        (n for n in names if n.startswith("checkpoint-")), key=lambda n: int(n.split("-")[-1])
    )
    files = [n + (" (PEFT's model card)" if n == "README.md" else "") for n in names
             if not n.startswith("checkpoint-")]  # fmt: skip
    return ", ".join(files + checkpoints)


class TrainingConsole(TrainerCallback):
    """Progress bar, one concise line per logging step, curves at the end (main process).

    Install it in place of the Trainer's ``ProgressCallback``/``PrinterCallback``;
    ``bar=False`` prints the lines without a bar (``disable_tqdm``).
    """

    def __init__(self, *, bar: bool = True) -> None:
        self.show_bar = bar
        self._bar: Any = None
        self._step = 0
        self.history: list[dict[str, Any]] = []
        self.curves_path: Path | None = None
        self.curves_missing: str | None = None

    def _write(self, line: str) -> None:
        if self._bar is not None:
            self._bar.write(line)
        else:
            print(line, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        self._step = state.global_step
        if self.show_bar:
            self._bar = tqdm(total=state.max_steps, initial=self._step, dynamic_ncols=True)
        window = f"means over {args.logging_steps} steps" if args.logging_steps > 1 else "per step"
        self._write(
            f"each line ({window}): task loss; align = alignment loss; conflict = share of "
            "steps with <g_u, g_a> < 0; cos = cos(g_u, g_a); lr"
        )

    def on_step_end(self, args, state, control, **kwargs):
        if self._bar is not None:
            self._bar.update(state.global_step - self._step)
        self._step = state.global_step

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.is_world_process_zero and logs and "loss" in logs:
            self._write(format_log_line(logs, state.global_step, state.max_steps))

    def on_train_end(self, args, state, control, **kwargs):
        if not state.is_world_process_zero:
            return
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self.history = list(state.log_history)
        path = Path(args.output_dir) / CURVES_FILE
        self.curves_missing = write_training_curves(self.history, path)
        self.curves_path = None if self.curves_missing else path

    def summary(self, seconds: float, output_dir: Path) -> list[str]:
        """The closing lines: steps, time, final loss and surgery stats, files written."""
        rows = [row for row in self.history if "loss" in row]
        step = self.history[-1].get("step", 0) if self.history else 0
        head = f"finished: step {step} in {seconds:.1f} s"
        if rows:
            head += f"; final loss {rows[-1]['loss']:.4g} (first logged {rows[0]['loss']:.4g})"
            align = [r["align_loss"] for r in rows if "align_loss" in r]
            if align:
                head += f"; final align loss {_number(align[-1])}"
            conflict = [v for v in (_first(r, _CURVES[3][0]) for r in rows) if v is not None]
            if conflict:
                head += f"; conflict rate {statistics.fmean(conflict):.0%} of steps"
            cosine = [r["surgery/cosine"] for r in rows if "surgery/cosine" in r]
            if cosine:
                head += f", mean cos {statistics.fmean(cosine):+.2f}"
        lines = [head, f"wrote to {output_dir}: {_written(output_dir)}"]
        if self.curves_missing:
            lines.append(f"{CURVES_FILE} not written: {self.curves_missing}")
        return lines

"""Peak host memory of the KL alignment loss, chunked vs direct (one subprocess per variant).

Usage: python kl_memory.py [B T V]   (default 8 512 32000, bf16 logits with grad)
Peak = ru_maxrss after forward+backward minus the RSS once the inputs exist.
"""

import resource
import subprocess
import sys

import torch
import torch.nn.functional as F


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def _run(variant: str, b: int, t: int, v: int) -> None:
    from safegrad_kernels.losses import kl_alignment_loss

    torch.manual_seed(0)
    logits = torch.randn(b, t, v, dtype=torch.bfloat16).requires_grad_()
    ref = torch.randn(b, t, v, dtype=torch.bfloat16)
    labels = torch.randint(0, v, (b, t))
    labels[:, : t // 2] = -100
    base = _rss_mib()
    if variant == "chunked":
        loss = kl_alignment_loss(logits, ref, labels, positions="all")
    else:  # the authors' formulation, fp32
        n = (labels[:, 1:] != -100).sum()
        loss = (
            F.kl_div(
                torch.log_softmax(logits.float(), -1),
                torch.softmax(ref.float(), -1),
                reduction="sum",
            )
            / n
        )
    loss.backward()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"{variant},{peak - base:.0f},{float(loss):.6f}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("chunked", "direct"):
        _run(sys.argv[1], *map(int, sys.argv[2:5]))
        sys.exit()
    b, t, v = map(int, sys.argv[1:4]) if len(sys.argv) > 3 else (8, 512, 32000)
    mib = b * t * v * 2 / 2**20
    print(f"bf16 logits [{b}, {t}, {v}] = {mib:.0f} MiB; peak extra MiB above inputs:")
    for variant in ("chunked", "direct"):
        out = subprocess.run(
            [sys.executable, __file__, variant, str(b), str(t), str(v)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        print(out)

"""Does the optimizer step keep SafeGrad's promise? (investigation behind report.md)

SafeGrad makes the *gradient* non-conflicting: <g_u - c g_a + rho g_a, g_a> = rho ||g_a||^2
>= 0 whenever it projects. The parameters move by AdamW's step, lr * m / sqrt(v), not by
the gradient. This script replays the default demo's user stage (p=0.3, seeds 0-2) for
safegrad rho=1 and mixed lam=1 and records, per step, the cosine between the actual
parameter change and -g_a (positive: the step lowers the KL to first order).

    PYTHONPATH=. python docs/demo/investigate_update_direction.py
"""

import statistics

import torch

from safegrad_kernels import dot_norms, project_conflicting_
from safegrad_kernels.demo import train, world
from safegrad_kernels.demo.model import ModelSpec
from safegrad_kernels.integrations.peft import lora_parameters
from safegrad_kernels.losses import kl_alignment_loss, response_ce

torch.set_num_threads(1)
tok, mspec, aspec, uspec = world.WordTokenizer(), ModelSpec(), train.AlignSpec(), train.UserSpec()
state, _ = train.aligned_state(tok, mspec, aspec)

for method, weight in (("safegrad", 1.0), ("mixed", 1.0)):
    grad_cos, step_cos = [], []
    for seed in (0, 1, 2):
        model = train.lora_model(state, tok, mspec, uspec, seed)
        params = lora_parameters(model)
        user = world.encode_batch(tok, world.user_data(uspec.samples, 0.3, seed), uspec.max_len)
        safety = world.encode_batch(
            tok, world.safety_data(uspec.safety_samples, seed + 10_000), uspec.max_len
        )
        with model.disable_adapter(), torch.no_grad():
            safety["ref_logits"] = train._forward(model, safety)
        gen = torch.Generator().manual_seed(seed)
        ub_it = train._batches(user, uspec.batch_size, gen)
        sb_it = train._batches(safety, uspec.batch_size, gen)
        opt = torch.optim.AdamW(params, lr=uspec.lr, weight_decay=0.0)
        model.train()
        for _ in range(uspec.epochs * (uspec.samples // uspec.batch_size)):
            ub, sb = next(ub_it), next(sb_it)
            opt.zero_grad(set_to_none=True)
            kl = kl_alignment_loss(train._forward(model, sb), sb["ref_logits"], sb["labels"])
            kl.backward()
            g_a = [p.grad.clone() for p in params]
            opt.zero_grad(set_to_none=True)
            response_ce(train._forward(model, ub), ub["labels"]).backward()
            if method == "safegrad":
                project_conflicting_([p.grad for p in params], g_a, rho=weight)
            else:
                for p, r in zip(params, g_a):
                    p.grad.add_(r, alpha=weight)
            update = [p.grad.clone() for p in params]
            before = [p.detach().clone() for p in params]
            opt.step()
            delta = [p.detach() - b for p, b in zip(params, before)]
            d1, aa, uu = dot_norms(update, g_a).tolist()
            d2, _, dd = dot_norms(delta, g_a).tolist()
            if aa > 1e-12:
                grad_cos.append(-d1 / (aa * uu) ** 0.5)  # update direction vs descent on KL
                step_cos.append(-d2 / (aa * dd) ** 0.5 if dd > 0 else 0.0)
    for name, vals in (("gradient fed to AdamW", grad_cos), ("actual parameter step", step_cos)):
        # For the gradient g, "lowers KL" means <g, g_a> > 0 (the step is -lr * g).
        vals = [-v for v in vals] if name.startswith("gradient") else vals
        share = sum(v > 0 for v in vals) / len(vals)
        print(
            f"{method} w={weight}: {name}: lowers KL on {100 * share:.0f}% of steps, "
            f"mean cos with -g_a {statistics.fmean(vals):+.3f}"
        )

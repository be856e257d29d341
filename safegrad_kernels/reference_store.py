"""Reference log-probabilities of a fixed alignment set, computed once, stored compactly.

``ReferenceStore.build`` runs the starting model (adapters disabled) once over the alignment
set and keeps, for each example and only for the positions the loss reads, either the
exact reference log-probabilities or the top-k of them plus the tail mass. ``get`` lays
them out for any batch of those examples as ``fused_losses.ReferenceLogProbs``, which both
the logits path (``kl_from_reference``, or ``kl_alignment_loss(logits, ref.dense())``) and
the fused path (``fused_linear_kl``) accept. It is meant to replace ``losses.ReferenceCache``
(logits on the host, filled on the first visit): everything is computed before the first
step, and a resumed run reloads it with ``load_state_dict``.

Size, per stored row (a position the loss reads) at vocabulary V, plus 4 bytes of position:

=====================  ==================  ============================================
mode                   bytes per row       100 examples x 1024 rows, V = 128,256
=====================  ==================  ============================================
dense float32          4 V                 52.5 GB  (exact)
dense float16/bfloat16 2 V                 26.3 GB  (error below)
top-k (k = 64)         8 k + 4             53.2 MB  (fp32 values, int32 ids, tail)
=====================  ==================  ============================================

(``ReferenceStore.nbytes_for`` computes these; the table is its output plus positions.)

Error of a half-precision dense store. Let l = log q be the fp32 reference log-probs of a
row and l~ = fl(l) the stored ones, |l~_i - l_i| <= d_i = u |l_i| + eta with the unit
roundoff u = 2^-8 (bfloat16), 2^-11 (float16) and eta the subnormal half-spacing (2^-25 for
float16, negligible for bfloat16). The loss renormalises (log_softmax of the stored
row), so it sees q~_i = q_i e^(l~_i - l_i) / Z. With c = log sum_j q_j e^(d_j) one has
|log Z| <= c (Jensen both ways), hence |log(q~_i / q_i)| <= d_i + c and

  * logit gradient of a row (p - q~ instead of p - q):
    ||q~ - q||_1 <= sum_i q_i (e^(d_i + c) - 1) = e^(2c) - 1  ~=  2 u H(q)
  * KL of a row, KL(q~||p) - KL(q||p) = sum (q~_i - q_i) log(q_i / p_i) + KL(q~||q):
    |error| <= sum_i q_i (e^(d_i + c) - 1) |l_i - log p_i| + e^c sum_i q_i e^(d_i) d_i + c

H(q) is the entropy in nats. Both scale with the row weight / count like the loss itself.
At H = 2 nats: gradient error 1.6% (bfloat16) or 0.2% (float16) of the largest possible
||p - q||_1 = 2, and close to the start of training, where p ~= q, this is comparable to
the true gradient; a bfloat16 reference forward makes errors of the same order. Float32
stores are exact up to fp32 rounding (log_softmax of stored log-probs returns them to
~1e-7).

Error of a top-k store. Per row, K the stored tokens, Q = 1 - sum_K q the reference tail
mass (stored as its log, a logsumexp of the tail, exact in fp32), P = 1 - sum_K p the
model's. The top-k KL is the KL of the two distributions coarsened to K plus one tail
bucket, so by the chain rule of KL

  KL(q||p) - KL_topk = Q KL(q_tail / Q || p_tail / P)  in  [0, Q (log P - min_tail log p)]

(the upper end since KL(a||b) <= -sum a log b <= -min log b for a distribution a):
the top-k KL never overestimates, and the gap is computable during training from the
model's own tail. Its logit gradient is p - q' with q' = q on K and Q p_j / P on the tail
(the unknown tail of q replaced by the model's tail shape), so the gradient error of a row
is Q (q_tail / Q - p_tail / P) on the tail, 0 on K:

  ||error||_1 <= 2 Q  (and <= Q sqrt(2 KL(q_tail/Q || p_tail/P)) by Pinsker),
  ||error||_2 <= sqrt(2) Q,

and for the hidden-state gradient (times W) ||error||_2 <= sqrt(2) Q sigma_max(W). The
store reports the largest and mean Q it kept (``tail_mass_max``, ``tail_mass_mean``), so
the bound of a given store is known before training. The loss bound is a worst case: on
the test distributions (tests/test_reference_store.py, V = 257, k = 1-64) the gap was
1/40 to 1/120 of it (seed 0), and the gradient error 0.34-0.44 of 2 Q.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from .fused_losses import ReferenceLogProbs, chunk_rows_for_budget, loss_rows
from .losses import Positions

__all__ = ["ReferenceStore"]

Head = tuple[Tensor, Tensor, Tensor | None]
ModelFn = Callable[[Mapping[str, Any]], "Tensor | Head"]

_DENSE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_STATE_VERSION = 1


class ReferenceStore:
    """Reference log-probabilities of a fixed set of examples, keyed by example index.

    Build with ``ReferenceStore.build``; an empty store (the constructor) is only useful
    for ``load_state_dict``. Rows are the positions ``t`` the loss reads: with
    ``positions="response"`` those with ``labels[t + 1] != ignore_index`` (any right
    padding of a later batch is fine), with ``"all"`` every position of the example as it
    was built (a later batch must have the same length).
    """

    def __init__(
        self,
        *,
        positions: Positions = "response",
        top_k: int | None = None,
        dtype: torch.dtype = torch.float32,
        ignore_index: int = -100,
    ) -> None:
        if positions not in ("response", "all"):
            raise ValueError(f"positions must be 'response' or 'all', got {positions!r}")
        if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int)):
            raise TypeError(f"top_k must be an int or None, got {type(top_k).__name__}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_k is None and dtype not in _DENSE_DTYPES:
            raise ValueError(f"dtype must be one of {_DENSE_DTYPES}, got {dtype}")
        if top_k is not None and dtype != torch.float32:
            raise ValueError(
                "top-k values are stored in float32 (8 k bytes a row with their ids; the "
                f"stated bound assumes exact values), got dtype={dtype}"
            )
        self.positions: Positions = positions
        self.top_k = top_k
        self.dtype = dtype
        self.ignore_index = ignore_index
        self.vocab = 0
        self._slot: dict[int, int] = {}  # example index -> slot
        self._offsets = torch.zeros(1, dtype=torch.long)  # slot -> first row, [n + 1]
        self._lengths = torch.zeros(0, dtype=torch.long)  # slot -> sequence length built
        self._positions = torch.zeros(0, dtype=torch.int32)  # row -> position in example
        self._values: dict[str, Tensor] = {}

    # -- building ----------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        model_fn: ModelFn,
        batches: Iterable[tuple[Sequence[int], Mapping[str, Any]]],
        positions: Positions = "response",
        top_k: int | None = None,
        dtype: torch.dtype = torch.float32,
        *,
        ignore_index: int = -100,
        memory_budget: int | None = None,
    ) -> ReferenceStore:
        """Run ``model_fn`` once per batch, without autograd, and keep the loss rows.

        ``batches`` yields ``(indices, batch)``: the dataset index of each row and the
        collated batch (``labels`` is required). ``model_fn(batch)`` returns the reference
        logits ``[B, T, V]`` (e.g. ``losses.reference_logits(model, batch)``) or the
        reference ``(hidden, weight, bias)`` (e.g. from
        ``integrations.fused_head.reference_hidden_states``), in which case only the loss
        rows go through the head, ``memory_budget`` bytes of logits at a time.
        """
        store = cls(positions=positions, top_k=top_k, dtype=dtype, ignore_index=ignore_index)
        parts: dict[str, list[Tensor]] = {}
        positions_parts: list[Tensor] = []
        counts: list[int] = []
        lengths: list[int] = []
        for indices, batch in batches:
            labels = batch["labels"]
            batch_size, seq = labels.shape
            if len(indices) != batch_size:
                raise ValueError(f"{len(indices)} indices for a batch of {batch_size} rows")
            with torch.no_grad():
                values = store._row_values(model_fn(batch), labels, memory_budget)
            rows = values.pop("rows").cpu()
            per_example = torch.bincount(rows // seq, minlength=batch_size).tolist()
            for name, tensor in values.items():
                parts.setdefault(name, []).append(tensor)
            positions_parts.append((rows % seq).to(torch.int32))
            for i, n in zip(indices, per_example):
                if int(i) in store._slot:
                    raise ValueError(f"example index {int(i)} appears twice in the batches")
                store._slot[int(i)] = len(counts)
                counts.append(n)
                lengths.append(seq)
        if not counts:
            raise ValueError("no batches to build the reference store from")
        store._offsets = torch.tensor([0, *counts]).cumsum(0)
        store._lengths = torch.tensor(lengths)
        store._positions = torch.cat(positions_parts)
        store._values = {name: torch.cat(tensors) for name, tensors in parts.items()}
        return store

    def _row_values(
        self, out: Tensor | Head, labels: Tensor, memory_budget: int | None
    ) -> dict[str, Tensor]:
        """Log-probs (or top-k) of the loss rows of one batch, on the host."""
        if isinstance(out, Tensor):
            if out.dim() != 3 or out.shape[:2] != labels.shape:
                raise ValueError(
                    f"model_fn returned logits {tuple(out.shape)} for labels {tuple(labels.shape)}"
                )
            flat = out.reshape(-1, out.shape[-1])
            vocab, itemsize = out.shape[-1], out.element_size()

            def logits_of(r: Tensor) -> Tensor:
                return flat.index_select(0, r).float()
        else:
            hidden, weight, bias = out
            if hidden.shape[:2] != labels.shape:
                raise ValueError(
                    f"model_fn returned hidden {tuple(hidden.shape)} for labels "
                    f"{tuple(labels.shape)}"
                )
            flat = hidden.reshape(-1, hidden.shape[-1])
            vocab, itemsize = weight.shape[0], hidden.element_size()

            def logits_of(r: Tensor) -> Tensor:
                return F.linear(flat.index_select(0, r), weight, bias).float()

        if self.vocab and vocab != self.vocab:
            raise ValueError(f"vocabulary changed from {self.vocab} to {vocab} between batches")
        self.vocab = vocab
        rows = loss_rows(labels.to(flat.device), self.positions, self.ignore_index)
        chunk = chunk_rows_for_budget(vocab, itemsize, memory_budget)
        pieces: dict[str, list[Tensor]] = {}
        for start in range(0, rows.shape[0], chunk):
            log_q = torch.log_softmax(logits_of(rows[start : start + chunk]), dim=-1)
            for name, tensor in self._compress(log_q).items():
                pieces.setdefault(name, []).append(tensor.cpu())
        if not pieces:  # no loss rows in this batch
            pieces = {
                name: [t.cpu()] for name, t in self._compress(flat.new_zeros(0, vocab)).items()
            }
        values = {name: torch.cat(tensors) for name, tensors in pieces.items()}
        values["rows"] = rows
        return values

    def _compress(self, log_q: Tensor) -> dict[str, Tensor]:
        if self.top_k is None:
            return {"logprobs": log_q.to(self.dtype)}
        k = min(self.top_k, log_q.shape[-1])
        top, index = log_q.topk(k, dim=-1)
        # log of the mass outside the top k as a logsumexp over it: 1 - sum(top) would
        # cancel to 0 in fp32 when the top k hold all but ~1e-7.
        tail = torch.logsumexp(log_q.scatter(1, index, float("-inf")), dim=-1)
        return {"topk_logprobs": top, "topk_index": index.to(torch.int32), "tail_logmass": tail}

    # -- reading -----------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._slot)

    def __contains__(self, index: int) -> bool:
        return int(index) in self._slot

    @property
    def nbytes(self) -> int:
        """Host bytes held: values, ids, tail masses and row positions."""
        tensors = [*self._values.values(), self._positions]
        return sum(t.numel() * t.element_size() for t in tensors)

    @property
    def num_rows(self) -> int:
        return int(self._positions.shape[0])

    @staticmethod
    def nbytes_for(
        num_rows: int, vocab: int, top_k: int | None = None, dtype: torch.dtype = torch.float32
    ) -> int:
        """Bytes a store of ``num_rows`` loss rows holds (the size table of this module)."""
        per_row = 4  # position
        if top_k is None:
            per_row += vocab * torch.empty(0, dtype=dtype).element_size()
        else:
            per_row += 8 * min(top_k, vocab) + 4
        return num_rows * per_row

    @property
    def tail_mass_max(self) -> float:
        """Largest reference mass outside the stored top k (0 for a dense store)."""
        tail = self._values.get("tail_logmass")
        return 0.0 if tail is None or tail.numel() == 0 else float(tail.max().exp())

    @property
    def tail_mass_mean(self) -> float:
        tail = self._values.get("tail_logmass")
        return 0.0 if tail is None or tail.numel() == 0 else float(tail.exp().mean())

    def get(
        self,
        indices: Sequence[int],
        *,
        seq_len: int | None = None,
        device: torch.device | str | None = None,
        labels: Tensor | None = None,
    ) -> ReferenceLogProbs:
        """References of the examples ``indices`` laid out as a batch ``[len(indices), T]``.

        ``T`` is ``seq_len``, else ``labels.shape[1]``, else the longest built length of
        these examples. With ``labels`` (host tensor preferred: a device one is copied to
        the host), the stored positions are checked against them and a mismatch raises
        (the example changed since the build). ``device`` defaults to ``labels``' device.
        """
        if not self._slot:
            raise ValueError("the reference store is empty")
        try:
            slots = [self._slot[int(i)] for i in indices]
        except KeyError as err:
            raise KeyError(f"example index {err.args[0]} is not in the reference store") from None
        if labels is not None:
            if labels.dim() != 2 or labels.shape[0] != len(slots):
                raise ValueError(f"labels shape {tuple(labels.shape)} for {len(slots)} indices")
            seq_len = labels.shape[1] if seq_len is None else seq_len
            device = labels.device if device is None else device
        lengths = self._lengths[slots]
        if seq_len is None:
            seq_len = int(lengths.max())
        row_parts, pos_parts = [], []
        for b, slot in enumerate(slots):
            start, end = int(self._offsets[slot]), int(self._offsets[slot + 1])
            pos = self._positions[start:end].long()
            if self.positions == "all" and int(lengths[b]) != seq_len:
                raise ValueError(
                    f"positions='all': example {int(indices[b])} was built with length "
                    f"{int(lengths[b])}, the batch has {seq_len}"
                )
            if pos.numel() and int(pos[-1]) >= seq_len - (self.positions == "response"):
                raise ValueError(
                    f"example {int(indices[b])} has loss rows up to position {int(pos[-1])}, "
                    f"beyond a batch of length {seq_len}"
                )
            pos_parts.append(pos)
            row_parts.append(torch.arange(start, end))
        if labels is not None:
            self._check_labels(labels.cpu(), pos_parts, indices)
        take = torch.cat(row_parts)
        flat_rows = torch.cat([b * seq_len + pos for b, pos in enumerate(pos_parts)])
        values = {name: t.index_select(0, take) for name, t in self._values.items()}
        ref = ReferenceLogProbs(
            rows=flat_rows,
            batch_size=len(slots),
            seq_len=seq_len,
            vocab=self.vocab,
            positions=self.positions,
            logprobs=values.get("logprobs"),
            topk_logprobs=values.get("topk_logprobs"),
            topk_index=None if "topk_index" not in values else values["topk_index"].long(),
            tail_logmass=values.get("tail_logmass"),
        )
        return ref if device is None else ref.to(device)

    def _check_labels(self, labels: Tensor, stored: list[Tensor], indices: Sequence[int]) -> None:
        if self.positions == "all":
            return  # every position: nothing in the labels to disagree with
        rows = loss_rows(labels, "response", self.ignore_index)
        seq = labels.shape[1]
        for b, pos in enumerate(stored):
            want = rows[rows // seq == b] % seq
            if not torch.equal(want, pos):
                raise ValueError(
                    f"example {int(indices[b])}: its response positions differ from those "
                    "the reference store was built with (the example changed)"
                )

    # -- resume ------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        indices = sorted(self._slot, key=self._slot.__getitem__)
        return {
            "version": _STATE_VERSION,
            "positions": self.positions,
            "top_k": self.top_k,
            "dtype": str(self.dtype).removeprefix("torch."),
            "ignore_index": self.ignore_index,
            "vocab": self.vocab,
            "indices": torch.tensor(indices, dtype=torch.long),
            "offsets": self._offsets.clone(),
            "lengths": self._lengths.clone(),
            "row_positions": self._positions.clone(),
            **{name: t.clone() for name, t in self._values.items()},
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Replace this store's contents; validated before anything changes."""
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"unknown reference store version {state.get('version')!r}")
        dtype = getattr(torch, str(state["dtype"]), None)
        template = ReferenceStore(
            positions=state["positions"],
            top_k=state["top_k"],
            dtype=dtype if isinstance(dtype, torch.dtype) else torch.float32,
            ignore_index=state["ignore_index"],
        )
        names = (
            ("logprobs",)
            if state["top_k"] is None
            else ("topk_logprobs", "topk_index", "tail_logmass")
        )
        missing = [n for n in names if n not in state]
        if missing:
            raise ValueError(f"reference store state lacks {missing}")
        indices, offsets = state["indices"], state["offsets"]
        n_rows = state["row_positions"].shape[0]
        if offsets.shape[0] != indices.shape[0] + 1 or int(offsets[-1]) != n_rows:
            raise ValueError("reference store state: offsets do not match indices and rows")
        if any(state[n].shape[0] != n_rows for n in names):
            raise ValueError("reference store state: value tensors do not match the rows")
        self.positions, self.top_k = template.positions, template.top_k
        self.dtype, self.ignore_index = template.dtype, template.ignore_index
        self.vocab = int(state["vocab"])
        self._slot = {int(i): s for s, i in enumerate(indices.tolist())}
        self._offsets = offsets.clone()
        self._lengths = state["lengths"].clone()
        self._positions = state["row_positions"].clone()
        self._values = {n: state[n].clone() for n in names}

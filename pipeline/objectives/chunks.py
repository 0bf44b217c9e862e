"""Chunks of positions: the one place where vocabulary-sized tensors are built, a chunk of rows at a time.

`chunked(fn, n, size, *args, head=, hints=)` sums fn's terms over chunks of rows. Under autograd it is *fused*: each
chunk's terms and, in the same pass, their gradients with respect to the chunk's differentiable inputs (rows of
`args` that require grad, the student head's trainable weight and bias) are taken with a local `torch.autograd.grad`
and summed, so no chunk's (rows x vocabulary) tensors outlive it and nothing is recomputed. The summed terms leave
through one autograd node (`_Fused`) whose backward scales the stored gradients by the gradient arriving for them.

That needs each term's weight in the loss while the chunks run, before the loss exists: `hints` gives it, up to one
common factor (the accumulation's or the on-policy mix's scale is left to the backward). A term whose weight is
unknown until every chunk has run is hinted `None`: its gradient is kept apart, at the cost of one more backward
through the chunk for it and a weight-gradient buffer of its own. A term that reaches the inputs only through the
recorded head's logits can be hinted `After(rows)` instead: the nonzero rows of its logits' gradient wait, with their
head inputs, for the weight the backward brings, and their head-gradient product is made then (the DSKD family's
agreement-masked term, divided by the agreeing count, whose gradient is nonzero on the agreeing rows alone; when
many rows agree it counts them first instead: `dual_space.agreement`). A single differentiable term needs no hint.
In backward the arriving gradients are checked against the hints; when they disagree (a wrong guess, or a caller
asking for one term alone, as the per-term gradient diagnostics do) the chunks are recomputed with the
arriving weights, the checkpointed path of before: the hints decide speed, never the gradient.

Under ZeRO-3 the head's partitioned weight is gathered around the fused node (the node sees its full shape, so the
stored full gradient reaches DeepSpeed's own reduction as the module's backward would); a frozen head (LoRA) keeps
no weight gradient; gradients are summed in float32 and returned in each input's dtype (bf16 under mixed precision).
"""

from __future__ import annotations

import bisect
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.losses import accumulate, is_maximum
from pipeline.models.zero3 import detached_full, gathered
from pipeline.objectives.base import linear_sg

# relative tolerance between an arriving gradient and its hint (both float32 products of the same normalisers)
HINT_RTOL = 1e-5
# a common factor within this of 1 is taken as 1 (float32 rounding of the loss's arithmetic, eps 1.2e-7)
UNIT_RTOL = 1e-6


@dataclass(frozen=True)
class After:
    """A term's hint when its weight is known only after every chunk has run and the term reaches the inputs only
    through the recorded head's logits (the DSKD family's agreement-masked divergence, divided by the agreeing
    count): per chunk, the nonzero rows of its logits' gradient wait with their head inputs for the weight the
    backward brings (their row inputs' gradient is taken at once, over those rows alone), so nothing is counted
    first or multiplied twice. While they are at most `rows` rows; beyond, they are dropped and the backward
    recomputes the chunks (the caller's guess of the count was wrong). Without a recorded head: kept apart (None)."""

    rows: int


def pieces(n: int, size: int, cuts: torch.Tensor | None = None) -> list[tuple[int, int]]:
    """[start, end) spans of at most `size` rows covering n rows; with `cuts` ((n,) bool, True where a span may start),
    spans start only there (a span grows past `size` when it must)."""
    if cuts is None:
        return [(s, min(s + size, n)) for s in range(0, n, size)]
    allowed = torch.nonzero(cuts[1:].cpu())[:, 0].add(1).tolist() + [n]
    out, start = [], 0
    while start < n:
        i = bisect.bisect_right(allowed, start + size) - 1  # the furthest start within `size`
        end = allowed[i] if i >= 0 and allowed[i] > start else allowed[bisect.bisect_right(allowed, start)]
        out.append((start, end))
        start = end
    return out


def whole_groups(group: torch.Tensor) -> torch.Tensor:
    """(n,) bool: where a span of rows may start without splitting a group (rows of one group id >= 0 anywhere in
    `group` (n,) long; -1: in no group), so that a term summed per group can be taken span by span."""
    group = group.cpu().long()
    n = len(group)
    if n == 0:
        return torch.zeros(0, dtype=torch.bool)
    rows = torch.arange(n)
    grouped = group >= 0
    last = torch.full((int(group.max()) + 1 if grouped.any() else 1,), -1, dtype=torch.long)
    last.scatter_reduce_(0, group[grouped], rows[grouped], reduce="amax")
    reach = torch.where(grouped, last[group.clamp(min=0)], rows)  # the last row this row's group needs
    done_before = torch.cat([torch.full((1,), -1), torch.cummax(reach, 0).values[:-1]])
    return done_before < rows


def _call(fn, head, rows: list, span: tuple[int, int]):
    """The terms of the rows `span` (start, end): the single call site of every chunk's forward (tests count it)."""
    return fn(head, *rows)


def chunked(fn, n: int, size: int, *args, head: nn.Module | None = None, hints: dict | None = None,
            cuts: torch.Tensor | None = None, head_on_first: bool = False) -> dict[str, torch.Tensor]:
    """fn(head, *rows) -> dict of scalar tensors summed over rows, over spans of rows of each tensor / SparseLogits in
    `args` (None passes through); the spans' values are folded by `losses.accumulate` (`max_` names maxed: statistics,
    without gradient when fused; the rest summed). `head`: the student's output layer fn applies (its trainable weight and bias get gradients).
    `hints`: each differentiable term's weight in the loss (up to a common factor), None or `After` for one known
    only afterwards; see the module's docstring. `cuts`: where spans may start (`whole_groups`). `head_on_first`: fn
    applies `head` to the first arg's rows as they are, so a plain head's logits of two short spans may be taken in
    one product (`_Run.ahead`)."""
    spans = pieces(n, size, cuts)
    diff = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and a.requires_grad]
    params = [] if head is None else [p for p in head.parameters() if p.requires_grad]
    if not torch.is_grad_enabled() or len(spans) <= 1 or not (diff or params):
        out: dict[str, torch.Tensor] = {}
        for s, e in spans or [(0, 0)]:
            accumulate(out, _call(fn, head, _rows(args, s, e), (s, e)))
        return out
    run = _Run(fn, args, spans, diff, head, hints or {}, head_on_first)
    with gathered(run.params):  # ZeRO-3: the node's inputs in their full shape
        values = _Fused.apply(run, *[args[i] for i in diff], *run.params)
    return dict(zip(run.names, values))


def _rows(args, s: int, e: int) -> list:
    return [a if a is None else a[s:e] for a in args]


class Recorder(nn.Module):
    """A plain linear head over its weights' storage, without autograd on them: each call's input and output are
    recorded, and the weight's gradient is taken from them (dz^T x, accumulated in place into one float32 buffer)
    instead of by autograd, which would write a new (V x d) tensor per chunk. Its gradient stops at the head: a head
    tied to the input embeddings would otherwise send each chunk's gradient through the body."""

    def __init__(self, head: nn.Module):
        super().__init__()
        self.weight = head.weight.detach()
        bias = getattr(head, "bias", None)
        self.bias = None if bias is None else bias.detach()
        self.out_features = self.weight.shape[0]
        self.calls: list[tuple] = []  # (x, z)
        self.ready: tuple[int, torch.Tensor] | None = None  # (the rows' data pointer, their logits): `_Run.sweep`

    def _take_ready(self, x: torch.Tensor) -> torch.Tensor | None:
        """The logits computed ahead for exactly the rows `x` (same storage and length), once; else None."""
        ready, self.ready = self.ready, None
        if ready is None or ready[0] != x.data_ptr() or ready[1].shape[:-1] != x.shape[:-1]:
            return None
        return ready[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x @ W^T (+ b), recorded."""
        ready = self._take_ready(x)
        z = F.linear(x, self.weight, self.bias) if ready is None else _Kept.apply(x, ready, self)
        if z.requires_grad:
            self.calls.append((x, z))
        return z

    def with_kept(self, x: torch.Tensor, xt: torch.Tensor,
                  kept: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x @ W^T (+ b) recorded, the head applied to `xt` without training it: `kept`, computed before, or in
        the same product as x's rows), whose backward takes both rows' gradients in one product (the weight read
        once). Two outputs, not slices of one, so that neither's gradient is built (V wide) over the other's rows."""
        z, zt = _Joint.apply(x, xt, kept, self.weight, self.bias, self._take_ready(x))
        if z.requires_grad:
            self.calls.append((x, z))
        return z, zt


def student_and_projected(head: nn.Module, h: torch.Tensor, ht: torch.Tensor,
                          kept: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(head(h), the head applied to `ht` without training it): on a recorded head one product over the rows of
    both, so the (V x d) weight is read from memory once per chunk instead of twice, in forward and in backward (at
    V = 262k and 64-row chunks the products are bound by reading the weight). `kept`: the second, already computed
    without gradient (`dual_space.agreement`), so that only the student's rows are multiplied here; its gradient
    reaches `ht` as the product's would."""
    if isinstance(head, Recorder):
        return head.with_kept(h, ht, kept)
    if kept is not None:
        return head(h), _Kept.apply(ht, kept, head)
    return head(h), linear_sg(ht, head)


class _Kept(torch.autograd.Function):
    """Logits computed before, as `linear_sg(ht, head)`: returned as they are, with that product's gradient for
    `ht` (dz W, the head's weight untouched)."""

    @staticmethod
    def forward(ctx, ht: torch.Tensor, kept: torch.Tensor, head: nn.Module):
        ctx.head, ctx.dtype = head, ht.dtype
        return kept.view_as(kept)

    @staticmethod
    def backward(ctx, dz: torch.Tensor):
        w = detached_full(ctx.head.weight)
        return (dz.to(w.dtype) @ w).to(ctx.dtype), None, None


class _Joint(torch.autograd.Function):
    """(x @ W^T (+ b), xt @ W^T (+ b): `kept`, computed before, or None: in one product with x's rows), both rows'
    gradients from one product over W."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, xt: torch.Tensor, kept: torch.Tensor | None, w: torch.Tensor,
                b: torch.Tensor | None, ready: torch.Tensor | None):
        ctx.save_for_backward(w)
        ctx.dtypes = x.dtype, xt.dtype
        if kept is None:
            both = F.linear(torch.cat([x, xt.to(x.dtype)]), w, b)
            return both[: len(x)], both[len(x) :]
        return F.linear(x, w, b) if ready is None else ready.view_as(ready), kept.view_as(kept)

    @staticmethod
    def backward(ctx, dz: torch.Tensor | None, dzt: torch.Tensor | None):
        (w,) = ctx.saved_tensors
        n = 0 if dz is None else len(dz)
        both = [d.to(w.dtype) for d in (dz, dzt) if d is not None]
        prod = (both[0] if len(both) == 1 else torch.cat(both)) @ w
        dx = None if dz is None else prod[:n].to(ctx.dtypes[0])
        dxt = None if dzt is None else prod[n:].to(ctx.dtypes[1])
        return dx, dxt, None, None, None, None


@dataclass
class _Run:
    """One fused call: what it was given, the terms' names, and the gradients stored for its backward."""

    fn: object
    args: tuple
    spans: list
    diff: list  # indices of the differentiable args
    head: nn.Module | None
    hints: dict
    head_on_first: bool = False
    names: list = field(default_factory=list)
    grad_names: list = field(default_factory=list)
    waiting: dict = field(default_factory=dict)  # during a sweep: per gradient list, its `_HeadRows`
    known: dict = field(default_factory=dict)  # name -> hint (float) of the terms summed into `stored`
    stored: list | None = None  # per input: the hinted terms' weighted gradient (handed out by the first backward)
    deferred: dict = field(default_factory=dict)  # name -> per input: that term's own gradient
    apart: dict | None = None  # name -> per input: every term's own gradient (after a second recomputation)
    after: dict = field(default_factory=dict)  # name -> the most rows its gradient may wait with (`After`)
    waits: dict = field(default_factory=dict)  # name -> its `_Waiting` rows
    dropped: bool = False  # a term's waiting rows outgrew their bound: the backward recomputes
    recomputed: int = 0

    def __post_init__(self):
        h = self.head
        # a plain linear head is recorded (Recorder); any other head (a LoRA adapter on it) is used as it is, its own
        # trainable parameters the inputs of the chunks' autograd
        self.plain = h is None or plain(h)
        self.params = [] if h is None else [p for p in h.parameters() if p.requires_grad]

    def local(self) -> tuple[nn.Module | None, list]:
        """The head fn is given, and the tensors autograd takes its gradients for (a head that is not plain)."""
        if self.head is None or not self.params:
            return self.head, []
        if not self.plain:
            return self.head, list(self.params)
        return Recorder(self.head), []

    def sweep(self, weights: dict | None) -> tuple[dict[str, torch.Tensor], list, dict]:
        """Every span once: (the summed values, per input the gradient of sum_k w_k term_k, and per unhinted term
        its own gradients), w = `weights`, or the hints when None (then the unhinted terms are kept apart)."""
        head, leaves = self.local()
        acc: list[torch.Tensor | None] = [None] * (len(self.diff) + len(self.params))
        apart: dict[str, list] = {}
        values: dict[str, torch.Tensor] = {}
        self.waiting = {}  # per gradient list (key None: `acc`) a recorded head's rows not yet in its weight gradient
        self.waits, self.dropped = {}, False
        later = None
        for j, (s, e) in enumerate(self.spans):
            rows = _rows(self.args, s, e)
            for i in self.diff:
                rows[i] = rows[i].detach().requires_grad_()
            if isinstance(head, Recorder):
                head.calls.clear()
                if self.head_on_first:
                    head.ready, later = self.ahead(head, j, later)
            with torch.enable_grad():  # (a Function's forward runs without autograd)
                out = _call(self.fn, head, rows, (s, e))
                self._grads(out, rows, head, leaves, weights, acc, apart, s, e)
            accumulate(values, {k: v.detach() for k, v in out.items()})
        for key, rows in self.waiting.items():
            rows.flush(acc if key is None else apart[key])
        self.waiting = {}
        return values, acc, apart

    def ahead(self, head: Recorder, j: int, later: torch.Tensor | None) -> tuple:
        """(the head's ready logits of span j's first-arg rows or None, those of span j + 1 or None): a span shorter
        than HEAD_GRAD_ROWS takes its logits and the next span's in one product (at 64 rows of 262k x 640 a product
        runs at 2/3 of the rate of 128: measured 167 vs 248 GFLOP/s on 2 cores), the next span's kept until it runs."""
        (s, e), x = self.spans[j], self.args[0]
        if later is not None:
            return (x[s:e].data_ptr(), later), None
        if e - s >= HEAD_GRAD_ROWS or j + 1 == len(self.spans):
            return None, None
        end = self.spans[j + 1][1]
        with torch.no_grad():
            z = F.linear(x[s:end], head.weight, head.bias)
        return (x[s:e].data_ptr(), z[: e - s]), z[e - s :]

    def _grads(self, out: dict, rows: list, head, leaves: list, weights: dict | None, acc: list, apart: dict,
               s: int, e: int) -> None:
        """One span's gradients: of the weighted sum into `acc`, of each term kept apart into `apart`."""
        if not self.names:
            self._name(out)
        calls = head.calls if isinstance(head, Recorder) else []
        inputs = [rows[i] for i in self.diff] + leaves + [call[1] for call in calls]
        after = {} if weights is not None or not calls else self.after
        jobs = [(None, weights if weights is not None else self.known)] if weights is not None or self.known else []
        jobs += [] if weights is not None else [(k, {k: 1.0}) for k in self.grad_names
                                                if k not in self.known and k not in after]
        n_rows, n_own = len(self.diff), len(self.diff) + len(leaves)
        for k in after:
            self._wait(k, out[k], rows, calls, s, e)
        for j, (key, w) in enumerate(jobs):
            total = sum(float(c) * out[k] for k, c in w.items() if c != 0 and out[k].requires_grad)
            if not isinstance(total, torch.Tensor):
                continue
            grads = torch.autograd.grad(total, inputs, retain_graph=j + 1 < len(jobs), allow_unused=True)
            into = acc if key is None else apart.setdefault(key, [None] * len(acc))
            for k, gr in enumerate(grads[:n_own]):  # rows s:e of the row inputs, the whole of a head's parameter
                if gr is not None:
                    _fold(into, k, gr, slice(s, e) if k < n_rows else slice(None), self.args[self.diff[k]].shape
                          if k < n_rows else gr.shape)
            for call, dz in zip(calls, grads[n_own:]):  # a recorded head: dW += dz^T x, db += sum dz
                if dz is not None:
                    waiting = self.waiting.setdefault(key, _HeadRows(n_rows, self.params))
                    waiting.add(into, dz, call[0])

    def _wait(self, k: str, term: torch.Tensor, rows: list, calls: list, s: int, e: int) -> None:
        """Term k of one span (hinted `After`): its logits' gradient, the nonzero rows kept (with the head's inputs
        of those rows) for the weight-gradient product the backward makes, and the row inputs' gradient taken
        now from those rows alone."""
        if self.dropped or not term.requires_grad:
            return
        dzs = torch.autograd.grad(term, [call[1] for call in calls], retain_graph=True, allow_unused=True)
        waits = self.waits.setdefault(k, _Waiting([None] * (len(self.diff) + len(self.params))))
        for call, dz in zip(calls, dzs):
            if dz is None:
                continue
            x, dz = call[0], dz.reshape(-1, dz.shape[-1])
            # (amax and amin: no V-wide temporary, and each ten times faster than aminmax or ne().any() on CPU)
            at = torch.nonzero((dz.amax(-1) != 0) | (dz.amin(-1) != 0))[:, 0]
            if not len(at):
                continue
            w = detached_full(self.head.weight)
            part = dz[at]
            dx = torch.zeros(dz.shape[0], x.shape[-1], dtype=x.dtype, device=x.device)
            dx[at] = (part.to(w.dtype) @ w).to(x.dtype)
            grads = torch.autograd.grad(x, [rows[i] for i in self.diff], grad_outputs=dx.view_as(x),
                                        retain_graph=True, allow_unused=True)
            for j, gr in enumerate(grads):
                if gr is not None:
                    _fold(waits.grads, j, gr, slice(s, e), self.args[self.diff[j]].shape)
            waits.add(part, x.reshape(-1, x.shape[-1])[at])
        if waits.n > self.after[k]:  # more rows than the caller expected: recomputed in backward instead
            self.waits, self.dropped = {}, True

    def _name(self, out: dict) -> None:
        self.names = list(out)
        self.grad_names = [k for k, v in out.items() if v.requires_grad and not is_maximum(k)]
        only = len(self.grad_names) == 1 and not self.hints
        self.known = {} if only else {k: float(self.hints[k]) for k in self.grad_names
                                      if self.hints.get(k) is not None and not isinstance(self.hints[k], After)}
        self.after = {} if only else {k: self.hints[k].rows for k in self.grad_names
                                      if isinstance(self.hints.get(k), After) and self.plain}

    def backward(self, g: dict[str, torch.Tensor]) -> list:
        """Each input's gradient for the arriving gradients g (name -> scalar) of the terms. The stored buffers are
        scaled in place and handed out (autograd keeps them as the parameters' .grad, no copy), so a second backward
        through this node recomputes."""
        scale = None if self.stored is None or self.dropped else self._scale(g)
        if self.apart is not None:  # every term's own gradients, from an earlier recomputation
            parts = [(float(g[k]), [None if x is None else x.clone() for x in grads]) for k, grads in self.apart.items()]
        elif scale is None and self.recomputed == 0:
            # the hints were wrong for this loss: recompute every span with the arriving weights
            self.recomputed += 1
            with gathered(self.params):
                parts = [(1.0, self.sweep({k: float(g[k]) for k in self.grad_names})[1])]
        elif scale is None:
            # asked again (the per-term diagnostics take one term at a time): once more, keeping every term's own
            # gradients, which serve any further backward through this node without recomputing
            self.recomputed += 1
            with gathered(self.params):
                self.known, self.after = {}, {}  # (before the sweep: it keeps apart what is not hinted)
                self.apart = self.sweep(None)[2]
            return self.backward(g)
        else:
            parts = [(scale, self.stored)] + [(float(g[k]), self.deferred[k]) for k in self.deferred]
            parts += [(float(g[k]), w.grads) for k, w in self.waits.items()]
            self.stored, self.deferred = None, {}
        inputs = [self.args[i] for i in self.diff] + self.params
        hold_until_accumulated(self.params)
        totals = []
        for j in range(len(inputs)):
            total = None
            for c, grads in parts:
                if grads is None or grads[j] is None or c == 0:
                    continue
                if total is None:
                    total = grads[j] if c == 1 else grads[j].mul_(c)
                else:
                    total.add_(grads[j], alpha=c)
            totals.append(total)
        waits, self.waits = self.waits, {}
        for k, w in waits.items():  # the waiting rows' head gradient, in one product per term
            if w.n and float(g[k]) != 0 and self.params:
                dz, x = w.rows()
                _fold_weight(totals, len(self.diff), dz.mul_(float(g[k])), x, self.params)
        return [None if t is None else t.to(x.dtype) for t, x in zip(totals, inputs)]

    def _scale(self, g: dict[str, torch.Tensor]) -> float | None:
        """The common factor between the arriving gradients of the hinted terms and their hints, or None when they
        are not proportional."""
        if not self.known:
            return 0.0
        top = max(self.known, key=lambda k: abs(self.known[k]))
        scale = float(g[top]) / self.known[top] if self.known[top] else 0.0
        for k, hint in self.known.items():
            want, got = scale * hint, float(g[k])
            if abs(got - want) > HINT_RTOL * max(abs(got), abs(want)):
                return None
        # the loss's float32 arithmetic gives the hinted weights to a few units in their last place: a factor that
        # close to 1 is 1 (no pass over the stored (V x d) gradient to scale it by 1 +- 1e-7)
        return 1.0 if abs(scale - 1.0) <= UNIT_RTOL else scale


class _Waiting:
    """A term's rows waiting for its weight (`After`): per input its gradient so far (the row inputs'), and the
    nonzero rows of its logits' gradient with the head's inputs of those rows."""

    def __init__(self, grads: list):
        self.grads = grads
        self.dz: list[torch.Tensor] = []
        self.x: list[torch.Tensor] = []
        self.n = 0

    def add(self, dz: torch.Tensor, x: torch.Tensor) -> None:
        if len(dz):
            self.dz.append(dz)
            self.x.append(x.detach().to(dz.dtype))
            self.n += len(dz)

    def rows(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(every waiting row of the logits' gradient, the head's inputs of those rows), each a new tensor."""
        dz, x = torch.cat(self.dz), torch.cat(self.x)
        self.dz, self.x = [], []
        return dz, x


def plain(head: nn.Module) -> bool:
    """Whether the head's trainable parameters are its own weight and bias (none: frozen, also plain)."""
    own = {id(getattr(head, "weight", None)), id(getattr(head, "bias", None))}
    return all(id(p) in own for p in head.parameters() if p.requires_grad)


def recorded(head: nn.Module) -> bool:
    """Whether the fused chunks record this head's calls (`Recorder`): a plain head with a trainable parameter, the
    one kind on which a term hinted `After` waits in its rows instead of being kept apart."""
    return plain(head) and any(p.requires_grad for p in head.parameters())


def hold_until_accumulated(params: list) -> None:
    """ZeRO-3: gather the partitioned `params` again until their gradient has been accumulated, which autograd does
    after this backward returns (DeepSpeed accumulates and reduces a full-shaped gradient only while its parameter
    is whole, as inside the module's own backward); each is partitioned again after DeepSpeed's own hook ran."""
    for p in params:
        if not hasattr(p, "ds_id") or p.ds_status.name == "AVAILABLE":
            continue
        p.all_gather()
        handles = []

        def release(param, handles=handles):
            handles.pop().remove()
            param.partition()

        handles.append(p.register_post_accumulate_grad_hook(release))


def _fold(into: list, k: int, gr: torch.Tensor, where: slice, shape) -> None:
    """into[k][where] += gr, into[k] a float32 (or wider) buffer of `shape`, made on first use."""
    if into[k] is None:
        into[k] = torch.zeros(shape, dtype=_at_least_float(gr.dtype), device=gr.device)
    into[k][where] += gr


# rows per product of a recorded head's weight gradient: a chunk of fewer rows (64 at the 262k vocabulary) waits for
# the next, since each product reads and writes the whole float32 (V x d) buffer; at 262k x 640 on 2 cores one
# product of 64 rows took 132 ms, of 128 rows 168 ms (the buffer's traffic, not the multiplications, bounds the first)
HEAD_GRAD_ROWS = 128


class _HeadRows:
    """A recorded head's rows (dz, x) kept until HEAD_GRAD_ROWS of them make one weight-gradient product, in one
    buffer of that many rows (allocated when a chunk is shorter)."""

    def __init__(self, first: int, params: list):
        self.first, self.params = first, params
        self.dz: torch.Tensor | None = None
        self.x: torch.Tensor | None = None
        self.n = 0

    def add(self, into: list, dz: torch.Tensor, x: torch.Tensor) -> None:
        dz, x = dz.reshape(-1, dz.shape[-1]), x.detach().reshape(-1, x.shape[-1]).to(dz.dtype)
        k = len(dz)
        if self.n + k > HEAD_GRAD_ROWS:
            self.flush(into)
        if k >= HEAD_GRAD_ROWS:
            _fold_weight(into, self.first, dz, x, self.params)
            return
        if self.dz is None:
            self.dz = buffer((HEAD_GRAD_ROWS, dz.shape[-1]), dz.dtype, dz.device)
            self.x = x.new_empty(HEAD_GRAD_ROWS, x.shape[-1])
        self.dz[self.n : self.n + k] = dz
        self.x[self.n : self.n + k] = x
        self.n += k
        if self.n == HEAD_GRAD_ROWS:
            self.flush(into)

    def flush(self, into: list) -> None:
        if self.n:
            _fold_weight(into, self.first, self.dz[: self.n], self.x[: self.n], self.params)
        self.n = 0


def _fold_weight(into: list, first: int, dz: torch.Tensor, x: torch.Tensor, params: list) -> None:
    """A recorded head call's weight (and bias) gradient, dz^T x (and the sum of dz), into the buffers after the
    row inputs': in place on the float32 weight buffer (the first call's product becomes it)."""
    w = first
    if params[0].dim() != 2:  # the bias alone trains
        w = None
    # (without autograd: x is a chunk's row input, and a product recorded on it would keep every folded dz alive
    # until the backward, as the saved input of its gradient)
    x = x.detach().reshape(-1, x.shape[-1]).to(dz.dtype)
    dz = dz.detach().reshape(-1, dz.shape[-1])
    if w is not None:
        if into[w] is None:
            into[w] = buffer((dz.shape[-1], x.shape[-1]), _at_least_float(dz.dtype), dz.device)
            if into[w].dtype == dz.dtype:
                torch.mm(dz.t(), x, out=into[w])
            else:  # (bf16: its product, summed from here on in float32)
                into[w].copy_(dz.t() @ x)
        elif into[w].dtype == dz.dtype:
            into[w].addmm_(dz.t(), x)
        else:
            into[w] += dz.t() @ x
    b = first + (1 if w is not None else 0)
    if b < len(into) and b - first < len(params) and params[b - first].dim() == 1:
        db = dz.sum(0)
        into[b] = db.to(_at_least_float(db.dtype)) if into[b] is None else into[b].add_(db)


# CPU buffers of at least this many bytes come from malloc (`buffer`)
MALLOC_BYTES = 32 << 20
_NUMPY = {torch.float32: np.float32, torch.float64: np.float64}


def buffer(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """An uninitialised tensor for what the chunks sum (the head's (V x d) weight gradient, the rows waiting for
    its product). On the CPU, a large float one is taken from malloc (numpy's allocation) instead of torch's
    allocator: torch asks glibc for 64-byte-aligned blocks, and glibc keeps the slivers it cuts around each apart,
    so a freed block is never given to the next tensor of its size. Stage 2 frees the weight gradient after every
    optimizer step (and the chunks make a new one each micro-batch): through torch, each new one came from fresh
    pages further up the heap (at 262,144 x 640, 163,840 page faults and a 640 MB move, every micro-batch), and its
    first product ran at a third of the rate of the next or less (`bench/chunks.py --split`); from malloc the
    freed block is taken again. See docs/results.md, "Why glibc holds that much"."""
    if not from_malloc(shape, dtype, device):
        return torch.empty(shape, dtype=dtype, device=device)
    return torch.from_numpy(np.empty(shape, dtype=_NUMPY[dtype]))


def from_malloc(shape: tuple, dtype: torch.dtype, device: torch.device) -> bool:
    """Whether `buffer` takes a tensor of this shape, dtype and device from malloc."""
    return device.type == "cpu" and dtype in _NUMPY and dtype.itemsize * int(np.prod(shape)) >= MALLOC_BYTES


def _at_least_float(dtype: torch.dtype) -> torch.dtype:
    """float32 for bf16 / fp16 (sums of chunks), a wider type as it is."""
    return torch.promote_types(dtype, torch.float32)


class _Fused(torch.autograd.Function):
    """The summed terms of a `_Run`, whose backward scales the gradients the forward stored."""

    @staticmethod
    def forward(ctx, run: _Run, *inputs):
        values, run.stored, run.deferred = run.sweep(None)
        ctx.run = run
        outs = tuple(values[k].to(_at_least_float(values[k].dtype)) for k in run.names)
        ctx.mark_non_differentiable(*[o for k, o in zip(run.names, outs) if k not in run.grad_names])
        return outs

    @staticmethod
    def backward(ctx, *grads):
        run: _Run = ctx.run
        g = {k: (x if x is not None else torch.zeros(())) for k, x in zip(run.names, grads)}
        return (None, *run.backward(g))

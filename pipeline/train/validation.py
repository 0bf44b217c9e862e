"""Validation during stage 2: every loss term on the validation rows, and greedy-decoded Rouge-L on the first
`valid.generate_rows`."""

from __future__ import annotations

import torch

from pipeline.config import DistillConfig, SamplingConfig
from pipeline.data.tokenize import encode_prompt
from pipeline.evaluate.metrics import rouge_l
from pipeline.generate import generate_texts
from pipeline.losses import token_normaliser
from pipeline.objectives.objective import Objective
from pipeline.objectives.setup import student_side
from pipeline.train.distributed import DistInfo, all_reduce_sum
from pipeline.train.sampler import eval_batches
from pipeline.train.sources import Source


def rank_share(n: int, dist: DistInfo) -> list[int | None]:
    """Rank r's items r, r + world, ...; padded with None so every rank runs the same number of forwards (ZeRO-3
    gathers are collective)."""
    per_rank = -(-n // dist.world_size)
    return [i if (i := dist.rank + j * dist.world_size) < n else None for j in range(per_rank)]


class Validation:
    def __init__(self, cfg: DistillConfig, source: Source, tokenizer, dist: DistInfo, zero_stage: int):
        self.cfg, self.source, self.tokenizer, self.dist = cfg.valid, source, tokenizer, dist
        self.batches = eval_batches(source.lengths, cfg.valid.micro_batch_size)
        self.n_rows = len(source)
        self.gen_rows = list(range(min(cfg.valid.generate_rows, len(source))))
        self.synced = zero_stage == 3 and dist.world_size > 1
        self.tok_cfg = cfg.tokenize
        mine = [j for j in rank_share(len(self.batches), dist) if j is not None]
        (total,) = all_reduce_sum([sum(source.collate(self.batches[j]).n_tokens for j in mine)], dist.device)
        self.normaliser = token_normaliser(int(total), len(self.batches), 1)  # each term: its token mean over all rows

    @torch.no_grad()
    def __call__(self, engine, compute: Objective) -> dict[str, float]:
        module = engine.module
        module.eval()
        sums: dict[str, float] = {}
        for j in rank_share(len(self.batches), self.dist):
            batch = self.source.collate(self.batches[0 if j is None else j]).to(self.dist.device)
            hidden = module(batch.input_ids, batch.attention_mask)
            out = compute(batch, student_side(module.student, batch, hidden), self.normaliser)
            for k, v in [("loss", out.loss), *out.terms.items()]:  # the same names on every rank and batch
                sums[k] = sums.get(k, 0.0) + (float(v) if j is not None else 0.0)
        names = sorted(sums)
        reduced = all_reduce_sum([sums[k] for k in names], self.dist.device)
        # sums of (batch sum / N-bar) over all batches, N-bar = tokens / batches: divide by the batch count
        result = {f"valid_{k}": v / len(self.batches) for k, v in zip(names, reduced)}
        if self.gen_rows:
            result["valid_rougeL"] = self._rouge(module.student)
        module.train()
        return result

    def _rouge(self, student) -> float:
        mine = rank_share(len(self.gen_rows), self.dist)
        rows = [self.gen_rows[0 if j is None else j] for j in mine]
        examples = self.source.examples(rows)
        prompts = [encode_prompt(self.tokenizer, e.prompt, self.tok_cfg) for e in examples]
        g = SamplingConfig(max_new_tokens=self.cfg.max_new_tokens, batch_size=self.cfg.micro_batch_size)
        preds = generate_texts(student, self.tokenizer, prompts, g, None, progress=False, synced_gpus=self.synced)
        local = sum(rouge_l(p, [e.response]) for j, p, e in zip(mine, preds, examples) if j is not None)
        (total,) = all_reduce_sum([local], self.dist.device)
        return 100 * total / len(self.gen_rows)

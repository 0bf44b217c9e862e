"""Stage `report`: runs side by side from what `dskd eval` and `dskd analyze` stored (nothing is generated).

Writes <out_dir>/report.md (the scores table, NLL and lengths, representation distances, how to read them) and the
PNGs it shows: scores.png, curves.png, diagnostics.png (per-term gradient norms, projector norms), representation.png.
A run without stored results is listed with the command that produces them; a run whose checkpoint changed since its
eval is marked stale; a projector-based run whose projected teacher is not learning is flagged (Warnings).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.config import ConfigError, ReportConfig
from pipeline.evaluate.analysis import RESULT, analysis_dir
from pipeline.evaluate.report import (
    analysis_table,
    details_table,
    harness_table,
    is_diagnostic,
    markdown_table,
    plot_curves,
    plot_distances,
    plot_scores,
    plot_seeds,
    projector_flags,
    read_curves,
    seed_groups,
    seeds_table,
)
from pipeline.evaluate.suites import checkpoint_hash, expand_runs, read_result, resolve_run
from pipeline.io_utils import atomic_write_text
from pipeline.objectives.setup import T2S_INIT_FILE

SIMULATION = Path("runs/simulation/simulation.png")

HOW_TO_READ = """\
How to read this: each cell is the score's mean ± standard deviation over the preset's seeds (Rouge-L F × 100 of
the answer against the best-matching reference; for gsm8k the share of final answers equal to the reference's). The
average is taken over the Rouge-L test sets per seed, then over seeds. The best student of each column is in bold;
a teacher row is the ceiling and is not a candidate. Differences smaller than about two standard deviations are
within the spread of sampling."""

SEEDS_HOW_TO_READ = """\
Runs named `<name>__seed<N>` are one row here: each training seed's run is first averaged over the preset's sampling
seeds, and the cell is the mean ± standard deviation of those per-run means over the training seeds (the spread of
training, which the table above, per run, does not show). Exact match: the answer equals one of the reference
answers; NLL: teacher-forced, per token, of the first reference. Best student per column in bold."""


def _rel(path: Path, start: Path) -> str:
    return os.path.relpath(path, start)


def run(cfg: ReportConfig) -> Path:
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results, missing, stale, curves, analyses, flags = _collect(cfg)
    if not results:
        raise ConfigError(f"report: no run has results for preset {cfg.preset!r}; run `dskd eval` first "
                          f"(make eval RUNS=\"{' '.join(cfg.runs)}\" PRESET={cfg.preset})")
    suites = cfg.suites or list(dict.fromkeys(s for r in results for s in r["suites"]))
    md = [f"# Report: preset `{cfg.preset}`", "", HOW_TO_READ, "", markdown_table(results, suites), ""]
    md += [f"![scores]({plot_scores(results, suites, out / 'scores.png').name})", ""]
    groups = seed_groups(results)
    if any(len(g) > 1 for g in groups.values()):
        md += ["## Over training seeds", "", SEEDS_HOW_TO_READ, ""]
        for suite in suites:
            png = plot_seeds(groups, suite, out / f"seeds-{suite}.png")
            md += [f"### {suite}", "", seeds_table(groups, suite), "", f"![seeds]({png.name})", ""]
    if flags:
        md += ["## Warnings", "", *[f"- **{name}**: {f}" for name, fs in flags.items() for f in fs], ""]
        for name, fs in flags.items():
            for f in fs:
                print(f"report: WARNING {name}: {f}")
    if stale:
        md += [f"**Stale** (the checkpoint changed after its eval; re-run `make eval`): {', '.join(stale)}", ""]
    if missing:
        md += [f"**No results** for preset `{cfg.preset}`: {', '.join(missing)}; produce them with "
               f"`make eval RUNS=\"{' '.join(missing)}\" PRESET={cfg.preset}`", ""]
    md += ["## References' NLL and answer lengths", "",
           "NLL: mean teacher-forced negative log-likelihood per token of the first reference (then EOS), and its "
           "perplexity; lengths: generated tokens per answer and the share that ended with EOS (the rest hit the "
           "token limit), averaged over seeds.", "", details_table(results, suites), ""]
    if any(r.get("harness") for r in results):
        md += ["## lm-evaluation-harness", "", "Tasks run by `dskd eval --harness` (lm-eval's own metrics and "
               "standard errors).", "", harness_table(results), ""]
    md += ["## Training curves", ""]
    # the teachers' curves apart: a teacher trained for 10x the steps would squash the students' onto one edge
    teachers = {r["name"] for r in results if r.get("role") == "teacher"}
    students = {k: v for k, v in curves.items() if k not in teachers}
    if (p := plot_curves(students, out / "curves.png", keep=lambda k: not is_diagnostic(k))) is not None:
        md += ["Every loss term and validation metric of each run's metrics.jsonl, by step (runs over training seeds: "
               "their mean, and a band from the lowest to the highest seed).", "", f"![curves]({p.name})", ""]
    if (p := plot_curves({k: v for k, v in curves.items() if k in teachers}, out / "teacher_curves.png",
                         keep=lambda k: not is_diagnostic(k), title="the teacher's own training")) is not None:
        md += ["The teacher's training, on its own steps.", "", f"![teacher curves]({p.name})", ""]
    if not curves:
        md += ["(no run has a metrics.jsonl)", ""]
    if (p := plot_curves(students, out / "diagnostics.png", keep=is_diagnostic)) is not None:
        md += ["Per-term gradient norms (`grad_<term>_<tensor>`: each term as weighted in the loss, on the student's "
               "hidden states at the label positions, its head and t2s; first micro-batch of each logged step) and "
               "the projectors' norms: which term moves what.", "", f"![diagnostics]({p.name})", ""]
    md += ["## Representation structure (DSKD section 5.3)", ""]
    if analyses:
        md += ["Mean L1 distance between the teacher's and the student's structure matrices (cosine, normalised "
               "inner product) of response hidden states, over cached training rows; lower is closer to the "
               "teacher. `initial` is the student before distillation. Per run: `<run>/analysis/structure.png`.", "",
               analysis_table(analyses), "", f"![representation]({plot_distances(analyses, out / 'representation.png').name})",
               ""]
    else:
        md += ["(no run analysed yet: `make analyze RUNS=\"...\"`)", ""]
    if SIMULATION.is_file():
        md += ["## Head simulation", "", f"The DSKD paper's simulation (`make simulate`): "
               f"[{SIMULATION.name}]({_rel(SIMULATION.resolve(), out.resolve())})", ""]
    md += ["## Sources", "", *[f"- {r['name']}: `{r['model']}` (checkpoint {r['checkpoint']}, "
                               f"{json.dumps({k: v['n'] for k, v in r['suites'].items()})} rows)" for r in results], ""]
    path = atomic_write_text(out / "report.md", "\n".join(md))
    print(markdown_table(results, suites))
    print(f"report: {path}")
    return path


def _collect(cfg: ReportConfig) -> tuple[list, list, list, dict, dict, dict]:
    """What eval, training and analyze stored for each run: (results, runs without results, runs whose checkpoint
    changed after their eval, curves, analyses, projector warnings)."""
    results, missing, stale, curves, analyses, flags = [], [], [], {}, {}, {}
    for entry in expand_runs(cfg.runs, "report"):
        r = resolve_run(entry)
        summary = read_result(r.eval_dir / f"results-{cfg.preset}.json")
        if summary is None:
            missing.append(entry)
        else:
            summary["name"] = r.name
            own = r.eval_dir.resolve() == Path(r.ref.path).resolve()  # a named model's results: no weights here
            if not own and Path(r.ref.path).exists() and checkpoint_hash(r.ref) != summary["checkpoint"]:
                stale.append(r.name)
            results.append(summary)
        run_curves: dict = {}
        for m in r.metrics:
            for k, pts in read_curves(m.parent).items():
                run_curves.setdefault(k, []).extend(pts)
        if run_curves:
            curves[r.name] = run_curves
        init = next((json.loads(p.read_text()) for m in r.metrics if (p := m.parent / T2S_INIT_FILE).is_file()), None)
        if run_flags := projector_flags(run_curves, init):
            flags[r.name] = run_flags
        if (a := read_result(analysis_dir(entry) / RESULT)) is not None:
            analyses[r.name] = a
    return results, missing, stale, curves, analyses, flags

"""Runs side by side: the scores table (Markdown), the per-run NLL / length table, and PNG plots (scores with error
bars, training curves, representation distances). Reads what `dskd eval` and `dskd analyze` stored; computes
nothing that needs a model."""

from __future__ import annotations

import json
import re
import statistics
from pathlib import Path

from pipeline.evaluate.suites import mean_std
from pipeline.objectives.setup import FIT_GAP_CLOSED

# metrics.jsonl keys that are bookkeeping, not loss terms or validation metrics
_NOT_CURVES = {"step", "lr", "tokens_per_s", "step_s", "diagnostics_s", "loss_tokens", "peak_rss_mb", "elapsed_s", "kd_positions",
               "teacher_max_err", "round", "aligned_positions"}


def _cell(entry: dict | None, bold: bool, digits: int = 2) -> str:
    if entry is None:
        return "–"
    text = f"{entry['mean']:.{digits}f}" + (f" ± {entry['std']:.{digits}f}" if entry["n"] > 1 else "")
    return f"**{text}**" if bold else text


def column_title(name: str, results: list[dict]) -> str:
    for r in results:
        s = r["summary"].get(name)
        if s is not None and s["metric"] != "rougeL":
            return f"{name} ({s['metric']})"
    return name


def row_name(r: dict) -> str:
    return f"{r['name']} (teacher)" if r.get("role") == "teacher" else r["name"]


def score_columns(results: list[dict], suites: list[str]) -> list[str]:
    """The suites, and the average over the Rouge-L suites when there are several (with one it would repeat it)."""
    several = any(len(r["summary"].get("average", {}).get("suites", [])) > 1 for r in results)
    return list(suites) + (["average"] if several and len(suites) > 1 else [])


def markdown_table(results: list[dict], suites: list[str]) -> str:
    """rows = runs, columns = suites and the average over the Rouge-L suites; cells `mean ± std` over seeds; the best
    mean of each column in bold (teachers, the ceiling, are not candidates)."""
    cols = score_columns(results, suites)
    best = {}
    for c in cols:
        means = [r["summary"][c]["mean"] for r in results if c in r["summary"] and r.get("role") != "teacher"]
        best[c] = max(means) if len(means) > 1 else None  # one candidate: nothing to mark
    titles = [column_title(c, results) if c != "average" else "average (Rouge-L)" for c in cols]
    lines = ["| run | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(cols)]
    for r in results:
        cells = []
        for c in cols:
            e = r["summary"].get(c)
            cells.append(_cell(e, e is not None and r.get("role") != "teacher" and e["mean"] == best[c]))
        lines.append(f"| {row_name(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# a run trained with another seed is named `<name>__seed<N>` (make demo); such runs are one row of the seeds table
SEED_SUFFIX = re.compile(r"__seed(\d+)$")


def seed_groups(results: list[dict]) -> dict[str, list[dict]]:
    """Results grouped by run name without its `__seed<N>` suffix, in first-seen order."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        groups.setdefault(SEED_SUFFIX.sub("", row_name(r)), []).append(r)
    return groups


def per_run_means(r: dict, suite: str) -> dict[str, float] | None:
    """One run's scores on one suite, each averaged over the preset's sampling seeds; NLL (seed-independent)."""
    s = r["suites"].get(suite)
    if s is None:
        return None
    seeds = list(s["seeds"].values())
    out = {k: statistics.fmean(v["scores"][k] for v in seeds) for k in seeds[0]["scores"]}
    if s.get("nll"):
        out["nll"] = s["nll"]["nll"]
    return out


def seed_summary(groups: dict[str, list[dict]], suite: str) -> dict[str, dict[str, dict]]:
    """group -> metric -> mean / std / n over the group's runs (training seeds) of each run's per-run mean."""

    out: dict[str, dict[str, dict]] = {}
    for name, runs in groups.items():
        per = [m for m in (per_run_means(r, suite) for r in runs) if m is not None]
        if per:
            out[name] = {k: mean_std([m[k] for m in per]) for k in per[0] if all(k in m for m in per)}
    return out


SEED_METRICS = (("exact_match", "exact match %", True), ("rougeL", "Rouge-L", True), ("accuracy", "accuracy %", True),
                ("nll", "NLL of the reference", False))


def metrics_table(results: list[dict], suite: str) -> str:
    """One suite, every metric it has per run (exact match, Rouge-L or accuracy, the reference's NLL): `mean ± std`
    over the preset's sampling seeds (NLL does not depend on them)."""

    rows = [(r, r["suites"][suite]) for r in results if suite in r["suites"]]
    keys = [k for k, _, _ in SEED_METRICS if any(k in v["scores"] for _, s in rows for v in s["seeds"].values())]
    has_nll = any(s.get("nll") for _, s in rows)
    titles = [t for k, t, _ in SEED_METRICS if k in keys] + ["NLL of the reference"] * has_nll
    lines = [f"| {suite} | " + " | ".join(titles) + " |", "|---|" + "---:|" * len(titles)]
    for r, s in rows:
        cells = [_cell(mean_std([v["scores"][k] for v in s["seeds"].values()]), False) for k in keys]
        if has_nll:
            cells.append(f"{s['nll']['nll']:.3f}" if s.get("nll") else "–")
        lines.append(f"| {row_name(r)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def seeds_table(groups: dict[str, list[dict]], suite: str) -> str:
    """rows = runs grouped over training seeds; cells `mean ± std` over the seeds of each run's mean over sampling
    seeds; the best student of each column in bold (highest score, lowest NLL)."""
    summ = seed_summary(groups, suite)
    cols = [(k, title, up) for k, title, up in SEED_METRICS if any(k in m for m in summ.values())]
    students = [g for g in summ if not any(r.get("role") == "teacher" for r in groups[g])]
    best = {}
    for k, _, up in cols:
        vals = [summ[g][k]["mean"] for g in students if k in summ[g]]
        best[k] = (max if up else min)(vals) if len(vals) > 1 else None
    lines = ["| run | training seeds | " + " | ".join(t for _, t, _ in cols) + " |", "|---|---:|" + "---:|" * len(cols)]
    for g, m in summ.items():
        teacher = g not in students
        cells = [_cell(m.get(k), not teacher and k in m and m[k]["mean"] == best[k], digits=3 if k == "nll" else 2)
                 for k, _, _ in cols]
        seeds = ", ".join(SEED_SUFFIX.search(row_name(r)).group(1) if SEED_SUFFIX.search(row_name(r)) else "–"
                          for r in groups[g])
        lines.append(f"| {g} | {seeds} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot_seeds(groups: dict[str, list[dict]], suite: str, path: Path) -> Path:
    """Two panels (exact match or Rouge-L; NLL): one bar per run group, error bars = std over training seeds, and
    every training seed's own value as a dot."""
    plt = _plt()
    summ = seed_summary(groups, suite)
    score = "exact_match" if any("exact_match" in m for m in summ.values()) else "rougeL"
    names = list(summ)
    colors = run_colors(names)
    fig, axes = plt.subplots(1, 2, figsize=(max(9.0, 1.6 * len(names) + 3), 4.6))
    for ax, key, label in ((axes[0], score, dict((k, t) for k, t, _ in SEED_METRICS)[score]),
                           (axes[1], "nll", "NLL of the reference (lower is better)")):
        shown = [n for n in names if key in summ[n]]
        for i, n in enumerate(shown):
            e = summ[n][key]
            teacher = any(r.get("role") == "teacher" for r in groups[n])
            ax.bar(i, e["mean"], 0.7, yerr=e["std"] if e["n"] > 1 else None, capsize=4, color=colors[n],
                   hatch="//" if teacher else None, edgecolor="white")
            vals = [m[key] for m in (per_run_means(r, suite) for r in groups[n]) if m and key in m]
            if len(vals) > 1:
                ax.scatter([i + 0.12] * len(vals), vals, s=8, color="black", zorder=3)
            top = max([e["mean"] + (e["std"] if e["n"] > 1 else 0.0), *vals])
            ax.annotate(f"{e['mean']:.3f}" if key == "nll" else f"{e['mean']:.1f}", (i, top), xytext=(0, 3),
                        textcoords="offset points", ha="center", va="bottom", fontsize=8)
        labels = ["teacher" if any(r.get("role") == "teacher" for r in groups[n]) else n.split("__")[-1] for n in shown]
        ax.set_xticks(range(len(shown)), labels, rotation=20, ha="right", fontsize=8)
        ax.margins(y=0.1)
        ax.set_title(label, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    fig.suptitle(f"{suite}: mean ± std over training seeds (dots: each seed)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def details_table(results: list[dict], suites: list[str]) -> str:
    """Per run and suite: the references' NLL and perplexity, answer lengths and the share that stopped at EOS."""
    lines = ["| run | suite | NLL | ppl | tokens (mean) | tokens (median) | stopped at EOS % |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in results:
        for name in suites:
            s = r["suites"].get(name)
            if s is None:
                continue
            lens = [v["lengths"] for v in s["seeds"].values()]
            mean = {k: sum(x[k] for x in lens) / len(lens) for k in ("mean_tokens", "median_tokens", "stopped_at_eos")}
            nll = s.get("nll")
            nll_cells = f"{nll['nll']:.3f} | {nll['ppl']:.2f}" if nll else "– | –"
            lines.append(f"| {row_name(r)} | {name} | {nll_cells} | {mean['mean_tokens']:.1f} | "
                         f"{mean['median_tokens']:.1f} | {mean['stopped_at_eos']:.1f} |")
    return "\n".join(lines)


def harness_table(results: list[dict]) -> str:
    """lm-evaluation-harness metrics per run and task (stderr columns folded into `value ± stderr`)."""
    lines = ["| run | task | metric | value |", "|---|---|---|---:|"]
    for r in results:
        for task, m in r.get("harness", {}).items():
            for name, v in m.items():
                if "_stderr" in name:
                    continue
                err = m.get(name.replace("[", "_stderr[", 1) if "[" in name else f"{name}_stderr")
                lines.append(f"| {row_name(r)} | {task} | {name} | {v:.4f}" + (f" ± {err:.4f}" if err is not None else "") + " |")
    return "\n".join(lines)


def analysis_table(analyses: dict[str, dict]) -> str:
    lines = ["| run | rows | positions | L1 cosine (trained) | L1 cosine (initial) | L1 inner product (trained) | "
             "L1 inner product (initial) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for name, a in analyses.items():
        t, i = a["trained"], a.get("initial") or {}
        f = lambda d, k: f"{d[k]:.4f}" if k in d else "–"  # noqa: E731
        lines.append(f"| {name} | {a['rows']} | {a['positions']} | {f(t, 'cosine_l1')} | {f(i, 'cosine_l1')} | "
                     f"{f(t, 'inner_l1')} | {f(i, 'inner_l1')} |")
    return "\n".join(lines)


def read_curves(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric -> [(step, value)] from a run's metrics.jsonl (loss terms and validation metrics only). Steps are the
    run's global steps: an on-policy round's run counts from its `train.step_offset`."""
    import yaml

    path = run_dir / "metrics.jsonl"
    curves: dict[str, list[tuple[int, float]]] = {}
    if not path.is_file():
        return curves
    offset = 0
    if (run_dir / "config.yaml").is_file():
        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
        offset = int((cfg.get("train") or {}).get("step_offset") or 0)
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        for k, v in row.items():
            if k not in _NOT_CURVES and isinstance(v, (int, float)):
                curves.setdefault(k, []).append((offset + row["step"], float(v)))
    return curves


def is_diagnostic(key: str) -> bool:
    """Gradient norms and projector norms: their own figure (projectors.png), not the loss curves."""
    return key.startswith("grad_") or key.endswith("_norm")


# the agreement counts as falling when the mean of its last quarter of logged values is this far below its first's
AGREEMENT_DROP = 0.05


def projector_flags(curves: dict[str, list[tuple[int, float]]], init: dict | None) -> list[str]:
    """Why a projector-based run's projected teacher is not teaching what it should, from its metrics (`curves` as
    `read_curves` gives them) and `t2s_init.json` (`init`, written by stage 2): its t2s_ce ends above a uniform
    guess over the student's vocabulary (ln V_S), its agreement with its labels falls over training, or t2s started
    at a logit-identity fit that went less than half of the way from a uniform guess to the teacher on the cached
    sample (through a student head that means nothing yet: `loss.init_t2s: auto` starts plain there)."""

    flags: list[str] = []
    uniform = (init or {}).get("uniform_ce")
    ce = sorted(curves.get("t2s_ce", []))
    if ce and uniform is not None and ce[-1][1] > uniform:
        flags.append(f"the projected teacher is not learning: t2s_ce ends at {ce[-1][1]:.2f} nats, above a uniform "
                     f"guess over the student's vocabulary (ln V_S = {uniform:.2f})")
    agree = [v for _, v in sorted(curves.get("t2s_agreement", []))]
    if len(agree) >= 4:
        q = len(agree) // 4
        first, last = sum(agree[:q]) / q, sum(agree[-q:]) / q
        if last < first - AGREEMENT_DROP:
            flags.append(f"the projected teacher is not learning: its agreement with the t2s labels falls over "
                         f"training ({first:.2f} in the first quarter of the logged steps, {last:.2f} in the last)")
    if init and init.get("t2s_init") == "fit" and init.get("fit_gap_closed", 1.0) < FIT_GAP_CLOSED:
        flags.append(f"t2s started at the logit-identity fit through a student head that does not mean anything yet "
                     f"(on the cached sample it went {100 * init['fit_gap_closed']:.0f}% of the way from a uniform "
                     f"guess, t2s_ce {init['t2s_init_fit_ce']:.2f}, to the teacher's {init['teacher_ce']:.2f}); "
                     "loss.init_t2s: auto starts plain there")
    return flags


def group_name(name: str) -> str:
    """A run's name without its `__seed<N>` suffix: the runs of one objective over training seeds share it."""
    return SEED_SUFFIX.sub("", name.removesuffix(" (teacher)"))


TEACHER_COLOR = (0.25, 0.25, 0.25)


def run_colors(names: list[str], teachers: set[str] = frozenset()) -> dict[str, object]:
    """One colour per group of runs (the training seeds of one objective share theirs), distinct for up to 20 groups
    and the same in every figure; teachers are dark grey."""
    plt = _plt()
    groups = list(dict.fromkeys(group_name(n) for n in names if n not in teachers))
    cycle = plt.get_cmap("tab10" if len(groups) <= 10 else "tab20").colors
    color = {g: cycle[i % len(cycle)] for i, g in enumerate(groups)}
    return {n: TEACHER_COLOR if n in teachers else color[group_name(n)] for n in names}


def score_label(results: list[dict], cols: list[str]) -> str:
    """The y label of the scores: what the columns' headline metrics are (gsm8k named only when it is there)."""
    metrics = {}
    for r in results:
        for c in cols:
            if (s := r["summary"].get(c)) is not None:
                metrics.setdefault(s["metric"], []).append(c)
    parts = ["Rouge-L F × 100"] * ("rougeL" in metrics)
    parts += [f"{', '.join(dict.fromkeys(cs))}: {m} %" for m, cs in metrics.items() if m != "rougeL"]
    return parts[0] if len(parts) == 1 else f"{parts[0]}  ({'; '.join(parts[1:])})" if parts else "score"


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_scores(results: list[dict], suites: list[str], path: Path) -> Path:
    """Grouped bars: one group per suite (and the average of several Rouge-L suites), one bar per run or per run over
    training seeds (`<name>__seed<N>`: mean ± std over the seeds, each seed a dot); a single run's error bar is the
    std over the preset's sampling seeds."""
    import statistics

    plt = _plt()
    import numpy as np

    cols = score_columns(results, suites)
    groups = seed_groups(results)
    teachers = {g for g, rs in groups.items() if any(r.get("role") == "teacher" for r in rs)}
    colors = run_colors(list(groups), teachers)
    n = max(len(groups), 1)
    width = 0.8 / n
    fig, ax = plt.subplots(figsize=(max(7.0, 0.45 * len(cols) * n + 2), 5.0))
    x = np.arange(len(cols))
    over_seeds = False
    for i, (g, runs) in enumerate(groups.items()):
        vals = [[r["summary"][c]["mean"] for r in runs if c in r["summary"]] for c in cols]
        if len(runs) > 1:
            over_seeds = True
            means = [statistics.fmean(v) if v else np.nan for v in vals]
            errs = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
        else:
            means = [v[0] if v else np.nan for v in vals]
            errs = [runs[0]["summary"][c]["std"] if c in runs[0]["summary"] else 0.0 for c in cols]
        pos = x + (i - (n - 1) / 2) * width
        label = g + (f" ({len(runs)} seeds)" if len(runs) > 1 else "")  # a teacher's name says "(teacher)"
        bars = ax.bar(pos, means, width, yerr=errs, capsize=3, label=label, color=colors[g], edgecolor="white",
                      hatch="//" if g in teachers else None)
        if len(runs) > 1:
            for p, v in zip(pos, vals):
                ax.scatter([p] * len(v), v, s=6, color="black", zorder=3)
        ax.bar_label(bars, labels=[f"{m:.1f}" if m == m else "" for m in means], fontsize=7, padding=2)
    ax.set_xticks(x, [column_title(c, results) if c != "average" else "average\n(Rouge-L)" for c in cols])
    ax.set_ylabel(score_label(results, cols))
    spread = ("mean ± std over training seeds, dots: each seed\n(a single run: mean ± std over its sampling seeds)"
              if over_seeds else "mean ± std over sampling seeds")
    ax.set_title(f"Scores per test set (preset {results[0]['preset']}): {spread}", fontsize=10)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.12), ncol=min(2, n), frameon=False)
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# curves drawn as a running mean over this many logged values (a per-step 0/1 quantity reads as a zigzag otherwise)
RUNNING_MEAN = {"onpolicy_fraction": 10}
# what a curve's title says beside its name
CURVE_NOTES = {"valid_rougeL": "greedy, vs each row's one label: test Rouge-L takes the best of all references"}


def curve_title(key: str) -> str:
    """A curve panel's title: its metric, and how it is drawn or scored where that is not what the name says."""
    window = RUNNING_MEAN.get(key)
    note = [f"running mean of {window} logged steps"] * bool(window) + ([CURVE_NOTES[key]] if key in CURVE_NOTES else [])
    return key + (f"\n({'; '.join(note)})" if note else "")


def _smooth(values: list[float], window: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - window] if i >= window else 0.0)
        out.append(total / min(i + 1, window))
    return out


def plot_curves(curves: dict[str, dict[str, list[tuple[int, float]]]], path: Path, keep=None,
                title: str | None = None) -> Path | None:
    """One panel per loss term / validation metric (those `keep(name)` accepts). One colour per run group: the runs
    of one objective over training seeds (`<name>__seed<N>`) are their mean with a band from the lowest to the
    highest seed at the steps they share; a single run is its line."""
    keys = sorted({k for c in curves.values() for k in c if keep is None or keep(k)},
                  key=lambda k: (k.startswith("valid_"), k))
    if not keys:
        return None
    plt = _plt()
    import numpy as np

    groups: dict[str, list[str]] = {}
    for run in curves:
        groups.setdefault(group_name(run), []).append(run)
    colors = run_colors(list(groups))
    ncols = min(3, len(keys))
    nrows = (len(keys) + ncols - 1) // ncols
    fig, axes = plt.subplots(nrows, ncols, figsize=(5 * ncols, 3.2 * nrows + 0.6), squeeze=False)
    for ax, k in zip(axes.flat, keys):
        window = RUNNING_MEAN.get(k)
        for g, runs in groups.items():
            series = []
            for run in runs:
                if k in curves[run]:
                    steps, values = zip(*sorted(curves[run][k]))
                    series.append(dict(zip(steps, _smooth(list(values), window) if window else values)))
            if not series:
                continue
            common = sorted(set.intersection(*(set(s) for s in series)))
            if len(series) > 1 and len(common) > 1:
                table = np.array([[s[t] for t in common] for s in series])
                ax.fill_between(common, table.min(0), table.max(0), color=colors[g], alpha=0.2, linewidth=0)
                ax.plot(common, table.mean(0), color=colors[g])
            else:
                for one in series:
                    steps = sorted(one)
                    ax.plot(steps, [one[t] for t in steps], color=colors[g],
                            marker="o" if len(steps) < 15 else None, markersize=3)
        ax.set_title(curve_title(k), fontsize=10 if "\n" not in curve_title(k) else 8)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(keys):]:
        ax.axis("off")
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colors[g], label=g + (f" ({len(runs)} seeds: mean, band min-max)"
                                                         if len(runs) > 1 else "")) for g, runs in groups.items()]
    rows = (len(handles) + 1) // 2
    if title:
        fig.suptitle(title, fontsize=10)
    fig.legend(handles=handles, loc="lower center", ncol=min(2, len(handles)), fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0.02 + 0.025 * rows * 6 / max(nrows, 1) / 3, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_distances(analyses: dict[str, dict], path: Path) -> Path | None:
    """Bars of the structure-matrix L1 distances to the teacher, trained student vs its initial weights."""
    if not analyses:
        return None
    plt = _plt()
    import numpy as np

    names = list(analyses)
    fig, axes = plt.subplots(1, 2, figsize=(max(10.0, 2.6 * len(names)), 4.8))
    x = np.arange(len(names))
    for ax, key, title in zip(axes, ("cosine_l1", "inner_l1"), ("cosine similarity", "normalised inner product")):
        trained = [analyses[n]["trained"][key] for n in names]
        initial = [(analyses[n].get("initial") or {}).get(key, np.nan) for n in names]
        for offset, values, label, color in ((-0.2, initial, "initial student", "#bbbbbb"),
                                             (0.2, trained, "trained student", "#1f77b4")):
            bars = ax.bar(x + offset, values, 0.4, label=label, color=color)
            ax.bar_label(bars, labels=[f"{v:.3f}" for v in values], fontsize=7, padding=2)
        ax.set_xticks(x, names, rotation=20, ha="right", fontsize=8)
        ax.set_title(f"L1 distance to the teacher: {title}", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
        ax.margins(y=0.12)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="upper center", ncol=2, fontsize=9, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

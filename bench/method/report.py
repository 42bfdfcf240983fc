"""Turn the benchmark's runs into METHOD_RESULTS.md and the trait-two plot.

Matched step size, paired by seed: within one seed (one base model), plain DPO's learning-rate sweep
gives a curve of each measure against the parameter-change size; an arm's run is compared with that
seed's curve, linearly interpolated at the run's own parameter change. The per-seed differences are
averaged; a difference counts when its 95% confidence interval (Student t over seeds) excludes zero,
and is reported as "no difference" otherwise. Seeds whose run falls outside that seed's DPO sweep are
left out of the comparison, and the count says so.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from datetime import date
from importlib.metadata import version
from pathlib import Path

# (key, column title, format); measures derived from a run are computed in `_value`
COLUMNS = (
    ("param_change", "param change", "{:.2f}"),
    ("pair_accuracy", "pair acc", "{:.3f}"),
    ("margin", "margin (nats)", "{:.1f}"),
    ("greedy_concise", "greedy concise", "{:.2f}"),
    ("polite_prob", "P(polite)", "{:.3f}"),
    ("transfer_ratio", "transfer ratio", "{:.2f}"),
    ("greedy_polite", "greedy polite", "{:.2f}"),
    ("dlogp_chosen", "Δ logp(chosen)", "{:+.2f}"),
    ("log_pref_advantage", "log pref_adv_ratio", "{:.2f}"),
    ("greedy_correct_core", "correct core", "{:.2f}"),
)
# measures compared at matched step size: (key, name, higher is better; None: neither, say higher/lower)
COMPARED = (
    ("polite_prob", "trait two, P(polite)", True),
    ("transfer_ratio", "trait two, transfer ratio (held-out topics)", True),
    ("greedy_polite", "trait two, greedy polite rate", True),
    ("margin", "trait one, margin", True),
    ("greedy_concise", "trait one, greedy concise rate", True),
    ("dlogp_chosen", "Δ logp(chosen)", None),
    ("greedy_correct_core", "greedy answers with correct facts", True),
)
LIBRARIES = ("torch", "transformers", "trl", "peft")
# two-sided 95% Student t quantiles by degrees of freedom
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def _value(run: dict, key: str, baselines: dict[int, dict]) -> float:
    """A run's measure; `dlogp_chosen` and `transfer_ratio` are relative to the run's own base model.

    transfer ratio = (P - P_base) / (P_base_instructed - P_base), P = P(polite) without the instruction on the
    held-out topics: 0 = nothing carried over, 1 = the un-instructed model does what the instructed base did.
    """
    if key == "dlogp_chosen":
        return run["logp_chosen"] - baselines[run["seed"]]["logp_chosen"]
    if key == "transfer_ratio":
        base = baselines[run["seed"]]
        p_base, p_instructed = base["polite_prob_heldout_topics"], base["polite_prob_guided_heldout_topics"]
        return (run["polite_prob_heldout_topics"] - p_base) / (p_instructed - p_base)
    return run[key]


def _mean_sd(values: list[float]) -> tuple[float, float, int]:
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0, len(values)


def summarise(runs: list[dict], arms, baselines: dict[int, dict]) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm name -> key -> (mean, standard deviation over seeds, number of seeds)."""
    out = {}
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm.name]
        if rows:
            out[arm.name] = {key: _mean_sd([_value(r, key, baselines) for r in rows]) for key, _, _ in COLUMNS}
    return out


def interpolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Piecewise-linear value at `x` through (x, y) points; None outside their range."""
    points = sorted(points)
    for (x0, y0), (x1, y1) in zip(points, points[1:], strict=False):
        if x0 <= x <= x1:
            return y0 if x1 == x0 else y0 + (x - x0) / (x1 - x0) * (y1 - y0)
    return None


def matched_comparison(runs: list[dict], arms, baselines: dict[int, dict]) -> list[dict]:
    """Per non-DPO arm and compared measure: paired differences from the same seed's DPO curve."""
    dpo = {a.name for a in arms if a.is_dpo}
    curves: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    for r in runs:
        if r["arm"] in dpo:
            for key, _, _ in COMPARED:
                curves[(r["seed"], key)].append((r["param_change"], _value(r, key, baselines)))
    rows = []
    for arm in arms:
        if arm.is_dpo:
            continue
        arm_runs = [r for r in runs if r["arm"] == arm.name]
        if not arm_runs:
            continue
        for key, label, higher_better in COMPARED:
            diffs, arm_values, dpo_values = [], [], []
            for r in arm_runs:
                ref = interpolate(curves[(r["seed"], key)], r["param_change"])
                if ref is not None:
                    arm_values.append(_value(r, key, baselines))
                    dpo_values.append(ref)
                    diffs.append(arm_values[-1] - ref)
            row = {"arm": arm.name, "measure": label, "seeds": len(diffs), "of": len(arm_runs),
                   "step": statistics.fmean(r["param_change"] for r in arm_runs)}  # fmt: skip
            if len(diffs) < 2:
                rows.append({**row, "verdict": "outside DPO's sweep"})
                continue
            mean, sd, n = _mean_sd(diffs)
            half_width = T95[n - 1] * sd / math.sqrt(n)
            if abs(mean) <= half_width:
                verdict = "no difference"
            elif higher_better is None:
                verdict = "higher" if mean > 0 else "lower"
            else:
                verdict = "better" if (mean > 0) == higher_better else "worse"
            rows.append(
                {**row, "arm_mean": statistics.fmean(arm_values), "dpo_mean": statistics.fmean(dpo_values),
                 "diff": mean, "half_width": half_width, "verdict": verdict}
            )  # fmt: skip
    return rows


TRANSFER_TARGET, FACTS_TOLERANCE = 0.8, 0.02


def target_counts(runs: list[dict], arms, baselines: dict[int, dict]) -> list[dict]:
    """Per non-DPO arm, the replicates that meet issue 12's target at once: transfer ratio >= 0.8, trait one
    (greedy concise rate) no worse than the same seed's DPO at the same parameter change, and correct facts no
    more than 0.02 below it (the target guards against harm: an arm that keeps the facts where DPO at the same
    step loses them meets it). Replicates outside that seed's DPO sweep count as misses."""
    curves: dict[tuple[int, str], list[tuple[float, float]]] = defaultdict(list)
    dpo = {a.name for a in arms if a.is_dpo}
    for r in runs:
        if r["arm"] in dpo:
            for key in ("greedy_concise", "greedy_correct_core"):
                curves[(r["seed"], key)].append((r["param_change"], r[key]))
    rows = []
    for arm in arms:
        arm_runs = [r for r in runs if r["arm"] == arm.name]
        if arm.is_dpo or not arm_runs:
            continue
        met = 0
        for r in arm_runs:
            concise = interpolate(curves[(r["seed"], "greedy_concise")], r["param_change"])
            facts = interpolate(curves[(r["seed"], "greedy_correct_core")], r["param_change"])
            met += (
                concise is not None and facts is not None
                and _value(r, "transfer_ratio", baselines) >= TRANSFER_TARGET
                and r["greedy_concise"] >= concise and r["greedy_correct_core"] >= facts - FACTS_TOLERANCE
            )  # fmt: skip
        rows.append({"arm": arm.name, "met": met, "of": len(arm_runs)})
    return rows


def plot(path: Path, runs: list[dict], arms, summary, base_summary, comparison: list[dict]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8), gridspec_kw={"width_ratios": [1, 1, 0.8]})
    markers = {"hinge": "o", "ref_hinge": "s", "distill": "^", "ref_distill": "v"}
    others = [a for a in arms if not a.is_dpo]
    colours = {a.name: plt.get_cmap("tab20")(i % 20) for i, a in enumerate(others)}  # one per arm
    dpo = sorted((summary[a.name]["param_change"][0], a.name) for a in arms if a.is_dpo and a.name in summary)
    for ax, key, title in (
        (axes[0], "polite_prob", "P(polite ending | concise answer), no instruction"),
        (axes[1], "greedy_polite", "polite greedy generations, no instruction"),
    ):
        xs = [summary[n]["param_change"][0] for _, n in dpo]
        ys = [summary[n][key][0] for _, n in dpo]
        es = [summary[n][key][1] for _, n in dpo]
        ax.errorbar(xs, ys, yerr=es, color="black", marker="D", label="plain DPO (LR sweep)", capsize=3)
        for x, n in dpo:
            ax.annotate(n.replace("dpo ", ""), (x, summary[n][key][0]), textcoords="offset points", xytext=(4, -12),
                        fontsize=7)  # fmt: skip
        for arm in arms:
            if arm.is_dpo or arm.name not in summary:
                continue
            s = summary[arm.name]
            seeds = [r for r in runs if r["arm"] == arm.name]
            ax.scatter([r["param_change"] for r in seeds], [r[key] for r in seeds], s=12, alpha=0.35,
                       marker=markers[arm.align_loss], color=colours[arm.name])  # fmt: skip
            ax.errorbar(s["param_change"][0], s[key][0], xerr=s["param_change"][1], yerr=s[key][1],
                        marker=markers[arm.align_loss], color=colours[arm.name], capsize=3,
                        label=arm.name, linestyle="none")  # fmt: skip
        if key == "polite_prob":
            guided = base_summary["polite_prob_guided"][0]
            ax.axhline(guided, color="grey", linestyle="--", linewidth=1)
            ax.text(0.02, guided - 0.05, "base model with the instruction", color="grey", fontsize=8,
                    transform=ax.get_yaxis_transform())  # fmt: skip
        ax.axhline(base_summary[key][0], color="grey", linestyle=":", linewidth=1)
        ax.text(0.02, base_summary[key][0] + 0.015, "base model without it", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())  # fmt: skip
        ax.set_xlabel("parameter-change size ||W - W0||_F (adapter merged)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("trait two (polite)")
    axes[1].legend(fontsize=7, loc="best")
    # paired by seed: each arm minus the same seed's DPO curve at the same parameter change
    paired = [r for r in comparison if "diff" in r and r["measure"].startswith("trait two")]
    names = list(dict.fromkeys(r["arm"] for r in paired))
    for offset, (measure, colour) in enumerate((("P(polite)", "tab:purple"), ("greedy polite rate", "tab:orange"))):
        rows = {r["arm"]: r for r in paired if r["measure"].endswith(measure)}
        ys = [i + (offset - 0.5) * 0.3 for i in range(len(names))]
        ax = axes[2]
        ax.errorbar([rows[n]["diff"] for n in names], ys, xerr=[rows[n]["half_width"] for n in names], fmt="o",
                    color=colour, capsize=3, label=measure)  # fmt: skip
    axes[2].axvline(0, color="black", linewidth=1)
    axes[2].set_yticks(range(len(names)), names, fontsize=8)
    axes[2].invert_yaxis()
    axes[2].set_xlabel("arm - DPO at the same step, same seed (95% CI)")
    axes[2].set_title("trait two, paired difference from plain DPO", fontsize=10)
    axes[2].legend(fontsize=7, loc="lower right")
    axes[2].grid(alpha=0.3)
    fig.suptitle("Does the instruction's second effect transfer? (mean ± sd over seeds; faint: single seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(cell: tuple[float, float, int], spec: str) -> str:
    mean, spread, n = cell
    return spec.format(mean) + (f" ± {spec.replace('+', '').format(spread)}" if n > 1 else "")


def _ref_target_table(baselines: dict[int, dict]) -> list[str]:
    groups = defaultdict(list)
    for b in baselines.values():
        for g in b["ref_target_by_politeness"]:
            groups[(g["chosen_polite"], g["rejected_polite"])].append(g)
    lines = ["| chosen polite | rejected polite | pairs per seed | mean h_ref_pref (sd over seeds) | min | max |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for (chosen, rejected), gs in groups.items():
        mean, sd, _ = _mean_sd([g["mean"] for g in gs])
        lines.append(
            f"| {chosen} | {rejected} | {statistics.fmean(g['pairs'] for g in gs):.0f} | {mean:.1f} ± {sd:.1f} | "
            f"{min(g['min'] for g in gs):.1f} | {max(g['max'] for g in gs):.1f} |"
        )
    return lines


def _learned_prompt_lines(baselines: dict[int, dict]) -> list[str]:
    """The soft prompt STAGE=ptune learned on each seed's pairs (the learned-prompt arms use it): its held-out
    pair accuracy and margin (trait one, what the pairs teach) beside the instruction's and no prompt's."""
    rows = [b["learned_prompt"] for b in baselines.values() if "learned_prompt" in b]
    if not rows:
        return []
    cells = []
    for name, title in (("without_prompt", "no prompt"), ("preference_text", "the instruction"),
                        ("initial_prompt", "the soft prompt before training"), ("learned_prompt", "learned")):  # fmt: skip
        accuracy = _fmt(_mean_sd([r[name]["accuracy"] for r in rows]), "{:.3f}")
        margin = _fmt(_mean_sd([r[name]["margin"] for r in rows]), "{:.1f}")
        cells.append(f"{title} {accuracy} ({margin} nats)")
    return [
        f"Soft prompts learned by `STAGE=ptune` on each seed's training pairs ({len(rows)} seeds; the tool's "
        "defaults), held-out pair accuracy of the base model with each (margin): " + "; ".join(cells) + ".",
        "",
    ]


def _wall_text(wall_seconds: float | None, jobs: int | None) -> str:
    if wall_seconds is None:
        return ""
    return f", {jobs} replicates side by side ({wall_seconds / 60:.1f} min of wall time for the runs made)"


def write(
    report: Path, plot_path: Path, baselines: dict[int, dict], runs, arms, command, seconds, settings,
    wall_seconds: float | None, jobs: int | None,
) -> None:  # fmt: skip
    summary = summarise(runs, arms, baselines)
    base_rows = [{**b, "dlogp_chosen": 0.0, "transfer_ratio": 0.0} for b in baselines.values()]
    base_summary = {
        key: _mean_sd([b[key] for b in base_rows])
        for key in [k for k, _, _ in COLUMNS] + ["polite_prob_guided", "guided_pair_accuracy"]
    }
    comparison = matched_comparison(runs, arms, baselines)
    plot(plot_path, runs, arms, summary, base_summary, comparison)
    lines = [
        "# Method benchmark: what the preference guidance transfers",
        "",
        f"Generated by `{command}` on {date.today().isoformat()}: {seconds / 60:.1f} min of pretraining, training and "
        f"evaluation, one thread each{_wall_text(wall_seconds, jobs)}, on this machine's CPU ({', '.join(f'{lib} {version(lib)}' for lib in LIBRARIES)}). The design "
        "is in `bench/method/run.py` and `bench/method/world.py`; every run is in `bench/method/results.json`.",
        "",
        f"Settings: {settings}",
        "",
        "Each seed is a full replicate: its own pretraining corpus and base model, training pairs, LoRA "
        "initialisation and data order. All measures are on held-out questions and held-out topics, **without** the "
        "instruction; mean ± sd over seeds. `param change` is the Frobenius norm of the weight change (adapter "
        "merged); `margin` is `logp(concise) - logp(verbose)`; `P(polite)` is the probability of the polite ending "
        "after a concise answer; `greedy ...` are rates in greedy generations; `correct core` is the rate of greedy "
        "answers that start with the right facts (a collapse detector); `Δ logp(chosen)` is from the seed's base "
        "model; `log pref_adv_ratio` is `mean(h_pref - h_base)`.",
        "",
        "| arm | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
        "| base model (untrained) | " + " | ".join(_fmt(base_summary[k], spec) for k, _, spec in COLUMNS) + " |",
    ]
    for arm in arms:
        if arm.name in summary:
            cells = [_fmt(summary[arm.name][key], spec) for key, _, spec in COLUMNS]
            lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Base models with the instruction, for comparison: P(polite) = {_fmt(base_summary['polite_prob_guided'], '{:.3f}')}, "
        f"pair accuracy = {_fmt(base_summary['guided_pair_accuracy'], '{:.3f}')}.",
        "",
        *_learned_prompt_lines(baselines),
        "What the hinge forms' per-pair weights can know: the instructed base model's margin `h_ref_pref` "
        "(`ref_hinge`'s target) on the training pairs, by which response ends politely:",
        "",
        *_ref_target_table(baselines),
        "",
        "## At matched step size",
        "",
        "Each arm's run against plain DPO's learning-rate curve *of the same seed*, interpolated at the run's "
        "parameter change; differences averaged over seeds, with their 95% confidence half-width (Student t). "
        'A verdict other than "no difference" means the interval excludes zero (`bench/method/report.py`).',
        "",
        "| arm | param change | measure | seeds | arm | DPO at same change | difference | verdict |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in comparison:
        head = f"| {row['arm']} | {row['step']:.2f} | {row['measure']} | {row['seeds']} of {row['of']} |"
        if "diff" not in row:
            lines.append(f"{head} | | | {row['verdict']} |")
            continue
        lines.append(
            f"{head} {row['arm_mean']:.3f} | {row['dpo_mean']:.3f} | {row['diff']:+.3f} ± {row['half_width']:.3f} | "
            f"{row['verdict']} |"
        )
    lines += [
        "",
        f"Replicates meeting the target at once (transfer ratio >= {TRANSFER_TARGET}, greedy concise rate no worse "
        f"than DPO at the same step, correct facts at most {FACTS_TOLERANCE} below it): "
        + "; ".join(f"{r['arm']} {r['met']} of {r['of']}" for r in target_counts(runs, arms, baselines)),
    ]
    lines += ["", "Summary (generated from the table above):", ""]
    for _, label, _ in COMPARED:
        verdicts = {v: [r["arm"] for r in comparison if r["measure"] == label and r["verdict"] == v]
                    for v in ("better", "worse", "higher", "lower", "no difference", "outside DPO's sweep")}  # fmt: skip
        parts = [f"{v}: {', '.join(names)}" for v, names in verdicts.items() if names]
        lines.append(f"- {label}: " + "; ".join(parts))
    lines += ["", f"![trait two against parameter change]({plot_path.relative_to(report.parent).as_posix()})", ""]
    report.write_text("\n".join(lines) + kept_sections(report), encoding="utf-8")


# The hand-written reading of the numbers (what they say, the caveats) lives between these markers
READING_START, READING_END = "<!-- reading:start -->", "<!-- reading:end -->"


def kept_sections(report: Path) -> str:
    """The sections others write into the same file between their markers, kept as they are, in their order,
    when this report rewrites the file: the real-model benchmark's (`bench/realmodel/run.py`) and the
    hand-written reading of the results (`READING_START`)."""
    from bench.realmodel.run import END, START

    text = report.read_text(encoding="utf-8") if report.exists() else ""
    found = [
        (text.index(start), text[text.index(start) : text.index(end) + len(end)])
        for start, end in ((START, END), (READING_START, READING_END))
        if start in text and end in text
    ]
    return "".join(f"\n{section}\n" for _, section in sorted(found))


def total_seconds(baselines: dict[int, dict], runs: list[dict]) -> float:
    """Pretraining, soft-prompt learning and every run, one process each."""
    seconds = sum(b["pretraining_seconds"] + b.get("ptune_seconds", 0) for b in baselines.values())
    return seconds + sum(r["seconds"] for r in runs)


def main(argv: list[str] | None = None) -> int:
    """Rewrite METHOD_RESULTS.md and the plot from bench/method/results.json, without training anything
    (after a change to this file's tables or verdicts)."""
    import argparse
    import json

    from bench.method import run

    parser = argparse.ArgumentParser(description=main.__doc__.split("\n\n")[0])
    parser.add_argument("--wall_minutes", type=float, default=None, help="the wall time of the run that made them")
    parser.add_argument("--jobs", type=int, default=None, help="the --jobs of that run")
    args = parser.parse_args(argv)
    results = json.loads(run.RESULTS_JSON.read_text())
    baselines = {b["seed"]: b for b in results["baselines"]}
    wall = None if args.wall_minutes is None else args.wall_minutes * 60
    command = "python -m bench.method.run`, tables rewritten by `python -m bench.method.report"
    write(run.REPORT, run.PLOT, baselines, results["runs"], run.ARMS, command,
          total_seconds(baselines, results["runs"]), run.settings_text(), wall, args.jobs)  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

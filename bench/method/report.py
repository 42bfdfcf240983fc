"""Turn the benchmark's runs into METHOD_RESULTS.md and the trait-two plot.

Matched step size: plain DPO's learning-rate sweep gives, per measure, a curve of seed means against the
mean parameter-change size. Every other arm is compared with that curve linearly interpolated at the
arm's own mean parameter change. A difference counts only when it exceeds twice its standard error
(seed spread of the arm and of the two neighbouring DPO points, 3 seeds each); otherwise it is
reported as no difference.
"""

from __future__ import annotations

import math
import statistics
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
    ("greedy_polite", "greedy polite", "{:.2f}"),
    ("dlogp_chosen", "Δ logp(chosen)", "{:+.2f}"),
    ("log_pref_advantage", "log pref_adv_ratio", "{:.2f}"),
    ("greedy_correct_core", "correct core", "{:.2f}"),
)
# measures compared at matched step size: (key, name, higher is better; None: neither, say higher/lower)
COMPARED = (
    ("polite_prob", "trait two, P(polite)", True),
    ("greedy_polite", "trait two, greedy polite rate", True),
    ("margin", "trait one, margin", True),
    ("greedy_concise", "trait one, greedy concise rate", True),
    ("dlogp_chosen", "Δ logp(chosen)", None),
    ("greedy_correct_core", "greedy answers with correct facts", True),
)
LIBRARIES = ("torch", "transformers", "trl", "peft")


def _value(run: dict, key: str, baseline: dict) -> float:
    if key == "dlogp_chosen":
        return run["logp_chosen"] - baseline["logp_chosen"]
    return run[key]


def summarise(runs: list[dict], arms, baseline: dict) -> dict[str, dict[str, tuple[float, float, int]]]:
    """arm name -> key -> (mean, standard deviation over seeds, number of seeds)."""
    out = {}
    keys = [k for k, _, _ in COLUMNS]
    for arm in arms:
        rows = [r for r in runs if r["arm"] == arm.name]
        if not rows:
            continue
        out[arm.name] = {}
        for key in keys:
            values = [_value(r, key, baseline) for r in rows]
            spread = statistics.stdev(values) if len(values) > 1 else 0.0
            out[arm.name][key] = (statistics.fmean(values), spread, len(values))
    return out


def dpo_at(summary, dpo_names: list[str], key: str, step: float) -> tuple[float, float] | None:
    """DPO's (mean, standard error) for `key` interpolated at parameter change `step`; None outside the sweep."""
    points = sorted((summary[n]["param_change"][0], summary[n][key], n) for n in dpo_names)
    for (x0, (m0, s0, n0), _), (x1, (m1, s1, n1), _) in zip(points, points[1:], strict=False):
        if x0 <= step <= x1:
            w = 0.0 if x1 == x0 else (step - x0) / (x1 - x0)
            se = math.hypot((1 - w) * s0 / math.sqrt(n0), w * s1 / math.sqrt(n1))
            return m0 + w * (m1 - m0), se
    return None


def matched_comparison(summary, arms) -> list[dict]:
    dpo_names = [a.name for a in arms if a.is_dpo and a.name in summary]
    rows = []
    for arm in arms:
        if arm.is_dpo or arm.name not in summary:
            continue
        step = summary[arm.name]["param_change"][0]
        for key, label, higher_better in COMPARED:
            mean, spread, n = summary[arm.name][key]
            ref = dpo_at(summary, dpo_names, key, step)
            if ref is None:
                rows.append({"arm": arm.name, "measure": label, "step": step, "verdict": "outside DPO's sweep"})
                continue
            diff = mean - ref[0]
            se = math.hypot(spread / math.sqrt(n), ref[1])
            if abs(diff) <= 2 * se:
                verdict = "no difference"
            elif higher_better is None:
                verdict = "higher" if diff > 0 else "lower"
            else:
                verdict = "better" if (diff > 0) == higher_better else "worse"
            rows.append(
                {"arm": arm.name, "measure": label, "step": step, "arm_mean": mean, "dpo_mean": ref[0],
                 "diff": diff, "se": se, "verdict": verdict}
            )  # fmt: skip
    return rows


def plot(path: Path, runs: list[dict], arms, summary, baseline: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    markers = {"hinge": "o", "ref_hinge": "s", "distill": "^"}
    colours = {0.1: "tab:blue", 1.0: "tab:red"}
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
                       marker=markers[arm.align_loss], color=colours.get(arm.alpha, "tab:green"))  # fmt: skip
            ax.errorbar(s["param_change"][0], s[key][0], xerr=s["param_change"][1], yerr=s[key][1],
                        marker=markers[arm.align_loss], color=colours.get(arm.alpha, "tab:green"), capsize=3,
                        label=arm.name, linestyle="none")  # fmt: skip
        if key == "polite_prob":
            ax.axhline(baseline["polite_prob_guided"], color="grey", linestyle="--", linewidth=1)
            ax.text(0.02, baseline["polite_prob_guided"] - 0.05, "base model with the instruction", color="grey",
                    fontsize=8, transform=ax.get_yaxis_transform())  # fmt: skip
        ax.axhline(baseline[key], color="grey", linestyle=":", linewidth=1)
        ax.text(0.02, baseline[key] + 0.015, "base model without it", color="grey", fontsize=8,
                transform=ax.get_yaxis_transform())  # fmt: skip
        ax.set_xlabel("parameter-change size ||W - W0||_F (adapter merged)")
        ax.set_title(title, fontsize=10)
        ax.set_ylim(-0.03, 1.03)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("trait two (polite)")
    axes[1].legend(fontsize=7, loc="best")
    fig.suptitle("Does the instruction's second effect transfer? (mean ± sd over seeds; faint: single seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _fmt(cell: tuple[float, float, int], spec: str) -> str:
    mean, spread, n = cell
    return spec.format(mean) + (f" ± {spec.replace('+', '').format(spread)}" if n > 1 else "")


def write(report: Path, plot_path: Path, baseline, runs, arms, command: str, seconds: float, settings: str) -> None:
    summary = summarise(runs, arms, baseline)
    plot(plot_path, runs, arms, summary, baseline)
    comparison = matched_comparison(summary, arms)
    lines = [
        "# Method benchmark: what the preference guidance transfers",
        "",
        f"Generated by `{command}` on {date.today().isoformat()}: {seconds / 60:.1f} min of pretraining, training and "
        "evaluation on this machine's CPU "
        f"({', '.join(f'{lib} {version(lib)}' for lib in LIBRARIES)}). The design is in "
        "`bench/method/run.py` and `bench/method/world.py`; every run is in `bench/method/results.json`.",
        "",
        f"Settings: {settings}",
        "",
        "All measures are on held-out questions and held-out topics, **without** the instruction. Mean ± sd over "
        "seeds. `param change` is the Frobenius norm of the weight change (adapter merged); `margin` is "
        "`logp(concise) - logp(verbose)`; `P(polite)` is the probability of the polite ending after a concise "
        "answer; `greedy ...` are rates in greedy generations; `correct core` is the rate of greedy answers that "
        "start with the right facts (a collapse detector); `log pref_adv_ratio` is `mean(h_pref - h_base)`.",
        "",
        "| arm | " + " | ".join(title for _, title, _ in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    base_cells = [
        spec.format(_value(baseline, key, baseline)) if key in baseline or key == "dlogp_chosen" else ""
        for key, _, spec in COLUMNS
    ]
    lines.append("| base model (untrained) | " + " | ".join(base_cells) + " |")
    for arm in arms:
        if arm.name in summary:
            cells = [_fmt(summary[arm.name][key], spec) for key, _, spec in COLUMNS]
            lines.append(f"| {arm.name} | " + " | ".join(cells) + " |")
    lines += [
        "",
        f"Instructed base model for comparison: P(polite) = {baseline['polite_prob_guided']:.3f}, "
        f"guided pair accuracy = {baseline['guided_pair_accuracy']:.3f}.",
        "",
        "What the hinge forms' per-pair weights can know: the instructed base model's margin `h_ref_pref` "
        "(`ref_hinge`'s target) on the training pairs, by which response ends politely:",
        "",
        "| chosen polite | rejected polite | pairs | mean h_ref_pref | min | max |",
        "|---|---|---|---|---|---|",
        *(
            f"| {g['chosen_polite']} | {g['rejected_polite']} | {g['pairs']} | {g['mean']:.1f} | {g['min']:.1f} | "
            f"{g['max']:.1f} |"
            for g in baseline.get("ref_target_by_politeness", [])
        ),
        "",
        "## At matched step size",
        "",
        "Each arm against plain DPO's learning-rate curve interpolated at the arm's parameter change "
        "(`bench/method/report.py` states the rule: a difference counts when it exceeds twice its standard error).",
        "",
        "| arm | param change | measure | arm | DPO at same change | difference | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in comparison:
        if "diff" not in row:
            lines.append(f"| {row['arm']} | {row['step']:.2f} | {row['measure']} | | | | {row['verdict']} |")
            continue
        lines.append(
            f"| {row['arm']} | {row['step']:.2f} | {row['measure']} | {row['arm_mean']:.3f} | {row['dpo_mean']:.3f} | "
            f"{row['diff']:+.3f} ± {row['se']:.3f} | {row['verdict']} |"
        )
    lines += ["", "Summary (generated from the table above):", ""]
    for _, label, _ in COMPARED:
        verdicts = {v: [r["arm"] for r in comparison if r["measure"] == label and r["verdict"] == v]
                    for v in ("better", "worse", "higher", "lower", "no difference")}  # fmt: skip
        parts = [f"{v}: {', '.join(names)}" for v, names in verdicts.items() if names]
        lines.append(f"- {label}: " + ("; ".join(parts) if parts else "no arm inside DPO's sweep"))
    lines += ["", f"![trait two against parameter change]({plot_path.relative_to(report.parent).as_posix()})", ""]
    report.write_text("\n".join(lines), encoding="utf-8")

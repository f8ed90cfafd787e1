"""The demo's report: PNG plots, sample generations, summary.json and one report.html showing all of it.

The point is a page a user would rather look at than read: the reward-vs-KL frontier (the DPO
paper's figure), the training curves practitioners watch (loss, reward accuracy, margins, chosen and
rejected log-probs), and what the policy actually writes next to what π_ref writes.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

PLOTS = {
    "loss.png": ("loss", "DPO loss", "loss"),
    "accuracy.png": ("rewards/accuracies", "reward accuracy (chosen reward > rejected reward)", "accuracy"),
    "margins.png": ("rewards/margins", "reward margin β·h (chosen − rejected)", "margin"),
}


def read_metrics(run_dir: str | Path) -> tuple[list[dict], list[dict]]:
    """(training rows, evaluation rows) of a run's metrics.jsonl."""
    path = Path(run_dir) / "metrics.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []
    return [r for r in rows if "loss" in r], [r for r in rows if "eval_loss" in r]


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only: no display needed, works on servers and in CI
    import matplotlib.pyplot as plt

    return plt


def plot_curves(out: Path, results: list[dict]) -> list[str]:
    """One PNG per training metric, a line per DPO run (dashed: held-out pairs)."""
    plt = _pyplot()
    dpo = [r for r in results if r["loss"] != "sft"]
    files = []
    for name, (key, title, ylabel) in PLOTS.items():
        fig, ax = plt.subplots(figsize=(6, 3.6))
        for i, r in enumerate(dpo):
            train, evals = read_metrics(r["run_dir"])
            color = f"C{i}"
            ax.plot([row["step"] for row in train], [row[key] for row in train], color=color,
                    label=f"β={r['beta']:g} train")
            if evals:
                ax.plot([row["step"] for row in evals], [row["eval_" + key] for row in evals], "--o",
                        color=color, markersize=3, label=f"β={r['beta']:g} held-out")
        ax.set(title=title, xlabel="optimizer step", ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(out / name, dpi=110)
        plt.close(fig)
        files.append(name)
    files.append(_plot_logps(out, dpo[0]))
    return files


def _plot_logps(out: Path, result: dict) -> str:
    """Chosen and rejected log-probs of the main run: DPO widens their gap, and often lowers both."""
    plt = _pyplot()
    train, _ = read_metrics(result["run_dir"])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    steps = [row["step"] for row in train]
    ax.plot(steps, [row["logps/chosen"] for row in train], color="C2", label="chosen")
    ax.plot(steps, [row["logps/rejected"] for row in train], color="C3", label="rejected")
    ax.set(title=f"log π(y|x) of training pairs (β={result['beta']:g}, summed over tokens)",
           xlabel="optimizer step", ylabel="log-prob (nats)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "logps.png", dpi=110)
    plt.close(fig)
    return "logps.png"


def plot_frontier(out: Path, summary: dict, results: list[dict]) -> str:
    """Mean gold reward against KL(π‖π_ref), with standard errors: the DPO paper's frontier figure."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ax.errorbar([0.0], [summary["gold_reward_reference"]], yerr=[summary["gold_reward_reference_stderr"]],
                fmt="s", color="gray", label="π_ref")
    dpo = sorted((r for r in results if r["loss"] != "sft"), key=lambda r: r["kl"])
    ax.errorbar([r["kl"] for r in dpo], [r["gold_reward_policy"] for r in dpo],
                xerr=[r["kl_stderr"] for r in dpo], yerr=[r["gold_reward_policy_stderr"] for r in dpo],
                fmt="-o", color="C0", label="DPO")
    for r in dpo:
        ax.annotate(f"β={r['beta']:g}", (r["kl"], r["gold_reward_policy"]), textcoords="offset points",
                    xytext=(5, -12), fontsize=8)
    for r in results:
        if r["loss"] == "sft":
            ax.errorbar([r["kl"]], [r["gold_reward_policy"]], xerr=[r["kl_stderr"]],
                        yerr=[r["gold_reward_policy_stderr"]], fmt="D", color="C1", label="Preferred-FT")
    ax.set(title="gold reward vs KL on held-out prompts", xlabel="KL(π‖π_ref), nats per sequence",
           ylabel="mean gold reward")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "frontier.png", dpi=110)
    plt.close(fig)
    return "frontier.png"


def sample_rows(sampled, limit: int = 8) -> list[dict]:
    """The first ``limit`` held-out prompts with π_ref's and π's completions and their gold rewards."""
    rows = []
    for i in range(min(limit, len(sampled.policy_samples))):
        rows.append({"prompt": sampled.policy_samples[i].prompt,
                     "reference": sampled.reference_samples[i].completion,
                     "reference_reward": sampled.reference_rewards[i],
                     "policy": sampled.policy_samples[i].completion, "policy_reward": sampled.policy_rewards[i]})
    return rows


def write_report(out: Path, summary: dict, results: list[dict], sampled, say=print) -> None:
    """All plots, samples.jsonl and report.html into ``out``."""
    plots = [plot_frontier(out, summary, results)] + plot_curves(out, results)
    samples = sample_rows(sampled)
    (out / "samples.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sample_rows(sampled, 10**9)))
    summary["plots"] = plots
    summary["samples"] = samples
    (out / "report.html").write_text(render_html(summary, results, plots, samples), encoding="utf-8")
    say(f"\nreport: {out / 'report.html'}")


def _fmt(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _pm(mean, err, digits: int = 3) -> str:
    return f"{_fmt(mean, digits)} ± {_fmt(err, digits)}"


def policy_table(summary: dict) -> list[list[str]]:
    """Header, π_ref, then one row per trained policy (used by the HTML report and the printed table)."""
    results = summary["policies"]
    fluent = all("fluent_policy" in r for r in results)
    rows = [["policy", "β", "gold reward", "win rate vs π_ref", "KL(π‖π_ref) nats", "held-out pref. acc."]
            + (["grammatical"] if fluent else [])]
    rows.append(["π_ref", "–", _pm(summary["gold_reward_reference"], summary["gold_reward_reference_stderr"]),
                 "–", "0", "–"] + ([f"{summary['fluent_reference']:.0%}"] if fluent else []))
    for r in results:
        rows.append([r["name"], "–" if r["loss"] == "sft" else f"{r['beta']:g}",
                     _pm(r["gold_reward_policy"], r["gold_reward_policy_stderr"]),
                     _pm(r["win_rate"], r["win_rate_stderr"]), _pm(r["kl"], r["kl_stderr"], 2),
                     _fmt(r["eval_reward_accuracy"])] + ([f"{r['fluent_policy']:.0%}"] if fluent else []))
    return rows


def render_html(summary: dict, results: list[dict], plots: list[str], samples: list[dict]) -> str:
    """One self-contained page (the PNGs sit next to it)."""
    e = html.escape
    table = policy_table(summary)
    head = "".join(f"<th>{e(c)}</th>" for c in table[0])
    body = "".join("<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in table[1:])
    sample_html = "".join(
        f"<tr><td>{e(s['prompt'])}</td><td>{e(s['reference'])}<br><small>reward {s['reference_reward']:.3f}</small>"
        f"</td><td>{e(s['policy'])}<br><small>reward {s['policy_reward']:.3f}</small></td></tr>" for s in samples)
    images = "".join(f'<figure><img src="{e(p)}" alt="{e(p)}"></figure>' for p in plots)
    phases = ", ".join(f"{e(k)} {v:.0f}s" for k, v in summary["phases_seconds"].items())
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>dpolab demo — {e(summary['task'])}</title>
<style>
body {{ font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; color: #222; }}
table {{ border-collapse: collapse; margin: 1em 0; }} td, th {{ border: 1px solid #ccc; padding: 4px 8px; }}
th {{ background: #f3f3f3; }} figure {{ display: inline-block; margin: 4px; }} img {{ width: 520px; }}
.big {{ font-size: 1.3em; }} small {{ color: #666; }}
</style></head><body>
<h1>dpolab demo: DPO on {e(summary['task'])}</h1>
<p class="big">Against π_ref on {summary['eval_prompts']} held-out prompts, the DPO policy (β={summary['beta']:g})
wins <b>{summary['win_rate']:.1%}</b> of pairwise comparisons under the gold reward
(<code>{e(summary['judge'])}</code>), at KL(π‖π_ref) = <b>{summary['kl']:.2f} ± {summary['kl_stderr']:.2f}</b>
nats; mean gold reward {summary['gold_reward_policy']:.3f} vs {summary['gold_reward_reference']:.3f}.</p>
<p>π_ref: <code>{e(summary['reference_model'])}</code>; {summary['train_pairs']:,} preference pairs from
{summary['train_prompts']} held-in prompts. Time: {summary['seconds']:.0f}s ({phases}).</p>
<table><tr>{head}</tr>{body}</table>
{images}
<h2>Samples on held-out prompts (π_ref vs π, β={summary['beta']:g})</h2>
<table><tr><th>prompt</th><th>π_ref</th><th>π (DPO)</th></tr>{sample_html}</table>
<p><small>Win rate: one sample of each per prompt, ties counted ½. KL: mean of log π(y|x) − log π_ref(y|x)
over samples y ~ π, ± standard error. Held-out preference accuracy: pairs of π_ref samples ranked by the
gold reward, implicit reward β·(log π − log π_ref) of the chosen one higher. summary.json has every
number.</small></p>
</body></html>
"""


def print_table(summary: dict, say=print) -> None:
    """The summary as a small table on stdout."""
    rows = policy_table(summary)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    say("")
    say(line(rows[0]))
    say("  ".join("-" * w for w in widths))
    for r in rows[1:]:
        say(line(r))
    say(f"\n{summary['task']}: {summary['eval_prompts']} held-out prompts, {summary['train_pairs']:,} training "
        f"pairs; {summary['seconds']:.0f}s in all")

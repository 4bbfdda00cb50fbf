"""`zsctl report RUN_DIR`: one page (report.md) and PNG plots from the artifacts of a run.

It finds artifacts by their manifests (any folder under RUN_DIR holding manifest.json), so it
works for the demo's layout and for stages run by hand into one folder. Plots need matplotlib
(`pip install "zsctl[plot]"`); without it the report is written with tables only and says so.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow.parquet as pq

from zsctl.core import artifacts, metrics
from zsctl.core.config import Options, option
from zsctl.core.errors import BadInput
from zsctl.core.progress import Progress


@dataclass(kw_only=True)
class ReportConfig(Options):
    run_dir: str = option(help="Folder holding the run's artifacts.", positional=True)
    out: str | None = option(None, "Report folder (default RUN_DIR/report).")
    price_per_1k: float = option(15.0, "USD per 1,000 real search calls, for the cost ledger (SerpAPI-like "
                                 "pricing; an assumption).", ge=0)


def find_artifacts(run_dir: Path) -> dict[str, list[tuple[Path, dict]]]:
    """kind -> [(dir, manifest)], in name order."""
    found: dict[str, list[tuple[Path, dict]]] = {}
    for mf in sorted(run_dir.rglob(artifacts.MANIFEST)):
        d = mf.parent
        if "checkpoints" in d.parts or d.name == "report":
            continue
        m = artifacts.read_manifest(d, allow_incomplete=True)  # a damaged manifest is named, not skipped
        if m.get("complete") is False:  # a stage still running, or killed: nothing to report yet
            continue
        found.setdefault(m.get("kind", "?"), []).append((d, m))
    return found


def _fmt(x, pct=True) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return f"{100 * x:.1f}" if pct else f"{x:.2f}"


def _open_em(m: dict) -> str:
    """EM over the open questions and their count, '–' for an evaluation made before it was recorded."""
    return f"{_fmt(m['em_open'])} ({m['open_n']})" if "open_n" in m else "–"


def _reading(m: dict) -> str:
    """EM on the open questions a search found the answer for, their count, and the share of open
    answers that repeat one of the policy's queries; '–' for an evaluation made before they were."""
    if "found_open_n" not in m:
        return "– | –"
    return f"{_fmt(m['read_em'])} ({m['found_open_n']}) | {_fmt(m['query_answer_share'])}"


def _eval_rows(found) -> list[tuple[str, str, dict]]:
    rows = []
    # in the order the evaluations ran (the demo's base → warm start → RL), not by folder name
    for d, _ in sorted(found.get("predictions", []), key=lambda dm: dm[1].get("created_at", "")):
        met = _metrics(d)
        for bench, m in met["benchmarks"].items():
            rows.append((d.name, bench, m))
    return rows


def _metrics(d: Path) -> dict:
    """An evaluation's metrics.json, with the two parts the report reads."""
    path = d / "metrics.json"
    try:
        met = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise BadInput(f"'{path}' is missing or unreadable ({type(e).__name__}); rerun the zsctl eval that wrote "
                       f"'{d}'") from None
    if not (isinstance(met, dict) and isinstance(met.get("benchmarks"), dict) and isinstance(met.get("overall"), dict)):
        raise BadInput(f"'{path}' lacks 'benchmarks' and 'overall'; rerun the zsctl eval that wrote '{d}'")
    return met


def _top_queries_section(found) -> list[str]:
    """What each evaluated policy searched for most (metrics.json's overall top queries)."""
    lines = []
    for d, _ in sorted(found.get("predictions", []), key=lambda dm: dm[1].get("created_at", "")):
        top = _metrics(d)["overall"].get("top_queries")
        if top:
            lines.append(f"- `{d.name}` searched most for: " + "; ".join(f"\"{q}\" ×{c}" for q, c in top))
    return lines + [""] if lines else []


def _paired(found) -> list[dict]:
    """Each evaluation against the one before it (run order: base → warm start → RL), question by
    question, where they share questions (metrics.paired_difference)."""
    runs = sorted(found.get("predictions", []), key=lambda dm: dm[1].get("created_at", ""))
    rows = {}  # each evaluation's predictions, read once
    for d, _ in runs:
        path = d / "predictions.parquet"
        if not path.exists():  # metrics.json alone (an evaluation copied without its predictions)
            continue
        try:
            rows[d] = pq.read_table(path).to_pylist()
        except (OSError, ValueError) as e:
            raise BadInput(f"'{path}' is missing or unreadable ({type(e).__name__}); rerun the zsctl eval that "
                           f"wrote '{d}'") from None
    out = []
    for (d0, _), (d1, _) in zip(runs, runs[1:]):
        diff = metrics.paired_difference(rows[d0], rows[d1]) if d0 in rows and d1 in rows else {"n": 0}
        if diff["n"]:
            out.append({"before": d0.name, "after": d1.name, **diff})
    return out


def _paired_section(paired: list[dict]) -> list[str]:
    if not paired:
        return []
    lines = ["## Before → after on the same questions (paired, 95 % bootstrap intervals)", "",
             "| before → after | n | EM | F1 | question-hit rate % | search-hit rate % | EM won / lost |",
             "|---|---|---|---|---|---|---|"]

    def cell(m: dict | None) -> str:
        if not m:
            return "–"
        ci = m["ci95"]
        return (f"{_fmt(m['before'])} → {_fmt(m['after'])} ({100 * m['diff']:+.1f}"
                + (f"; {100 * ci[0]:+.1f} to {100 * ci[1]:+.1f})" if ci else ")"))

    lines += [f"| {p['before']} → {p['after']} | {p['n']} | {cell(p['em'])} | {cell(p['f1'])} | "
              f"{cell(p.get('question_hit_rate'))} | {cell(p.get('search_hit_rate'))} | "
              f"{p['em_won']} / {p['em_lost']} |" for p in paired]
    return lines + ["", "Each cell: before → after (difference; its 95 % interval over 2,000 resamplings of the "
                    "questions, both runs resampled together, a question's searches with it). An interval that holds "
                    "0 is a change these questions cannot tell from chance. EM won / lost: questions only the later / "
                    "only the earlier run answered exactly.", ""]


def _check_sim_section(d: Path, s: dict) -> list[str]:
    """Useful vs noisy (vs the real engine) side by side: the gap in has-answer is the controllability."""
    sim, real = s.get("simulator", {}), s.get("real")
    cols = [("useful", sim.get("useful")), ("noisy", sim.get("noisy"))] + ([("real", real)] if real else [])
    cols = [(name, c) for name, c in cols if c]
    if not cols:
        return []
    rows = [("holds a gold answer %", "has_answer", True), ("format valid %", "format_valid", True),
            ("words / document", "mean_doc_words", False), ("distinct-2", "distinct_2", False)]
    lines = [
        f"## Simulator check `{d.name}`: {sim.get('spec', '?')} ({s.get('n_queries', '?')} queries, "
        f"k={s.get('k', '?')})",
        "",
        "| | " + " | ".join(name for name, _ in cols) + " |",
        "|---|" + "---|" * len(cols),
    ]
    lines += [f"| {label} | " + " | ".join(_fmt(c.get(key), pct) for _, c in cols) + " |" for label, key, pct in rows]
    lines += [
        "",
        f"Controllability gap (useful - noisy, holds a gold answer): {_fmt(sim.get('controllability_gap'))} points",
    ]
    if sim.get("gap_ci95"):  # check-sim's held-apart figures (older runs lack them)
        leak, held = sim.get("leak", {}), s.get("held_apart", {})
        lo, hi = sim["gap_ci95"]
        lines[-1] += (
            f", 95% interval [{_fmt(lo)}, {_fmt(hi)}] (Newcombe), n = {s.get('n_queries', '?')} held-apart queries "
            f"({held.get('excluded_trained', '?')} trained-on and {held.get('excluded_yes_no', '?')} yes/no dropped; "
            f"trained questions: {held.get('trained_on', '?')}); format valid {_fmt(sim.get('format_valid'))} %; "
            f"leak (useful mode, a query that names nothing): {_fmt(leak.get('has_answer'))} % of {leak.get('n', '?')}"
            + (f"; verify={sim['verify']}" if sim.get("verify") else "")
        )
    return lines + [""]


def _ledger(found, price: float) -> dict:
    # eval records its engine's stats under "search"; collect its search ledger under "ledger"
    real = sum(m["summary"].get("search", {}).get("calls", 0) for _, m in found.get("predictions", []))
    real += sum(m["summary"].get("ledger", {}).get("engine_calls", 0) for _, m in found.get("trajectories", []))
    simulated = 0
    for d, m in found.get("policy", []):
        if (d / "metrics.parquet").is_file():
            t = pq.read_table(d / "metrics.parquet")
            if "sim_searches" in t.column_names:
                simulated += int(sum(v or 0 for v in t.column("sim_searches").to_pylist()))
    return {
        "real_calls": real,
        "simulated_calls": simulated,
        "price_per_1k_usd": price,
        "cost_saved_usd": round(simulated * price / 1000, 4),
    }


def run(cfg: ReportConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    run_dir = Path(cfg.run_dir)
    if not run_dir.is_dir():
        raise BadInput(f"run directory '{run_dir}' does not exist; pass the folder holding the stage outputs")
    found = find_artifacts(run_dir)
    if not found:
        raise BadInput(f"'{run_dir}' holds no artifact (no manifest.json below it); run some stages into it first")
    out = artifacts.check_out(cfg.out or run_dir / "report", "report", [run_dir])

    lines = [f"# zsctl report: {run_dir}", ""]
    evals = _eval_rows(found)
    if evals:
        lines += ["## Evaluation (real engine)", "",
                  "| run | benchmark | n | EM | SubEM | F1 | EM, open questions | searches | degenerate queries % "
                  "| repeated queries % | ungrounded queries % | search-hit rate % | first-search hit rate % "
                  "| question-hit rate % | EM where a search found it | answers that repeat a query % |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        lines += [
            f"| {r} | {b} | {m['n']} | {_fmt(m['em'])} | {_fmt(m['subem'])} | {_fmt(m['f1'])} | "
            f"{_open_em(m)} | {_fmt(m['avg_searches'], pct=False)} | {_fmt(m.get('degenerate_share'))} | "
            f"{_fmt(m.get('repeat_share'))} | {_fmt(m.get('ungrounded_share'))} | {_fmt(m.get('search_hit_rate'))} | "
            f"{_fmt(m.get('first_search_hit_rate'))} | {_fmt(m.get('question_hit_rate'))} | {_reading(m)} |"
            for r, b, m in evals
        ]
        lines += ["", "EM, open questions: EM over the questions (how many in brackets) whose answer is neither yes/no "
                  "nor named in the question, which no policy gets by echoing a name it reads or guessing. "
                  "Degenerate: a query with no content word of its own (empty, a placeholder, instruction words). "
                  "Repeated: a query the same question already searched, word for word (the engine returns the "
                  "same documents). "
                  "Ungrounded: a query sharing no content word with the question or the documents read before it "
                  "(made up). "
                  "Search-hit rate: searches whose documents hold a gold answer; first-search hit rate: the same for "
                  "each question's first search only (the opening query, however many follow); question-hit rate: "
                  "questions one of whose searches found one (a question that never searched is a miss); all over "
                  "questions whose golds are not all yes/no. "
                  "EM where a search found it: EM over the open questions (how many in brackets) one of whose "
                  "searches returned a gold answer, i.e. how well the policy reads what it found; answers that "
                  "repeat a query: open-question answers that are one of the policy's own queries (a policy that "
                  "cannot read answers with the name it looked up).", ""]
        lines += _top_queries_section(found)
    paired = _paired(found)
    lines += _paired_section(paired)
    rl_runs = [(d, pq.read_table(d / "metrics.parquet").to_pylist()) for d, _ in found.get("policy", [])
               if (d / "metrics.parquet").is_file()]
    for d, mets in rl_runs:
        if not mets:
            continue
        w = max(1, len(mets) // 5)  # single steps are noisy: compare the means of the first and last fifth

        def avg(rows, key):
            vals = [r[key] for r in rows if r.get(key) is not None and not math.isnan(r[key])]
            return sum(vals) / len(vals) if vals else None

        head, tail = mets[:w], mets[-w:]
        lines += [
            f"## RL run `{d.name}` ({len(mets)} steps)",
            "",
            f"| mean over | steps {head[0]['step']}–{head[-1]['step']} | steps {tail[0]['step']}–{tail[-1]['step']} |",
            "|---|---|---|",
        ]
        lines += [
            f"| {label} | {_fmt(avg(head, key), pct)} | {_fmt(avg(tail, key), pct)} |"
            for label, key, pct in (
                ("reward", "reward_mean", False),
                ("groups with one reward for all (no gradient) %", "zero_std_share", True),
                ("valid-answer rate %", "valid_answer_rate", True),
                ("noise p planned", "noise_p", False),
                ("noisy share realised", "noisy_share", False),
                ("searches / trajectory", "searches_per_traj", False),
                ("degenerate queries %", "degenerate_share", True),
                ("repeated queries %", "repeat_share", True),
                ("ungrounded queries %", "ungrounded_share", True),
                ("search-hit rate %", "search_hit_rate", True),
                ("search-hit rate, useful mode %", "search_hit_rate_useful", True),
                ("search-hit rate, noisy mode %", "search_hit_rate_noisy", True),
                ("seconds / step", "step_seconds", False),
            )
        ]
        lines.append("")
    ledger = _ledger(found, cfg.price_per_1k)
    lines += [
        "## Search-cost ledger",
        "",
        f"- real engine calls (collect + eval): {ledger['real_calls']}",
        f"- simulated calls (rl): {ledger['simulated_calls']}",
        f"- at ${cfg.price_per_1k:g} per 1,000 real calls, the simulated calls saved ${ledger['cost_saved_usd']:.2f}",
        "",
    ]
    for d, m in found.get("check_sim", []):
        lines += _check_sim_section(d, m.get("summary", {}))

    with artifacts.staging(out) as stage:  # an older report in --out stays until this one is whole
        summary = _write_report(cfg, out, stage, found, lines, rl_runs, evals, ledger, paired)
    progress.log(f"report → {out / 'report.md'}")
    return summary


def _write_report(cfg, out: Path, stage: Path, found, lines, rl_runs, evals, ledger, paired) -> dict:
    plots = _plots(stage, rl_runs, evals, ledger)
    if plots is None:
        lines += ["_Plots skipped: matplotlib is not installed (`pip install \"zsctl[plot]\"`)._", ""]
    else:
        lines += ["## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots] + [""]
    (stage / "report.md").write_text("\n".join(lines), encoding="utf-8")
    summary = {
        "out": str(out),
        "report": str(out / "report.md"),
        "plots": [p.name for p in plots or []],
        "artifacts": {k: len(v) for k, v in found.items()},
        "ledger": ledger,
        "evaluation": [
            {
                "run": r,
                "benchmark": b,
                **{k: m[k] for k in ("n", "em", "subem", "f1", "avg_searches")},
                **{
                    k: m.get(k)
                    for k in (
                        "degenerate_share",
                        "repeat_share",
                        "ungrounded_share",
                        "search_hit_rate",
                        "hit_searches_n",
                        "first_search_hit_rate",
                        "first_searches_n",
                        "question_hit_rate",
                        "hit_questions_n",
                        "em_open",
                        "open_n",
                        "read_em",
                        "found_open_n",
                        "query_answer_share",
                        "answered_open_n",
                    )
                },
            }
            for r, b, m in evals
        ],
        "paired": paired,
    }
    artifacts.write_manifest(
        stage,
        "report",
        config=asdict(cfg),
        inputs=[{"path": str(d)} for v in found.values() for d, _ in v],
        summary=summary,
    )
    return summary


def _plots(out: Path, rl_runs, evals, ledger) -> list[Path] | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    made = []

    def save(fig, name):
        p = out / name
        fig.tight_layout()
        fig.savefig(p, dpi=110)
        plt.close(fig)
        made.append(p)

    for d, mets in rl_runs:
        if not mets:
            continue
        steps = [m["step"] for m in mets]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        rewards = [m["reward_mean"] for m in mets]
        w = min(5, len(rewards))  # one step's batch is small: a moving average shows the trend
        smooth = [
            sum(rewards[max(0, i - w + 1) : i + 1]) / len(rewards[max(0, i - w + 1) : i + 1])
            for i in range(len(rewards))
        ]
        ax.plot(steps, rewards, alpha=0.35, color="C0", label="reward (batch mean)")
        ax.plot(steps, smooth, color="C0", label=f"reward ({w}-step average)")
        ax.plot(steps, [m["valid_answer_rate"] for m in mets], color="C1", label="valid-answer rate")
        ax.set_xlabel("step"), ax.set_ylim(-0.02, 1.02), ax.legend(), ax.set_title(f"RL {d.name}: reward")
        save(fig, f"{d.name}_reward.png")

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [m["noise_p"] for m in mets], label="planned p_i")
        ax.plot(steps, [m["noisy_share"] for m in mets], "o", ms=3, label="realised noisy share")
        ax.set_xlabel("step"), ax.set_ylim(-0.02, 1.02), ax.legend(), ax.set_title("noise curriculum")
        save(fig, f"{d.name}_noise.png")

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(steps, [m["searches_per_traj"] for m in mets])
        ax.set_xlabel("step"), ax.set_ylabel("searches / trajectory"), ax.set_title("search calls")
        save(fig, f"{d.name}_searches.png")

        if any("degenerate_share" in m for m in mets):  # runs from before these columns have no such plot
            fig, ax = plt.subplots(figsize=(6, 3.5))
            for key, label, style in (("degenerate_share", "degenerate queries", "C3"),
                                      ("repeat_share", "repeated queries", "C4"),
                                      ("ungrounded_share", "ungrounded queries", "C5"),
                                      ("search_hit_rate", "search-hit rate", "C2"),
                                      ("search_hit_rate_useful", "hit rate, useful mode", "C0--"),
                                      ("search_hit_rate_noisy", "hit rate, noisy mode", "C1--")):
                vals = [m.get(key) for m in mets]
                ax.plot(steps, [float("nan") if v is None else v for v in vals], style, marker="o", ms=3, label=label)
            ax.set_xlabel("step"), ax.set_ylim(-0.02, 1.02), ax.legend(fontsize=8)
            ax.set_title(f"RL {d.name}: search quality (the simulator's documents)")
            save(fig, f"{d.name}_search_quality.png")

    if evals:
        import numpy as np

        runs = list(dict.fromkeys(r for r, _, _ in evals))  # run order: base → warm start → RL
        benches = list(dict.fromkeys(b for _, b, _ in evals))
        fig, axes = plt.subplots(1, 3, figsize=(11, 3.5), sharey=True)
        for ax, metric in zip(axes, ("em", "subem", "f1")):
            x = np.arange(len(benches))
            w = 0.8 / max(len(runs), 1)
            for i, r in enumerate(runs):
                vals = [next((m[metric] for rr, b, m in evals if rr == r and b == bb), 0) for bb in benches]
                ax.bar(x + i * w, [100 * v for v in vals], w, label=r)
            ax.set_xticks(x + w * (len(runs) - 1) / 2, benches, rotation=20), ax.set_title(metric.upper())
        axes[0].set_ylabel("%"), axes[0].legend(fontsize=8)
        save(fig, "eval_before_after.png")

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.bar(["real calls", "simulated calls"], [ledger["real_calls"], ledger["simulated_calls"]], color=["C3", "C2"])
    # "\$": a bare pair of dollar signs would be read as matplotlib math
    ax.set_title(f"search calls (saved \\${ledger['cost_saved_usd']:.2f} at \\${ledger['price_per_1k_usd']:g}/1k)")
    save(fig, "search_cost.png")
    return made

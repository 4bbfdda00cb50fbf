"""Terminal output: a rich progress bar on a TTY, plain log lines otherwise, and result tables."""

from __future__ import annotations

import sys

from rich import box
from rich.console import Console, Group
from rich.progress import BarColumn, MofNCompleteColumn, Progress as RichProgress, TextColumn, TimeElapsedColumn
from rich.table import Table

from zsctl.core.progress import Progress

err = Console(stderr=True)
out = Console()


class RichBar(Progress):
    """Progress with a live bar (stderr), used only when stderr is a terminal and not --quiet."""

    def __init__(self):
        super().__init__()
        self._bar: RichProgress | None = None
        self._task = None

    def log(self, msg: str) -> None:
        (self._bar.console if self._bar else err).print(msg, markup=False, highlight=False)

    def start(self, desc: str, total: int) -> None:
        self.stop()
        self._bar = RichProgress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=err, transient=False,
        )
        self._bar.start()
        self._task = self._bar.add_task(desc, total=total)

    def advance(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.advance(self._task, n)

    def stop(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None


def make_progress(quiet: bool) -> Progress:
    if not quiet and sys.stderr.isatty():
        return RichBar()
    return Progress(quiet=quiet)


def _score_cells(m: dict) -> list[str]:
    """n, EM, SubEM, F1 (as %), searches per question, and the search quality (degenerate and
    repeated-query shares, search-hit and question-hit rates, %; '–' when there is nothing to count or
    an older run lacks them) of one metrics.json entry."""
    pct = lambda v: "–" if v is None or v != v else f"{100 * v:.1f}"  # noqa: E731 (v != v: NaN)
    return [str(m["n"]), f"{100 * m['em']:.1f}", f"{100 * m['subem']:.1f}", f"{100 * m['f1']:.1f}",
            f"{m['avg_searches']:.2f}", pct(m.get("degenerate_share")), pct(m.get("repeat_share")),
            pct(m.get("search_hit_rate")), pct(m.get("question_hit_rate"))]


# (header, what it means): short headers, so that report's run-and-benchmark table fits 80 columns
SCORE_COLUMNS = (
    ("n", ""), ("EM", ""), ("SubEM", ""), ("F1", ""),
    ("srch", "searches per question"),
    ("deg%", "queries that name nothing"),
    ("rep%", "queries repeating an earlier one of the same question"),
    ("hit%", "searches whose documents hold a gold answer"),
    ("qhit%", "questions one of whose searches found it (yes/no golds left out)"),
)


def _score_table(title: str, key: str) -> Table:
    # no vertical rules and one space between columns: 10 columns in 80 characters; numbers are never
    # cut (min_width: "100.0"), a long name folds instead
    t = Table(title=title or None, box=box.SIMPLE_HEAD, pad_edge=False, padding=(0, 0, 0, 1),
              caption="; ".join(f"{h}: {m}" for h, m in SCORE_COLUMNS if m))
    t.add_column(key, overflow="fold")
    for header, _ in SCORE_COLUMNS:
        t.add_column(header, justify="right", no_wrap=True, min_width=max(len(header), 3 if header == "n" else 5))
    return t


def metrics_table(metrics: dict, title: str = "") -> Table:
    """Per-benchmark n, EM, SubEM, F1 (%) and searches, plus the overall row for several benchmarks."""
    t = _score_table(title, "benchmark")
    rows = list(metrics.get("benchmarks", {}).items())
    if len(rows) != 1:
        rows.append(("overall", metrics["overall"]))
    for name, m in rows:
        t.add_row(name, *_score_cells(m))
    return t


def eval_table(rows: list[dict], title: str = "") -> Table:
    """`zsctl report`'s evaluations: a line with each run's name, then one row per benchmark under it."""
    t = _score_table(title, "run / benchmark")
    for i, r in enumerate(rows):
        if i == 0 or rows[i - 1]["run"] != r["run"]:
            t.add_row(r["run"], style="bold")
        t.add_row(f"  {r['benchmark']}", *_score_cells(r))
    return t


def paired_table(paired: list[dict]) -> Table:
    """`zsctl report`'s before → after differences on the same questions: a line naming the two runs,
    then one row per metric (%, the change in points with its 95 % bootstrap interval)."""
    t = Table(title="Before → after on the same questions (%)", box=box.SIMPLE_HEAD, pad_edge=False,
              padding=(0, 0, 0, 1), caption="interval: 95 %, paired bootstrap over the questions; one that holds 0 "
              "cannot tell the change from chance. won / lost: questions only the later / earlier run got exactly")
    t.add_column("runs / metric", overflow="fold")
    for header in ("before", "after", "change", "interval"):
        t.add_column(header, justify="right", no_wrap=True)
    for p in paired:
        t.add_row(f"{p['before']} → {p['after']}", style="bold")
        t.add_row("  questions in both", "", str(p["n"]), "", "")
        for label, key in (("EM", "em"), ("F1", "f1"), ("question-hit", "question_hit_rate"),
                           ("search-hit", "search_hit_rate")):
            m = p.get(key)
            if m:
                ci = "[{:+.1f}, {:+.1f}]".format(*(100 * v for v in m["ci95"])) if m["ci95"] else "–"
                t.add_row(f"  {label}", f"{100 * m['before']:.1f}", f"{100 * m['after']:.1f}",
                          f"{100 * m['diff']:+.1f}", ci)
        t.add_row("  EM won / lost", "", "", f"{p['em_won']} / {p['em_lost']}", "")
    return t


def kv_table(d: dict, title: str = "") -> Table:
    t = Table(title=title or None, show_header=False)
    t.add_column("key", style="bold")
    t.add_column("value")
    for k, v in d.items():
        t.add_row(str(k), str(v))
    return t


def render_inspect(info: dict) -> None:
    m = info["manifest"]
    keys = ("kind", "schema_version", "created_at", "zsctl_version", "git_commit", "seed", "config_hash")
    head = {k: m.get(k) for k in keys}
    out.print(kv_table(head, title=f"artifact {info['path']}"))
    if m.get("summary"):
        flat = {k: v for k, v in m["summary"].items() if not isinstance(v, (dict, list))}
        if flat:
            out.print(kv_table(flat, title="summary"))
    for name, t in info["tables"].items():
        out.print(kv_table(t["schema"], title=f"{name}: {t['rows']} rows"))
        if t["head"]:
            tab = Table(title=f"first {len(t['head'])} rows", show_lines=True)
            cols = list(t["head"][0])
            for c in cols:
                tab.add_column(c, overflow="fold")
            for r in t["head"]:
                tab.add_row(*[str(r[c]) for c in cols])
            out.print(tab)


def check_sim_table(summary: dict) -> Table:
    """check-sim's summary: has-answer share per mode (and of the real engine), format, length, diversity."""
    sim, real, held = summary["simulator"], summary.get("real"), summary["held_apart"]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    t = Table(title=f"check-sim: {sim['spec']} (n = {summary['n_queries']} held-apart queries, k={summary['k']})",
              min_width=76, caption_justify="left")
    columns = [("useful", sim["useful"]), ("noisy", sim["noisy"])] + ([("real", real)] if real else [])
    t.add_column("metric")
    for name, _ in columns:
        t.add_column(name, justify="right")
    t.add_row("has answer %", *[pct(m["has_answer"]) for _, m in columns])
    t.add_row("  95% interval (Wilson)", *["[{}, {}]".format(*map(pct, m["has_answer_ci95"])) for _, m in columns])
    t.add_row("leak %: query names nothing", pct(sim["leak"]["has_answer"]), "", *([""] if real else []))
    for key, label in [("format_valid", "format valid %"), ("mean_tries", "tries / reply"),
                       ("mean_doc_words", "words/doc"), ("distinct_1", "distinct-1"), ("distinct_2", "distinct-2")]:
        t.add_row(label, *[pct(m[key]) if key == "format_valid" else f"{m[key]:.2f}" for _, m in columns])
    lo, hi = sim["gap_ci95"]
    t.caption = (f"gap (useful - noisy has-answer): {pct(sim['controllability_gap'])} points, 95% interval "
                 f"[{pct(lo)}, {pct(hi)}] (Newcombe); format valid {pct(sim['format_valid'])}%; leak probes: "
                 f"{sim['leak']['n']}\ndropped: {held['excluded_trained']} trained on, "
                 f"{held['excluded_yes_no']} yes/no golds; "
                 f"trained questions: {held['trained_on']}")
    return t


_SFT_KEYS = ("out", "steps", "rows_train", "rows_val", "train_loss_first", "train_loss_last", "val_loss_before",
             "val_loss", "tokens_per_s", "train_s")
SUMMARY_KEYS = {  # what the key/value table of a stage's summary shows, in order
    "collect": ("out", "questions", "trajectories", "new_trajectories", "share_correct", "searches_per_trajectory",
                "degenerate_share", "repeat_share", "search_hit_rate", "trajectories_per_s", "engine_calls",
                "cache_hits", "estimated_cost_usd"),
    "build-sft": ("out", "kind", "mode", "trajectories", "search_calls", "duplicates", "yes_no", "no_answer_docs",
                  "degenerate_queries", "degenerate_synthesized", "labels_before", "labels_after", "rows_train",
                  "rows_val", "questions_train", "questions_val", "wall_s", "warning"),
    "train-sim": _SFT_KEYS,
    "warmup": _SFT_KEYS,
}


def summary_table(command: str, summary: dict, cfg) -> Table | Group | None:
    """The terminal table of a stage's summary (None: the stage shows none)."""
    from zsctl.core.errors import redact

    if command == "eval":
        return metrics_table(summary, title=redact(f"{cfg.model} + {cfg.search}"))
    if command == "report":
        rows, paired = summary["evaluation"], summary.get("paired")
        if not rows:
            return None
        table = eval_table(rows, "Evaluation with the real engine (scores in %)")
        return Group(table, paired_table(paired)) if paired else table
    if command == "check-sim":
        return check_sim_table(summary)
    short = lambda v: f"{v:.4g}" if isinstance(v, float) and abs(v) < 1e4 else v  # noqa: E731
    if command == "rl":  # rewards and rates to 4 significant digits, as below
        return kv_table({k: short(v) for k, v in summary.items() if not isinstance(v, dict)}, "rl")
    if command in ("train-sim", "warmup"):  # losses and rates to 4 significant digits
        return kv_table({k: short(summary.get(k)) for k in SUMMARY_KEYS[command]}, command)
    if command in SUMMARY_KEYS:
        flat = {**summary, **summary.get("ledger", {})}
        return kv_table({k: flat[k] for k in SUMMARY_KEYS[command] if k in flat}, command)
    return None

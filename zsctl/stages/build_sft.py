"""`zsctl build-sft`: logged real-search calls → supervised data for the simulator or the policy.

Output layout (train-sim and warmup read it through `zsctl.sft.load_sft_data`):
    OUT/train.parquet  OUT/val.parquet  OUT/manifest.json (written last)
Both files have one schema: SIM_SFT for kind "sim_sft" (default, `--for simulator`) or POLICY_SFT for
kind "policy_sft" (`--for policy`). val.parquet always exists (it may hold 0 rows). Rows are split by
question: a hash of the question text decides, so one question never lands in both files.

Simulator rows: `prompt` is the simulator template's text for the row's mode (`--sim-template`, else
the built-in one; the texts are recorded in the manifest) filled with the call's query, ITS OWN
trajectory's question and a gold answer; `completion` is real documents as `Doc i: (title) text`.
With a template that has a system message, `prompt` is the user turn: train-sim wraps it in the base
model's chat template, as the `sim:` engine will. Labels:
- docs (recommended): contrastive pairs from ONE logged call's top-N results (collect with --topk
  well above --docs, e.g. 10). The useful row's completion is the answer-holding documents first
  (metrics.docs_hold_answer, per document), filled up to k with the best-ranked others; the noisy
  row's is the k best-ranked documents WITHOUT the answer. Both prompts are the simulator template's
  text for their mode with the same query, question and k; only the useful one names the answer (the
  gold alias the documents hold). A call whose results hold no answer gives no pair. A degenerate
  query (metrics.is_degenerate_query) gives one noisy row of its answer-free results: the `sim:`
  engine writes such a query from the noisy prompt even in useful mode, so a search that names
  nothing earns nothing. Logged degenerate queries are rare (question-as-query data has none), so for
  a seeded share of the pairs (--degenerate-share) one more noisy row is written with a placeholder
  query (prompts.DEGENERATE_QUERIES) and that call's answer-free documents. With
  --pairs-per-search N > 1, a deep result list gives up to N pairs: pair i (i ≥ 1) is the i-th
  answer-holding document in front of the i-th window of k−1 answer-free ones (useful) against that
  window of k (noisy). With --search SPEC (a real engine), each bundled multi-hop question is also
  searched once with its supporting documents' entity names (supporting_entities), as deep as its
  logged searches went, and those results make pairs the same way (more queries per question; the
  question alone finds an answer-holding document for about a third of the training questions).
- answer: one row per call, useful when its documents hold a gold answer. Caveat: useful and noisy
  rows then come from DIFFERENT queries, so the model can learn query → documents rather than
  mode → documents; prefer docs.
- outcome: calls of trajectories that ended correct (em == 1) are useful, the others noisy. Needs
  trajectories of a policy that answers: question-as-query searches (collect --policy none) never
  answer, so all their calls would be noisy; they are counted and warned about (an error when
  nothing else is there).
- judge: an LLM (`--judge-model`) is asked whether the documents suffice (batched, yes vs no).
Yes/no golds (HotpotQA comparisons) are skipped by docs and answer and counted (`yes_no`): "no"
occurs in almost any text, so containment says nothing. Rows are distinct (query, completion)
pairs; for answer/outcome/judge the majority label is downsampled at random (seeded) to the size
of the minority (docs is balanced by its pairs and never downsampled: a random cut would split pairs;
its degenerate-query rows are noisy extras).

Policy rows: rejection sampling keeps the trajectories whose prediction reached `--min-f1` (default:
exact match) — prompt = the policy's chat-formatted prompt, completion = its own response with the
`<information>` blocks in place. `--templated` instead writes answer-grounded demonstrations around
real search calls (for policies that never answer right on their own): search turns, each with its
call's information block, then an answer turn; the thinking varies (several phrasings, picked per
question by a stable hash). Only calls whose documents hold a gold answer make demonstrations, and
never one with a degenerate query (metrics.is_degenerate_query). Without `--search`, each answer-
holding logged call makes one. With `--search SPEC` (a real engine): a question of the bundled
multi-hop benchmarks (their rows list supporting documents) is first tried with the documents'
entity names as queries — one entity the question names, or that entity then one its results name —
so the policy learns to search for named things; questions still without a demonstration use
their logged calls, then are searched once with the question itself as the query.

Inputs (comma-separated): trajectories artifact directories, or Parquet / JSONL files from other
tools (zsctl.core.readers); `em` is read for outcome labels and rejection sampling, `f1` for
`--min-f1`, `response` for rejection sampling.

Reading order: the config; `run` (setup, then `_build`: read → rows → balance → write); `Rows`, the
row makers, one method per kind of data; then the output and text helpers.

Memory stays flat as the input grows: the input is read in record batches; rows go straight to
temporary Parquet files; only a 64-bit hash per distinct pair and one byte per row stay in memory.
A second pass applies the balancing mask and writes the final files.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from array import array
from dataclasses import asdict, dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from zsctl.core import artifacts, data, metrics, prompts
from zsctl.core.config import DEFAULT_MODEL, Options, option
from zsctl.core.errors import BadInput
from zsctl.core.progress import Progress
from zsctl.core.readers import check_parquet, input_files, iter_trajectories, open_streaming
from zsctl.core.schemas import POLICY_SFT, SIM_SFT
from zsctl.judge import Judge
from zsctl.search.base import cut_words

LABELS = ("outcome", "answer", "judge", "docs")
TARGETS = ("simulator", "policy")
SPLIT_FILES = ("train.parquet", "val.parquet")
USEFUL, NOISY = 1, 0
Row = tuple[str, dict, int]  # (split file, row, label byte): what the row makers return


@dataclass(kw_only=True)
class BuildSFTConfig(Options):
    trajectories: str = option(help="DIR[,DIR...]: collect outputs, or .parquet / .jsonl trajectory files.")
    out: str = option(help="Output artifact directory.")
    target: str = option("simulator", "simulator (sim_sft) | policy (policy_sft).", flag="for", choices=TARGETS)
    label: str = option("outcome", "Simulator labels: docs (useful/noisy pair from one search's top-N; collect "
                        "with --topk 10) | outcome | answer | judge.", choices=LABELS)
    degenerate_share: float = option(0.15, "--label docs: extra noisy rows with a placeholder query and "
                                     "answer-free documents, as a share of the pairs.", ge=0, le=1)
    pairs_per_search: int = option(1, "--label docs: up to N pairs from one search's results (the i-th "
                                   "answer-holding document each; needs deep results, e.g. collect --topk 20).", ge=1)
    judge_model: str = option(DEFAULT_MODEL, "Model for --label judge.")
    judge_batch_size: int = option(16, "Prompts the judge scores together.", ge=1)
    balance: bool = option(True, "Downsample the larger label class (seeded; --label docs is balanced by "
                           "its pairs).")
    val_fraction: float = option(0.1, "Share of questions in val.parquet.", ge=0, lt=1)
    docs: int = option(3, "Top-K documents per simulator completion.", flag="topk", aliases=("docs",), ge=1)
    doc_words: int = option(80, "Each document cut to this many words (the agent loop's default).",
                            flag="max-doc-words", aliases=("doc-words",), ge=1)
    min_f1: float | None = option(None, "Policy: keep trajectories with F1 >= X (default: exact match).", ge=0, le=1)
    templated: bool = option(False, "Policy: answer-grounded demonstrations from logged calls whose documents "
                             "hold a gold answer.")
    policy: str = option(DEFAULT_MODEL, "Policy whose chat template renders the prompts (--for policy).")
    search: str | None = option(None, "A real engine (bm25:PATH, http://...). With --templated: multi-hop "
                                "questions' supporting entities, then each question no logged call answered, are "
                                "searched. With --label docs: each bundled multi-hop question's supporting entities "
                                "are searched (as deep as its logged searches) and make pairs too.")
    search_topk: int = option(3, "--templated: documents per search of --search.", ge=1)
    sim_template: str | None = option(None, prompts.SIM_TEMPLATE_HELP + " Simulator data only; recorded in the "
                                      "manifest, then by train-sim in the simulator's, whose sim: engine uses it.")
    seed: int = option(0, "Random seed.", ge=0)
    read_batch: int = option(2048, "Trajectories read per record batch.", ge=1)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.search and not ((self.target == "policy" and self.templated)
                                or (self.target == "simulator" and self.label == "docs")):
            raise BadInput("--search is only used with --for policy --templated or --label docs; drop it")
        if self.sim_template and self.target != "simulator":
            raise BadInput("--sim-template shapes simulator prompts; drop it with --for policy")


# --- the run --------------------------------------------------------------------------------------


def needed_columns(cfg: BuildSFTConfig) -> list[str]:
    cols = ["question", "golden_answers"]
    if cfg.target == "simulator":
        cols += ["searches"] + (["em"] if cfg.label == "outcome" else [])
    elif cfg.templated:
        cols += ["searches"]
    else:
        cols += ["response", "em" if cfg.min_f1 is None else "f1"]
    return cols


def run(cfg: BuildSFTConfig, progress: Progress | None = None) -> dict:
    progress = progress or Progress()
    files = input_files(cfg.trajectories)
    out = artifacts.check_out(cfg.out, _kind(cfg), [cfg.trajectories, cfg.policy, cfg.judge_model, cfg.search])
    cols = needed_columns(cfg)
    for f in files:
        if f.suffix == ".parquet":
            check_parquet(f, cols)
    # Setup (models) before any output, so bad specs never touch --out.
    policy_tok = judge = engine = None
    if cfg.target == "policy":
        from zsctl.core.models import load_tokenizer

        policy_tok = load_tokenizer(cfg.policy)
    if cfg.target == "simulator" and cfg.label == "judge":
        judge = Judge(cfg.judge_model, cfg.judge_batch_size)
    template = prompts.load_template(cfg.sim_template, prompts.SIMULATOR_TEMPLATE)
    if cfg.search:
        from zsctl.search import make_engine

        engine = make_engine(cfg.search)

    work = artifacts.sibling(out, "build-sft")  # named so that a later run removes it after a kill
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _build(cfg, files, cols, out, work, Rows(cfg, policy_tok, judge, engine, template), progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if engine is not None:
            engine.close()


def _build(cfg, files, cols, out: Path, work: Path, rows: Rows, progress) -> dict:
    t0 = time.perf_counter()
    schema = SIM_SFT if cfg.target == "simulator" else POLICY_SFT
    writer = SplitWriter(work, schema)
    stats = rows.stats
    total = sum(pq.ParquetFile(f).metadata.num_rows for f in files if f.suffix == ".parquet")
    progress.log(f"build-sft: reading {len(files)} input file(s)")
    progress.start("build-sft", total)
    read_batch = min(cfg.read_batch, 64) if rows.judge is not None else cfg.read_batch  # judging is slow: report often
    try:
        for f in files:
            for batch in iter_trajectories(f, cols, read_batch):
                stats["trajectories"] += len(batch)
                stats["no_gold_trajectories"] += sum(1 for t in batch if not golds_of(t))
                writer.write(rows.of(batch))
                progress.advance(len(batch))
        if rows.engine is not None and cfg.target == "policy":
            writer.write(rows.question_searches(progress))
    finally:
        writer.close()
        progress.stop()
    rows.seen.clear()  # the pair hashes are not needed past here

    counts = {name: len(writer.labels[name]) for name in SPLIT_FILES}
    if stats["trajectories"] == 0:
        raise BadInput(f"no trajectories in {', '.join(map(str, files))}; run zsctl collect first")
    if stats["no_gold_trajectories"] == stats["trajectories"]:  # the data's fault, not the search engine's
        raise BadInput(f"no trajectory in {', '.join(map(str, files))} has a gold answer (golden_answers null or "
                       f"empty in all {stats['trajectories']}); nothing can be labelled without them: add the answers")
    keep, label_counts = _balance(cfg, writer.labels, stats)
    if sum(counts.values()) == 0:
        raise BadInput(_empty_message(cfg, stats))

    # Everything checked: only now is anything written, beside --out; the old artifact there stays
    # valid until this one is whole.
    with artifacts.staging(out) as stage:
        rows_out = {}
        offset = 0
        for name in SPLIT_FILES:
            rows_out[name] = _copy_masked(work / name, stage, name, schema, keep, offset)
            offset += counts[name]
        summary = {
            "out": str(out),
            "kind": _kind(cfg),
            "mode": _mode(cfg),
            **stats,
            "rows_train": rows_out["train.parquet"][0],
            "rows_val": rows_out["val.parquet"][0],
            "questions_train": rows_out["train.parquet"][1],
            "questions_val": rows_out["val.parquet"][1],
            **label_counts,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        if rows.judge is not None:
            summary["judge_calls"] = rows.judge.calls
        if stats.get("question_as_query"):
            summary["warning"] = (f"{stats['question_as_query']} trajectories are question-as-query searches that "
                                  "never answer: --label outcome made all their calls noisy; --label docs suits them")
            progress.log(f"build-sft: warning: {summary['warning']}")
        artifacts.write_manifest(
            stage, _kind(cfg), config=asdict(cfg),
            inputs=[artifacts.input_ref(p.parent if p.name == "trajectories.parquet" else p) for p in files],
            summary=summary, seed=cfg.seed,
            extra={"layout": {"train": "train.parquet", "val": "val.parquet"}, "mode": _mode(cfg),
                   **({"sim_template": rows.template.as_dict()} if cfg.target == "simulator" else {})},
        )
    progress.log(f"build-sft: {summary['rows_train']} train / {summary['rows_val']} val rows in {summary['wall_s']} s")
    return summary


# --- rows ------------------------------------------------------------------------------------------


class Rows:
    """The row makers of one run: each turns trajectories into `Row`s, counting what it skipped in
    `stats` and keeping only pairs no earlier row had (`seen`: 64-bit hashes)."""

    def __init__(self, cfg: BuildSFTConfig, policy_tok=None, judge: Judge | None = None, engine=None,
                 template: prompts.SimTemplate = prompts.SIMULATOR_TEMPLATE):
        self.cfg, self.policy_tok, self.judge, self.engine = cfg, policy_tok, judge, engine
        self.template = template  # simulator prompts
        self.seen: set[int] = set()
        # --templated --search: question hash → the trajectory still to serve (None once served)
        self.unserved: dict[int, dict | None] = {}
        self.stats = {"trajectories": 0, "no_gold_trajectories": 0, "search_calls": 0, "duplicates": 0,
                      "no_documents": 0, "no_gold": 0, "not_selected": 0}
        if engine is not None and cfg.target == "policy":
            self.stats["question_searches"] = 0
        if cfg.target == "simulator":
            self.stats.update({"outcome": {"question_as_query": 0}, "answer": {"yes_no": 0},
                               "docs": {"yes_no": 0, "no_answer_docs": 0, "no_answer_free_docs": 0,
                                        "degenerate_queries": 0, "degenerate_synthesized": 0,
                                        "entity_searches": 0}}.get(cfg.label, {}))

    def of(self, batch: list[dict]) -> list[Row]:
        """The rows of one batch of trajectories, by what the config asks for."""
        cfg = self.cfg
        if cfg.target == "policy":
            return self.demonstrations(batch) if cfg.templated else self.rejection_sampled(batch)
        if cfg.label == "docs":
            return self.doc_pairs(batch) + (self.entity_pairs(batch) if self.engine else [])
        return self.labelled_calls(batch)

    def _new(self, key: int) -> bool:
        """Whether a pair is new (then it is remembered); a repeat is counted."""
        if key in self.seen:
            self.stats["duplicates"] += 1
            return False
        self.seen.add(key)
        return True

    # --- simulator data ----------------------------------------------------------------------------

    def labelled_calls(self, batch: list[dict]) -> list[Row]:
        """`--label outcome | answer | judge`: one row per logged call, labelled useful or noisy."""
        cfg, stats = self.cfg, self.stats
        calls = []  # (trajectory, search index, query, docs, completion)
        for t in batch:
            searches = t.get("searches") or []
            stats["search_calls"] += len(searches)
            if not golds_of(t):
                stats["no_gold"] += len(searches)
                continue
            if cfg.label == "answer" and metrics.yes_no(golds_of(t)):
                stats["yes_no"] += len(searches)
                continue
            if cfg.label == "outcome" and _question_as_query(t):
                stats["question_as_query"] += 1
            for j, s in enumerate(searches):
                docs = clean_docs(s.get("documents"), cfg.doc_words)[: cfg.docs]
                query = (s.get("query") or "").strip()
                if not docs or not query:
                    stats["no_documents"] += 1
                    continue
                completion = prompts.format_documents(docs)
                if self._new(h64(query, completion)):
                    calls.append((t, j, query, docs, completion))
        if not calls:
            return []
        if cfg.label == "outcome":
            useful = [float(t.get("em") or 0.0) >= 1.0 for t, *_ in calls]
        elif cfg.label == "answer":
            useful = [metrics.docs_hold_answer(docs, golds_of(t)) for t, _, _, docs, _ in calls]
        else:
            useful = self.judge([(t["question"], golds_of(t)[0], completion) for t, _, _, _, completion in calls])
        rows = []
        for (t, j, query, docs, completion), ok in zip(calls, useful):
            label = "useful" if ok else "noisy"
            # this call's own trajectory: never a neighbour's question or answer
            row = _sim_row(t, f"{t['traj_id']}#{j}", query, golds_of(t)[0], label, docs, self.template)
            rows.append((self.split(t), row, USEFUL if ok else NOISY))
        return rows

    def doc_pairs(self, batch: list[dict]) -> list[Row]:
        """`--label docs`: a useful and a noisy row from ONE logged call (see the module docstring)."""
        cfg, stats = self.cfg, self.stats
        rows = []
        for t in batch:
            searches = t.get("searches") or []
            stats["search_calls"] += len(searches)
            golds = golds_of(t)
            if not golds:
                stats["no_gold"] += len(searches)
                continue
            if metrics.yes_no(golds):
                stats["yes_no"] += len(searches)
                continue
            for j, s in enumerate(searches):
                query = (s.get("query") or "").strip()
                docs = clean_docs(s.get("documents"), cfg.doc_words)  # all N results: the pair picks from them
                if not docs or not query:
                    stats["no_documents"] += 1
                    continue
                hits = [metrics.docs_hold_answer([d], golds) for d in docs]
                answer_free = [d for d, h in zip(docs, hits) if not h]
                k = min(cfg.docs, len(answer_free))
                if k == 0:
                    stats["no_answer_free_docs"] += 1
                    continue
                row_id = f"{t['traj_id']}#{j}"
                if metrics.is_degenerate_query(query):
                    # a bad query's real results, minus any answer they hold by chance, as a noisy row only
                    stats["degenerate_queries"] += 1
                    rows += self.pair(t, row_id, query, golds[0], None, answer_free[:k])
                    continue
                if not any(hits):
                    stats["no_answer_docs"] += 1
                    continue
                holding = [d for d, h in zip(docs, hits) if h]
                ranked = holding + answer_free  # answer-holding first, rank order kept
                rows += self.pair(t, row_id, query, _held_gold(ranked[:k], golds), ranked[:k], answer_free[:k])
                # --pairs-per-search: the next answer-holding results, each with its own window of answer-free
                # ones (deep result lists hold several; each pair is another pair of distinct completions)
                for i in range(1, min(cfg.pairs_per_search, len(holding))):
                    window = answer_free[i * k:(i + 1) * k]
                    if len(window) < k:
                        break
                    useful = [holding[i]] + window[: k - 1]
                    rows += self.pair(t, f"{row_id}.{i}", query, _held_gold(useful, golds), useful, window)
                if h64(str(cfg.seed), row_id) / 2**64 < cfg.degenerate_share:
                    placeholder = prompts.DEGENERATE_QUERIES[h64(row_id) % len(prompts.DEGENERATE_QUERIES)]
                    stats["degenerate_synthesized"] += 1
                    rows += self.pair(t, f"{row_id}~", placeholder, golds[0], None, answer_free[:k])
        return rows

    def entity_pairs(self, batch: list[dict]) -> list[Row]:
        """`--label docs --search SPEC`: each question of a bundled multi-hop benchmark is also searched,
        once, on that real engine with the entity names of its supporting documents (supporting_entities)
        as queries, as deep as its logged searches went; their results make pairs like logged calls. The
        hop whose documents hold the answer gives a pair; the others usually give none."""
        todo: dict[int, list[tuple[dict, int, str]]] = {}  # depth → (trajectory, entity index, entity)
        for t in batch:
            key = h64("entity searches", " ".join(t["question"].split()).lower())
            if key in self.seen or not golds_of(t) or metrics.yes_no(golds_of(t)):
                continue
            self.seen.add(key)
            searches = t.get("searches") or []
            logged = {" ".join((s.get("query") or "").split()).lower() for s in searches}
            depth = max([len(s.get("documents") or []) for s in searches] + [self.cfg.docs + 1])
            for i, entity in enumerate(supporting_entities(t["question"])):
                if entity.lower() not in logged:
                    todo.setdefault(depth, []).append((t, i, entity))
        rows = []
        for depth, items in todo.items():
            for start in range(0, len(items), 64):
                chunk = items[start:start + 64]
                for (t, i, entity), r in zip(chunk, self.engine.search([e for _, _, e in chunk], depth)):
                    self.stats["entity_searches"] += 1
                    searched = {**t, "traj_id": f"{t['traj_id']}@{i}",
                                "searches": [{"query": entity, "documents": [d.as_dict() for d in r.docs]}]}
                    rows += self.doc_pairs([searched])
        return rows

    def pair(self, t: dict, row_id: str, query: str, gold: str, useful_docs: list[dict] | None,
             noisy_docs: list[dict]) -> list[Row]:
        """The useful and the noisy row of one call (only the noisy one when `useful_docs` is None: a
        degenerate query), or none when an earlier call gave the same pair."""
        if not self._new(h64(query, t["question"], prompts.format_documents(useful_docs or []),
                             prompts.format_documents(noisy_docs))):
            return []
        split = self.split(t)  # by question: both rows of a pair land in the same file
        noisy = (split, _sim_row(t, f"{row_id}:n", query, gold, "noisy", noisy_docs, self.template), NOISY)
        if useful_docs is None:
            return [noisy]
        return [(split, _sim_row(t, f"{row_id}:u", query, gold, "useful", useful_docs, self.template), USEFUL),
                noisy]

    # --- policy data -------------------------------------------------------------------------------

    def rejection_sampled(self, batch: list[dict]) -> list[Row]:
        """The policy's own responses that reached exact match (or `--min-f1`)."""
        cfg, stats = self.cfg, self.stats
        rows = []
        for t in batch:
            ok = float(t.get("em") or 0.0) >= 1.0 if cfg.min_f1 is None else float(t.get("f1") or 0.0) >= cfg.min_f1
            response = t.get("response") or ""
            if not ok or not response.strip():
                stats["not_selected"] += 1
                continue
            if not self._new(h64(t["question"], response)):
                continue
            row = {
                "id": str(t["traj_id"]),
                "prompt": prompts.render_policy_prompt(self.policy_tok, t["question"]),
                "completion": response,
                "question": t["question"],
                "golden_answers": list(t.get("golden_answers") or []),
                "source_traj_id": str(t["traj_id"]),
            }
            rows.append((self.split(t), row, USEFUL))
        return rows

    def demonstrations(self, batch: list[dict]) -> list[Row]:
        """`--templated`: one demonstration per logged call whose documents hold a gold answer and whose
        query names something. With --search, questions with supporting documents wait for entity
        searches (question_searches), and so do questions no logged call served."""
        rows = []
        for t in batch:
            searches = t.get("searches") or []
            self.stats["search_calls"] += len(searches)
            calls = [(f"{t['traj_id']}#{j}", [(s.get("query"), s.get("documents"))]) for j, s in enumerate(searches)]
            if self.engine is None:
                rows += self.demos(t, calls)
                continue
            qkey = h64(" ".join(t["question"].split()))
            titles = supporting_entities(t["question"])
            if titles:  # its logged calls are the fallback should no entity search hold the answer
                entry = self.unserved.setdefault(qkey, _pending(t, titles))
                entry["calls"] += calls
            else:
                made = self.demos(t, calls)
                rows += made
                if made:
                    self.unserved[qkey] = None
                    continue
                if self.unserved.get(qkey, 0) is None:  # an earlier trajectory of the question served it
                    continue
                entry = self.unserved.setdefault(qkey, _pending(t, []))
            # searched before with the question itself as the query: the same search would find nothing new
            question = metrics.normalize_answer(t["question"])
            entry["asked"] = entry["asked"] or any(metrics.normalize_answer(s.get("query")) == question
                                                   for s in searches)
        return rows

    def question_searches(self, progress: Progress) -> list[Row]:
        """--templated --search, after every trajectory was read. Questions with supporting documents
        first: each supporting entity is searched once on the real engine and a chain that reaches the
        answer becomes the demonstration (the small model learns to search for named things); failing
        that, the question's logged calls. Every question still without a demonstration is then
        searched once with the question itself as the query, and answer-holding results become
        demonstrations the same way."""
        stats = self.stats
        todo = [t for t in self.unserved.values() if t is not None]
        titled = [t for t in todo if t["titles"]]
        names = list(dict.fromkeys(q for t in titled for q in t["titles"]))
        results = dict(zip(names, self.search_all(names)))
        stats["entity_searches"] = len(names)
        rows, rest = [], [t for t in todo if not t["titles"] and not t["asked"]]
        for t in titled:
            chain = self.entity_chain(t, results)
            made = self.demos(t, [(f"{t['traj_id']}#e", chain)]) if chain else []
            stats["entity_demos"] = stats.get("entity_demos", 0) + len(made)
            made = made or self.demos(t, t["calls"])
            rows += made
            if not made and not t["asked"]:
                rest.append(t)
        progress.log(f"build-sft: {len(names)} entity searches for {len(titled)} multi-hop question(s); "
                     f"searching {len(rest)} question(s) that still have no demonstration")
        queries = [" ".join(t["question"].split()) for t in rest]
        for t, query, docs in zip(rest, queries, self.search_all(queries)):
            stats["question_searches"] += 1
            rows += self.demos(t, [(f"{t['traj_id']}#q", [(query, docs)])])
        return rows

    def demos(self, t: dict, calls: list) -> list[Row]:
        """The demonstrations of several candidate chains (row id, [(query, documents), ...])."""
        rows = (self.demo(t, row_id, chain) for row_id, chain in calls)
        return [r for r in rows if r]

    def demo(self, t: dict, row_id: str, chain: list) -> Row | None:
        """The demonstration built on a chain of real search calls — one search turn and information
        block per call, then the answer — or None when the last call's documents hold no gold answer,
        a query names nothing (metrics.is_degenerate_query), or it repeats an earlier demonstration."""
        cfg, stats = self.cfg, self.stats
        steps = [((q or "").strip(), clean_docs(docs, cfg.doc_words)[: cfg.docs]) for q, docs in chain]
        if any(metrics.is_degenerate_query(q) for q, _ in steps):
            stats["degenerate_query"] = stats.get("degenerate_query", 0) + 1
            return None
        answer = metrics.find_answer([d["text"] for _, docs in steps for d in docs], golds_of(t))
        if answer is None:
            stats["not_selected"] += 1
            return None
        question = " ".join(t["question"].split())
        asked = set(metrics.content_words(question))
        completion = ""
        for hop, (query, docs) in enumerate(steps):
            if metrics.normalize_answer(query) == metrics.normalize_answer(question):
                options = prompts.DEMO_THINK_QUESTION
            elif not hop:
                options = prompts.DEMO_THINK_TOPIC
            else:  # a name the question gives, or one the results gave
                named = set(metrics.content_words(query)) <= asked
                options = prompts.DEMO_THINK_ALSO if named else prompts.DEMO_THINK_NEXT
            think = _phrase(options, question, hop).format(topic=query)
            completion += prompts.DEMO_SEARCH_TURN.format(think=think, query=query) + prompts.information_block(docs)
        answer = answer.strip()
        think = _phrase(prompts.DEMO_THINK_ANSWER, question, len(steps)).format(answer=answer)
        completion += prompts.DEMO_ANSWER_TURN.format(think=think, answer=answer)
        if not self._new(h64(t["question"], completion)):
            return None
        row = {
            "id": row_id,
            "prompt": prompts.render_policy_prompt(self.policy_tok, t["question"]),
            "completion": completion,
            "question": t["question"],
            "golden_answers": list(t.get("golden_answers") or []),
            "source_traj_id": str(t["traj_id"]),
        }
        return self.split(t), row, USEFUL

    def entity_chain(self, entry: dict, results: dict) -> list | None:
        """The search chain an agent could follow from the question alone, or None. In order: one
        entity the question names whose documents hold a gold answer; that entity, then a name its
        documents give whose documents hold it (bridge questions); two entities the question names, one
        of them the answer (comparisons: both are looked up, in an order fixed per question). A query
        that is itself the answer never counts as finding it alone."""
        cfg = self.cfg
        golds = golds_of(entry)
        asked = set(metrics.content_words(entry["question"]))
        docs = {q: clean_docs(results[q], cfg.doc_words)[: cfg.docs] for q in entry["titles"]}

        def holds(q):
            return metrics.find_answer([d["text"] for d in docs[q]], golds) is not None

        def is_answer(q):
            return metrics.find_answer([q], golds) is not None

        named = [q for q in entry["titles"] if set(metrics.content_words(q)) <= asked]
        for q in named:
            if holds(q) and not is_answer(q):
                return [(q, docs[q])]
        for first in named:
            if is_answer(first):
                continue
            shown = " " + " | ".join(metrics.normalize_answer(f"{d['title']} {d['text']}") for d in docs[first]) + " "
            for second in entry["titles"]:
                if second != first and holds(second) and not is_answer(second) \
                        and f" {metrics.normalize_answer(second)} " in shown:
                    return [(first, docs[first]), (second, docs[second])]
        answers, others = [q for q in named if is_answer(q)], [q for q in named if not is_answer(q)]
        if answers and others:
            pair = [(others[0], docs[others[0]]), (answers[0], docs[answers[0]])]
            return pair[::-1] if h64(entry["question"], "order") % 2 else pair
        return None

    def search_all(self, queries: list[str]) -> list[list[dict]]:
        out = []
        for i in range(0, len(queries), 64):
            results = self.engine.search(queries[i : i + 64], self.cfg.search_topk)
            out += [[d.as_dict() for d in r.docs] for r in results]
        return out

    def split(self, t: dict) -> str:
        if "_split" not in t:  # once per trajectory, not per call
            t["_split"] = "val.parquet" if is_val(t["question"], self.cfg.val_fraction) else "train.parquet"
        return t["_split"]


# --- output ---------------------------------------------------------------------------------------


class SplitWriter:
    """Rows of one schema into train/val Parquet files, with one label byte per row kept in memory."""

    def __init__(self, folder: Path, schema: pa.Schema):
        self.schema = schema
        self.writers = {name: pq.ParquetWriter(folder / name, schema) for name in SPLIT_FILES}
        self.labels = {name: array("b") for name in SPLIT_FILES}

    def write(self, rows: list[Row]) -> None:
        """rows: (split file, row, label)."""
        for name in SPLIT_FILES:
            part = [r for s, r, _ in rows if s == name]
            if part:
                self.writers[name].write_table(pa.Table.from_pylist(part, schema=self.schema))
                self.labels[name].extend(lab for s, _, lab in rows if s == name)

    def close(self) -> None:
        for w in self.writers.values():
            w.close()


def _kind(cfg) -> str:
    return "sim_sft" if cfg.target == "simulator" else "policy_sft"


def _mode(cfg) -> str:
    if cfg.target == "simulator":
        return f"label:{cfg.label}"
    if cfg.templated:
        return "templated+question-search" if cfg.search else "templated"
    return "rejection:em" if cfg.min_f1 is None else f"rejection:f1>={cfg.min_f1}"


def _balance(cfg, labels: dict[str, array], stats: dict) -> tuple[object, dict]:
    """Keep-mask over all rows (train rows first, then val) and the label counts before/after."""
    import numpy as np

    lab = np.concatenate([np.frombuffer(labels[n], dtype=np.int8) if len(labels[n]) else np.zeros(0, np.int8)
                          for n in SPLIT_FILES])
    keep = np.ones(len(lab), dtype=bool)
    if cfg.target != "simulator":
        return keep, {}
    before = {"useful": int((lab == USEFUL).sum()), "noisy": int((lab == NOISY).sum())}
    if len(lab) and (before["useful"] == 0 or before["noisy"] == 0):
        raise BadInput(_one_class_message(cfg, before, stats))
    if cfg.balance and cfg.label != "docs":
        minority = USEFUL if before["useful"] <= before["noisy"] else NOISY
        majority_idx = np.flatnonzero(lab != minority)
        n_min = before["useful"] if minority == USEFUL else before["noisy"]
        drop = np.random.default_rng(cfg.seed).choice(majority_idx, len(majority_idx) - n_min, replace=False)
        keep[drop] = False
    after = {"useful": int((keep & (lab == USEFUL)).sum()), "noisy": int((keep & (lab == NOISY)).sum())}
    return keep, {"labels_before": before, "labels_after": after}


def _one_class_message(cfg, before: dict, stats: dict) -> str:
    fix = {
        "outcome": "collect with --samples > 1 and --temperature > 0 so some trajectories end correct and some "
                   "wrong, or try --label docs",
        "answer": "try --label docs, or collect more questions",
        "judge": "try another --judge-model or --label docs",
        "docs": "collect more questions",  # pairs always hold both; kept for completeness
    }[cfg.label]
    if cfg.label == "outcome" and stats.get("question_as_query"):
        fix = (f"{stats['question_as_query']} trajectories are question-as-query searches (collect --policy none), "
               "which never answer; use --label docs for them")
    return (f"--label {cfg.label} gave {before['useful']} useful and {before['noisy']} noisy search calls; "
            f"the simulator needs both: {fix}")


def _empty_message(cfg, stats: dict) -> str:
    if cfg.target == "simulator" and cfg.label == "docs":
        return (f"no search call gave a useful/noisy pair among {stats['trajectories']} trajectories "
                f"({stats['search_calls']} calls: {stats['no_answer_docs']} without an answer-holding document, "
                f"{stats['no_answer_free_docs']} without an answer-free one, {stats['yes_no']} with yes/no golds); "
                "collect with a deeper --topk (e.g. 10) on a corpus that holds the answers")
    if cfg.target == "simulator":
        return (f"no usable search calls among {stats['trajectories']} trajectories ({stats['search_calls']} calls, "
                f"{stats['no_documents']} without documents); collect with a real engine, e.g. --search bm25:PATH")
    if cfg.templated:
        fix = "try other questions or another engine" if cfg.search else \
            "add --search SPEC to search each question on a real engine, or collect more questions"
        return (f"no search call's documents contain a gold answer ({stats['search_calls']} logged calls, "
                f"{stats.get('question_searches', 0)} question searches); {fix}")
    need = "exact match" if cfg.min_f1 is None else f"f1 >= {cfg.min_f1}"
    return (f"no trajectory reached {need} ({stats['trajectories']} read); lower --min-f1, "
            "collect with --samples > 1, or use --templated")


def _copy_masked(src: Path, out: Path, name: str, schema: pa.Schema, keep, offset: int) -> tuple[int, int]:
    """Second pass: stream the temp file, keep the rows the balancing mask keeps, write atomically.
    Returns (rows, distinct questions) written."""
    tmp = out / f".{name}.tmp-build-sft"
    n, questions = 0, set()
    with pq.ParquetWriter(tmp, schema) as w:
        pos = offset
        for rb in open_streaming(src).iter_batches(batch_size=8192):
            mask = pa.array(keep[pos : pos + rb.num_rows])
            pos += rb.num_rows
            kept = rb.filter(mask)
            if kept.num_rows:
                w.write_batch(kept)
                n += kept.num_rows
                questions.update(h64(q) for q in kept.column("question").to_pylist())
    tmp.replace(out / name)
    return n, len(questions)


# --- helpers --------------------------------------------------------------------------------------


def h64(*parts: str) -> int:
    """A stable 64-bit hash (unlike the salted built-in hash())."""
    return int.from_bytes(hashlib.blake2b("\x1f".join(parts).encode(), digest_size=8).digest(), "big")


def is_val(question: str, fraction: float) -> bool:
    return h64(" ".join(question.split()).lower()) / 2**64 < fraction


def clean_docs(docs: list[dict], words: int) -> list[dict]:
    """Documents with text, each cut to `words` words by the agent loop's rule (search.base.cut_words)."""
    out = []
    for d in docs or []:
        text = cut_words(d.get("text") or "", words)
        if text.strip():
            out.append({"title": d.get("title") or "", "text": text})
    return out


def golds_of(t: dict) -> list[str]:
    return [g for g in (t.get("golden_answers") or []) if g and g.strip()]


def _question_as_query(t: dict) -> bool:
    """A trajectory whose every search is its own question (collect --policy none): it never answers."""
    question = " ".join(t["question"].split())
    searches = t.get("searches") or []
    return bool(searches) and all(" ".join((s.get("query") or "").split()) == question for s in searches)


def _held_gold(docs: list[dict], golds: list[str]) -> str:
    """The gold alias the documents hold, for the prompt: the simulator learns to write what it is given."""
    return metrics.find_answer([x for d in docs for x in (d["title"], d["text"])], golds) or golds[0]


def _sim_row(t: dict, row_id: str, query: str, gold: str, label: str, docs: list[dict],
             template: prompts.SimTemplate) -> dict:
    return {
        "id": row_id,
        "prompt": prompts.render_simulator_prompt(query, t["question"], gold, label, k=len(docs), template=template),
        "completion": prompts.format_documents(docs),
        "label": label,
        "query": query,
        "question": t["question"],
        "golden_answer": gold,
        "source_traj_id": str(t["traj_id"]),
    }


def _pending(t: dict, titles: list[str]) -> dict:
    return {"traj_id": t["traj_id"], "question": t["question"], "golden_answers": t.get("golden_answers"),
            "titles": titles, "calls": [], "asked": False}


def _phrase(options: tuple[str, ...], question: str, turn: int) -> str:
    """One of the phrasings, the same for the same question and turn on every run and machine."""
    return options[h64(question, "think", str(turn)) % len(options)]


def supporting_entities(question: str) -> list[str]:
    """The entity names of a bundled multi-hop question's supporting documents ([] for others)."""
    names = (d.entity for d in data.supporting_docs(question))
    return list(dict.fromkeys(n for n in names if not metrics.is_degenerate_query(n)))

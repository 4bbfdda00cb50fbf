"""Question loaders: bundled benchmark samples, FlashRAG jsonl files, ZeroSearch / Search-R1 parquet.

Every loader returns a table with the QUESTIONS schema (id, question, golden_answers, data_source).

Bundled benchmarks are split once, deterministically, into a part for the training stages (collect,
rl) and a part for evaluation, so the demo never evaluates on questions it trained on. A question's
side depends only on a SHA-256 of (data_source, id): it does not move when rows are added, removed or
reordered, and it is the same on every machine and Python version (unlike the salted hash()).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from zsctl.core.errors import BadInput
from zsctl.core.metrics import normalize_answer
from zsctl.core.schemas import QUESTION_PROMPT, QUESTIONS

BENCHMARKS = ("nq", "triviaqa", "popqa", "hotpotqa", "2wikimultihopqa", "musique", "bamboogle")
SPLITS = ("train", "eval")
EVAL_FRACTION = 0.5
# Bamboogle (125 questions) is a test-only set in the literature: never train on it.
EVAL_ONLY = frozenset({"bamboogle"})
# Benchmark questions are a sentence or two; a longer one is a mistake (or hostile) and would make
# every stage allocate without bound for its prompt.
MAX_QUESTION_CHARS = 4000


def data_dir() -> Path:
    """The bundled data folder: <repo>/data, or $ZSCTL_DATA_DIR when set."""
    env = os.environ.get("ZSCTL_DATA_DIR")
    return Path(env) if env else Path(__file__).parents[2] / "data"


def split_of(data_source: str, qid: str) -> str:
    """'train' or 'eval' for one question; the same answer everywhere, every time."""
    if data_source in EVAL_ONLY:
        return "eval"
    digest = hashlib.sha256(f"{data_source}\x1f{qid}".encode()).digest()
    return "eval" if int.from_bytes(digest[:8], "big") / 2**64 < EVAL_FRACTION else "train"


def load_questions(spec: str | os.PathLike, split: str | None = None, limit: int | None = None) -> pa.Table:
    """Questions of one bench name or file, optionally one split of them, the first `limit` in file order.

    `spec` is a bench name from BENCHMARKS or a path to a FlashRAG .jsonl or a ZeroSearch/Search-R1
    .parquet file. Comma-separated lists are the caller's business. `split` (None, 'train', 'eval')
    uses split_of() for files as well as bench names. Bad input raises BadInput naming the file.
    """
    if split not in (None, *SPLITS):
        raise BadInput(f"split '{split}' is not one of train, eval (or none for all questions)")
    if limit is not None and limit < 0:
        raise BadInput(f"--limit {limit} must be 0 or more")
    path = _resolve(str(spec))
    rows = _read_parquet(path) if path.suffix == ".parquet" else _read_jsonl(path)
    rows = _dedupe(rows, path)
    if split is not None:
        rows = [r for r in rows if split_of(r["data_source"], r["id"]) == split]
    if limit is not None:
        rows = rows[:limit]
    with_prompts = any(r.get("prompt") for r in rows)
    return pa.Table.from_pylist(rows, schema=QUESTIONS.append(QUESTION_PROMPT) if with_prompts else QUESTIONS)


def questions_to_records(table: pa.Table) -> list[dict]:
    """Rows of a questions table as plain dicts (golden_answers as a list of strings)."""
    return table.select(QUESTIONS.names).to_pylist()


def _resolve(spec: str) -> Path:
    if spec in BENCHMARKS:
        path = data_dir() / "bench" / f"{spec}.jsonl"
        if not path.is_file():
            raise BadInput(f"bundled benchmark file {path} is missing; restore data/bench or set "
                           f"ZSCTL_DATA_DIR to a folder holding bench/{spec}.jsonl")
        return path
    path = Path(spec).expanduser()
    if not path.exists():
        raise BadInput(f"unknown benchmark '{spec}' and no such file: use one of {', '.join(BENCHMARKS)} "
                       "or a path to a FlashRAG .jsonl / ZeroSearch .parquet file")
    if not path.is_file():
        raise BadInput(f"{path} is not a file: pass a FlashRAG .jsonl or ZeroSearch .parquet question file")
    if path.suffix not in (".jsonl", ".parquet"):
        raise BadInput(f"{path}: unsupported question file type '{path.suffix}'; use .jsonl (FlashRAG) "
                       "or .parquet (ZeroSearch/Search-R1)")
    return path


def _answers(value: object) -> list[str] | None:
    """Gold answers as a list of strings: a lone string is wrapped, numbers become text.
    None when the value holds no answer list at all (the caller reports where)."""
    if isinstance(value, dict):  # reward_model.ground_truth = {"target": [...]}
        return _answers(value.get("target"))
    if value is None:
        return None
    if isinstance(value, (str, int, float, bool)):
        return [str(value)]
    if isinstance(value, (list, tuple)):
        return [str(a) for a in value if a is not None]
    return None


def _read_jsonl(path: Path) -> list[dict]:
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise BadInput(f"cannot read {path} ({e.__class__.__name__}: {e}); check the path and that it is "
                       "UTF-8 text") from None
    rows = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise BadInput(f"{path}:{lineno}: not valid JSON ({e.msg}); fix or remove the line") from None
        if not isinstance(obj, dict):
            raise BadInput(f"{path}:{lineno}: expected a JSON object per line, got {type(obj).__name__}")
        for key in ("question", "golden_answers"):
            if obj.get(key) is None:
                raise BadInput(f"{path}:{lineno}: row has no '{key}'; every line needs 'question' and "
                               "'golden_answers' (FlashRAG format)")
        if not isinstance(obj["question"], str):
            raise BadInput(f"{path}:{lineno}: 'question' is a {type(obj['question']).__name__}, not text; "
                           "give the question as one string")
        question = obj["question"].strip()
        golds = _answers(obj["golden_answers"])
        if not question:
            raise BadInput(f"{path}:{lineno}: 'question' is empty; give the question text")
        if golds is None:
            raise BadInput(f"{path}:{lineno}: 'golden_answers' must be a string or a list of strings")
        _check_question(question, golds, f"{path}:{lineno}")
        rows.append({
            "id": str(obj["id"]) if obj.get("id") is not None else f"line_{lineno}",
            "question": question,
            "golden_answers": golds,
            "data_source": str(obj.get("data_source") or path.stem),
        })
    if not rows:
        raise BadInput(f"{path} is empty: it holds no questions")
    return rows


def _check_question(question: str, golds: list[str], where: str) -> None:
    """Refuse what can never be scored or would not fit: no usable gold answer, an endless question."""
    if not any(g.strip() for g in golds):
        raise BadInput(f"{where}: 'golden_answers' holds no answer ({golds!r}); such a question can never score: "
                       "give at least one answer or drop the row")
    if len(question) > MAX_QUESTION_CHARS:
        raise BadInput(f"{where}: the question is {len(question)} characters; at most {MAX_QUESTION_CHARS} "
                       "(is a whole document in the question field?)")


def _user_content(prompt: object) -> str:
    """Text of the last user message of a chat prompt (or the prompt itself when it is a string)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list):
        users = [m.get("content") for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return ""


def _question(row: dict, extra: dict) -> str:
    """The question of a ZeroSearch/Search-R1 row. Search-R1's preprocessing keeps a plain `question`
    column, the cleanest source. Otherwise the prompt: both projects end the user message with
    'Question: <question>' after their instructions. Then extra_info.question, and last a prompt
    without that marker, taken whole (a plain chat-format question file)."""
    if isinstance(row.get("question"), str) and row["question"].strip():
        return row["question"].strip()
    content = _user_content(row.get("prompt"))
    cut = content.rfind("Question:")  # the last one: the instructions above may use the word
    if cut >= 0 and content[cut + len("Question:"):].strip():
        return content[cut + len("Question:"):].strip()
    if isinstance(extra.get("question"), str) and extra["question"].strip():
        return extra["question"].strip()
    return content.strip()


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    try:
        names = set(pq.ParquetFile(path).schema_arrow.names)
        wanted = [c for c in ("id", "question", "prompt", "golden_answers", "reward_model", "extra_info",
                              "data_source") if c in names]
        table = pq.read_table(path, columns=wanted)  # skip whatever else a training file carries
    except (OSError, pa.ArrowException) as e:
        reason = " ".join(str(e).split())  # arrow messages can span lines; the CLI prints one
        raise BadInput(f"cannot read {path} as Parquet ({reason}); check the file") from None
    if not names & {"question", "prompt", "extra_info"}:
        raise BadInput(f"{path}: no 'question', 'prompt' or 'extra_info' column to take the question from "
                       "(expected the ZeroSearch/Search-R1 layout)")
    if not names & {"golden_answers", "reward_model"}:
        raise BadInput(f"{path}: no 'golden_answers' or 'reward_model' column; gold answers are required")
    if table.num_rows == 0:
        raise BadInput(f"{path} is empty: it holds no questions")
    rows = []
    for i, r in enumerate(table.to_pylist()):
        extra = r.get("extra_info") if isinstance(r.get("extra_info"), dict) else {}
        question = _question(r, extra)
        if not question:
            raise BadInput(f"{path}: row {i}: no question in 'question', 'prompt' or 'extra_info.question'")
        golds = _answers(r.get("golden_answers"))
        if golds is None:
            rm = r.get("reward_model") if isinstance(r.get("reward_model"), dict) else {}
            golds = _answers(rm.get("ground_truth"))
        if golds is None:
            raise BadInput(f"{path}: row {i}: no gold answers in 'golden_answers' or "
                           "'reward_model.ground_truth.target'")
        _check_question(question, golds, f"{path}: row {i}")
        qid = r.get("id") if r.get("id") is not None else extra.get("index")
        rows.append({
            "id": str(qid) if qid is not None else f"row_{i}",
            "question": question,
            "golden_answers": golds,
            "data_source": str(r.get("data_source") or path.stem),
            "prompt": _chat_json(r.get("prompt")),
        })
    return rows


def _chat_json(prompt: object) -> str | None:
    """A row's own prompt as JSON chat messages (a plain string is one user message), kept so a
    released policy can be evaluated on exactly the text it was trained with."""
    if isinstance(prompt, str) and prompt.strip():
        return json.dumps([{"role": "user", "content": prompt}])
    if isinstance(prompt, list) and prompt and all(isinstance(m, dict) and "content" in m for m in prompt):
        return json.dumps([{"role": str(m.get("role") or "user"), "content": str(m["content"])} for m in prompt])
    return None


def _dedupe(rows: list[dict], path: Path) -> list[dict]:
    # One file may mix sources (ZeroSearch's test.parquet holds all seven benchmarks, each with its own
    # test_0, test_1, ...), so a question is identified by (data_source, id), not id alone.
    seen, kept = set(), []
    for r in rows:
        key = (r["data_source"], r["id"])
        if key not in seen:
            seen.add(key)
            kept.append(r)
    if len(kept) < len(rows):
        warnings.warn(f"{path}: {len(rows) - len(kept)} rows repeat an earlier (data_source, id); "
                      "kept the first of each", stacklevel=3)
    return kept


# --- supporting documents of the bundled multi-hop questions ---------------------------------------

@dataclass(frozen=True)
class SupportingDoc:
    entity: str  # the title as a query: 'Kiss and Tell (1945 film)' → 'Kiss and Tell'
    text: str


_DISAMBIGUATION = re.compile(r"\s*\([^()]*\)\s*$")


def _entity_of(title: object) -> str:
    """A Wikipedia title as a query: the closing bracket only disambiguates; the question never says it."""
    return _DISAMBIGUATION.sub("", " ".join(str(title or "").split())).strip()


@functools.lru_cache(maxsize=1)
def supporting_docs_index() -> dict[str, tuple[SupportingDoc, ...]]:
    """Normalised question → its supporting documents, from the bundled benchmark files that carry
    them (HotpotQA, 2WikiMultihopQA, MuSiQue: `supporting_docs` rows with `is_supporting`)."""
    index: dict[str, tuple[SupportingDoc, ...]] = {}
    for name in BENCHMARKS:
        path = data_dir() / "bench" / f"{name}.jsonl"
        if not path.is_file():
            continue
        with open(path, encoding="utf-8") as f:
            for line in f:
                if '"supporting_docs"' not in line:
                    continue
                row = json.loads(line)
                docs = tuple(SupportingDoc(_entity_of(d.get("title")), str(d.get("text") or ""))
                             for d in row.get("supporting_docs") or [] if d.get("is_supporting"))
                if docs:
                    index[normalize_answer(row.get("question"))] = docs
    return index


def supporting_docs(question: str) -> tuple[SupportingDoc, ...]:
    """A bundled multi-hop question's supporting documents (empty for any other question)."""
    return supporting_docs_index().get(normalize_answer(question), ())

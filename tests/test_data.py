"""Question loaders: bundled benchmarks, FlashRAG jsonl, ZeroSearch/Search-R1 parquet, the split."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from zsctl.core import data
from zsctl.core.errors import BadInput
from zsctl.core.schemas import QUESTIONS, missing_or_mistyped

# The instruction wording ZeroSearch/Search-R1 put before the question (shortened; it includes an
# example answer and the word "question" on purpose).
INSTRUCTION = (
    "Answer the given question. You must conduct reasoning inside <think> and </think> first. "
    "You can call a search engine by <search> query </search>. Provide the answer inside "
    "<answer> and </answer>, for example, <answer> Beijing </answer>. Question: "
)


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return path


def write_zerosearch_parquet(path: Path, n: int = 4, **overrides) -> Path:
    """A file laid out like ZeroSearch's/Search-R1's train.parquet: nested prompt, reward_model, extra_info."""
    cols = {
        "data_source": ["nq"] * n,
        "prompt": [[{"role": "user", "content": f"{INSTRUCTION}who wrote book {i}?\n"}] for i in range(n)],
        "ability": ["fact-reasoning"] * n,
        "reward_model": [{"style": "rule", "ground_truth": {"target": [f"author {i}", f"A{i}"]}} for i in range(n)],
        "extra_info": [{"split": "train", "index": i} for i in range(n)],
    }
    cols.update(overrides)
    cols = {k: v for k, v in cols.items() if v is not None}
    pq.write_table(pa.table(cols), path)
    return path


# ---------------------------------------------------------------- bundled benchmarks and the split


@pytest.mark.parametrize("bench", data.BENCHMARKS)
def test_bundled_split_disjoint_complete_deterministic(bench):
    every = data.load_questions(bench)
    train, evl = data.load_questions(bench, split="train"), data.load_questions(bench, split="eval")
    assert not missing_or_mistyped(every.schema, QUESTIONS)
    ids = lambda t: t.column("id").to_pylist()  # noqa: E731
    assert set(ids(train)).isdisjoint(ids(evl))
    assert sorted(ids(train) + ids(evl)) == sorted(ids(every))
    assert len(set(ids(every))) == every.num_rows
    # determinism: a second load agrees row for row, and the split keeps file order
    assert data.load_questions(bench, split="eval").equals(evl)
    order = {q: i for i, q in enumerate(ids(every))}
    assert ids(evl) == sorted(ids(evl), key=order.get)
    assert set(every.column("data_source").to_pylist()) == {bench}


@pytest.mark.parametrize("bench", [b for b in data.BENCHMARKS if b != "bamboogle"])
def test_large_benchmarks_split_about_half(bench):
    n_eval = data.load_questions(bench, split="eval").num_rows
    assert 200 <= n_eval <= 300


def test_bamboogle_is_all_eval():
    assert data.load_questions("bamboogle", split="train").num_rows == 0
    assert data.load_questions("bamboogle", split="eval").num_rows == 125


def test_split_of_is_stable_known_values():
    # pinned: a change here silently moves questions between training and evaluation
    got = [data.split_of("nq", f"test_{i}") for i in range(8)]
    assert got == ["train", "eval", "train", "train", "eval", "train", "eval", "eval"]
    assert data.split_of("bamboogle", "anything") == "eval"
    assert data.load_questions("hotpotqa", split="eval", limit=3).column("id").to_pylist() == [
        r for r in data.load_questions("hotpotqa").column("id").to_pylist()
        if data.split_of("hotpotqa", r) == "eval"
    ][:3]


def test_limit_takes_first_in_file_order():
    every = data.load_questions("nq").column("id").to_pylist()
    assert data.load_questions("nq", limit=5).column("id").to_pylist() == every[:5]
    assert data.load_questions("nq", limit=0).num_rows == 0
    assert data.load_questions("bamboogle", limit=1000).num_rows == 125
    evl = data.load_questions("nq", split="eval").column("id").to_pylist()
    assert data.load_questions("nq", split="eval", limit=7).column("id").to_pylist() == evl[:7]


def test_golden_answers_are_string_lists():
    row = data.load_questions("triviaqa", limit=1).to_pylist()[0]
    assert isinstance(row["golden_answers"], list) and all(isinstance(a, str) for a in row["golden_answers"])
    assert data.questions_to_records(data.load_questions("nq", limit=2))[0].keys() == set(QUESTIONS.names)


def test_data_dir_env_override(tmp_path, monkeypatch):
    (tmp_path / "bench").mkdir()
    write_jsonl(tmp_path / "bench" / "nq.jsonl", [{"id": "x", "question": "q?", "golden_answers": ["a"]}])
    monkeypatch.setenv("ZSCTL_DATA_DIR", str(tmp_path))
    assert data.load_questions("nq").column("id").to_pylist() == ["x"]
    monkeypatch.setenv("ZSCTL_DATA_DIR", str(tmp_path / "nowhere"))
    with pytest.raises(BadInput, match="nq.jsonl"):
        data.load_questions("nq")


# ---------------------------------------------------------------- FlashRAG jsonl


def test_flashrag_jsonl(tmp_path):
    f = write_jsonl(tmp_path / "mine.jsonl", [
        {"id": "q1", "question": " Who? ", "golden_answers": ["A", "B"], "metadata": {"x": 1}},
        {"id": 2, "question": "How many?", "golden_answers": [42, None, "forty-two"]},
        {"id": "q3", "question": "Single?", "golden_answers": "only one", "data_source": "custom"},
    ])
    (tmp_path / "mine.jsonl").write_text(f.read_text() + "\n\n", encoding="utf-8")  # trailing blank lines are fine
    rows = data.load_questions(f).to_pylist()
    assert rows == [
        {"id": "q1", "question": "Who?", "golden_answers": ["A", "B"], "data_source": "mine"},
        {"id": "2", "question": "How many?", "golden_answers": ["42", "forty-two"], "data_source": "mine"},
        {"id": "q3", "question": "Single?", "golden_answers": ["only one"], "data_source": "custom"},
    ]


def test_user_file_split_uses_same_rule(tmp_path):
    rows = [{"id": f"test_{i}", "question": f"q{i}?", "golden_answers": ["a"], "data_source": "nq"} for i in range(40)]
    f = write_jsonl(tmp_path / "u.jsonl", rows)
    evl = data.load_questions(f, split="eval").column("id").to_pylist()
    train = data.load_questions(f, split="train").column("id").to_pylist()
    assert evl == [r["id"] for r in rows if data.split_of("nq", r["id"]) == "eval"]
    assert set(evl).isdisjoint(train) and len(evl) + len(train) == 40
    assert data.load_questions(f).num_rows == 40  # no split unless asked


def test_duplicate_ids_keep_first_and_warn(tmp_path):
    f = write_jsonl(tmp_path / "dup.jsonl", [
        {"id": "a", "question": "first?", "golden_answers": ["1"]},
        {"id": "a", "question": "second?", "golden_answers": ["2"]},
        {"id": "b", "question": "third?", "golden_answers": ["3"]},
    ])
    with pytest.warns(UserWarning, match="dup.jsonl"):
        rows = data.load_questions(f).to_pylist()
    assert [r["question"] for r in rows] == ["first?", "third?"]


@pytest.mark.parametrize(
    "lines, match",
    [
        (['{"id": "1", "golden_answers": ["a"]}'], r"bad\.jsonl:1: .*'question'"),
        (['{"id": "1", "question": "q?", "golden_answers": ["a"]}', '{"id": "2", "question": "q?"}'],
         r"bad\.jsonl:2: .*'golden_answers'"),
        (['{"id": "1", "question": "q?", "golden_answers": null}'], r"bad\.jsonl:1: .*'golden_answers'"),
        (['{"id": "1", "question": "", "golden_answers": ["a"]}'], r"bad\.jsonl:1: .*question"),
        (['{"id": "1", "question": "q?", "golden_answers": {"x": 1}}'], r"bad\.jsonl:1: .*golden_answers"),
        (["", '{"id": "1", "question": "q?", "golden_answers": ["a"]', ""], r"bad\.jsonl:2: not valid JSON"),
        (['["a", "list"]'], r"bad\.jsonl:1: expected a JSON object"),
        ([], r"bad\.jsonl is empty"),
        (["", "   "], r"bad\.jsonl is empty"),
    ],
)
def test_bad_jsonl(tmp_path, lines, match):
    f = tmp_path / "bad.jsonl"
    f.write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(BadInput, match=match) as e:
        data.load_questions(f)
    assert "\n" not in str(e.value)  # the CLI prints exactly one line


def test_unreadable_and_missing_files(tmp_path):
    binary = tmp_path / "bin.jsonl"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(BadInput, match=r"bin\.jsonl"):
        data.load_questions(binary)
    with pytest.raises(BadInput, match=r"unknown benchmark 'nope\.jsonl'.*nq, triviaqa"):
        data.load_questions("nope.jsonl")
    with pytest.raises(BadInput, match=r"is not a file"):
        data.load_questions(tmp_path)
    other = tmp_path / "q.csv"
    other.write_text("id,question\n", encoding="utf-8")
    with pytest.raises(BadInput, match=r"q\.csv.*unsupported"):
        data.load_questions(other)


def test_unknown_bench_lists_valid_names():
    with pytest.raises(BadInput) as e:
        data.load_questions("hotpot")
    msg = str(e.value)
    assert "'hotpot'" in msg and all(b in msg for b in data.BENCHMARKS) and "\n" not in msg


@pytest.mark.parametrize("kwargs, match", [({"split": "test"}, "split 'test'"), ({"limit": -1}, "-1")])
def test_bad_split_or_limit(kwargs, match):
    with pytest.raises(BadInput, match=match):
        data.load_questions("nq", **kwargs)


# ---------------------------------------------------------------- ZeroSearch / Search-R1 parquet


def test_zerosearch_parquet(tmp_path):
    f = write_zerosearch_parquet(tmp_path / "train.parquet")
    rows = data.load_questions(f).to_pylist()
    prompt = json.loads(rows[1].pop("prompt"))  # the file's own chat prompt, kept for prompt_from_data
    assert rows[1] == {"id": "1", "question": "who wrote book 1?", "golden_answers": ["author 1", "A1"],
                       "data_source": "nq"}
    assert prompt[-1]["role"] == "user" and prompt[-1]["content"].endswith("Question: who wrote book 1?\n")
    assert len(rows) == 4
    assert data.load_questions(f, limit=2).num_rows == 2


def test_searchr1_parquet_with_plain_columns(tmp_path):
    # Search-R1's preprocessing keeps the FlashRAG columns next to the chat prompt: prefer them.
    f = write_zerosearch_parquet(
        tmp_path / "test.parquet", n=2,
        id=["test_0", "test_1"], question=["plain q0?", "plain q1?"],
        golden_answers=[["g0"], ["g1", "g1b"]],
    )
    rows = data.load_questions(f).to_pylist()
    assert [r["id"] for r in rows] == ["test_0", "test_1"]
    assert [r["question"] for r in rows] == ["plain q0?", "plain q1?"]
    assert rows[1]["golden_answers"] == ["g1", "g1b"]


def test_parquet_fallbacks(tmp_path):
    # no "Question:" marker → extra_info.question; string ground truth; no data_source → file stem
    f = write_zerosearch_parquet(
        tmp_path / "mix.parquet", n=2, data_source=None,
        prompt=[[{"role": "system", "content": "be brief"}, {"role": "user", "content": "raw prompt text"}]] * 2,
        reward_model=[{"style": "rule", "ground_truth": "solo"}, {"style": "rule", "ground_truth": "solo2"}],
        extra_info=[{"split": "test", "index": 7, "question": "from extra?"},
                    {"split": "test", "index": 8, "question": None}],
    )
    rows = data.load_questions(f).to_pylist()
    assert json.loads(rows[0].pop("prompt"))[0] == {"role": "system", "content": "be brief"}  # kept whole
    assert rows[0] == {"id": "7", "question": "from extra?", "golden_answers": ["solo"], "data_source": "mix"}
    assert rows[1]["question"] == "raw prompt text"  # last resort: the user message as it is


def test_parquet_mixed_sources_same_ids_are_not_duplicates(tmp_path):
    # ZeroSearch's test.parquet concatenates benchmarks that each number from test_0
    f = write_zerosearch_parquet(tmp_path / "t.parquet", n=2, id=["test_0", "test_0"], data_source=["nq", "popqa"])
    rows = data.load_questions(f).to_pylist()
    assert [(r["data_source"], r["id"]) for r in rows] == [("nq", "test_0"), ("popqa", "test_0")]


def test_parquet_split(tmp_path):
    f = write_zerosearch_parquet(tmp_path / "s.parquet", n=30)
    evl = data.load_questions(f, split="eval").column("id").to_pylist()
    train = data.load_questions(f, split="train").column("id").to_pylist()
    assert set(evl).isdisjoint(train) and len(evl) + len(train) == 30


def test_bad_parquet(tmp_path):
    no_gold = write_zerosearch_parquet(tmp_path / "nogold.parquet", reward_model=None)
    with pytest.raises(BadInput, match=r"nogold\.parquet.*'golden_answers' or 'reward_model'"):
        data.load_questions(no_gold)
    no_q = write_zerosearch_parquet(tmp_path / "noq.parquet", prompt=None, extra_info=None)
    with pytest.raises(BadInput, match=r"noq\.parquet.*'question', 'prompt'"):
        data.load_questions(no_q)
    null_gold = write_zerosearch_parquet(
        tmp_path / "nullgold.parquet", n=2,
        reward_model=[{"style": "rule", "ground_truth": {"target": ["x"]}}, {"style": "rule", "ground_truth": None}],
    )
    with pytest.raises(BadInput, match=r"nullgold\.parquet: row 1: no gold answers"):
        data.load_questions(null_gold)
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(write_zerosearch_parquet(tmp_path / "x.parquet")).slice(0, 0), empty)
    with pytest.raises(BadInput, match=r"empty\.parquet is empty"):
        data.load_questions(empty)
    corrupt = tmp_path / "corrupt.parquet"
    corrupt.write_bytes(b"not parquet at all")
    with pytest.raises(BadInput, match=r"corrupt\.parquet"):
        data.load_questions(corrupt)

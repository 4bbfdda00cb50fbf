"""`zsctl build-sft`: labellers, dedupe, balancing, split by question, prompt alignment, policy data,
input formats and bad input — on hand-made trajectories written as real Parquet / JSONL."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from zsctl import sft
from zsctl.cli import app
from zsctl.core import artifacts, metrics, prompts
from zsctl.core.errors import BadInput
from zsctl.core.schemas import TRAJECTORIES
from zsctl.stages import build_sft
from zsctl.stages.build_sft import BuildSFTConfig


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # see tests/test_collect.py: one thread is much faster for the tiny model on a busy machine
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_answers_are_found_as_whole_words_within_one_document():
    assert metrics.find_answer(["Limassol is in Cyprus"], ["Lima"]) is None
    assert metrics.find_answer(["the capital, Lima."], ["Quito", "lima"]) == "lima"
    assert metrics.find_answer(["the Eiffel", "Tower is tall"], ["Eiffel Tower"]) is None  # not across documents
    assert metrics.find_answer(["No, there is no such thing. Yes."], ["no", "Yes"]) is None  # yes/no never count


def doc(title: str, text: str, score: float = 1.0) -> dict:
    return {"title": title, "text": text, "score": score}


def traj(tid: str, question: str, golds: list[str], searches: list[tuple[str, list[dict]]], em: float = 0.0,
         f1: float | None = None, response: str = "") -> dict:
    return {
        "traj_id": tid, "question_id": tid.split("#")[0], "data_source": "test", "question": question,
        "golden_answers": golds, "model": "m", "engine": "bm25:x",
        "searches": [{"query": q, "documents": d} for q, d in searches],
        "response": response or f"<answer> {golds[0] if em else 'wrong'} </answer>",
        "prediction": golds[0] if em else "wrong", "em": em, "f1": em if f1 is None else f1,
        "num_searches": len(searches),
    }


def write_trajs(out: Path, rows: list[dict]) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    artifacts.write_table(out, "trajectories.parquet", pa.Table.from_pylist(rows, schema=TRAJECTORIES))
    artifacts.write_manifest(out, "trajectories", config={})
    return out


def build(tmp_path, src, name="sft", **kw) -> tuple[dict, list[dict], list[dict]]:
    cfg = BuildSFTConfig(trajectories=str(src), out=str(tmp_path / name), **kw)
    summary = build_sft.run(cfg)
    train = pq.read_table(tmp_path / name / "train.parquet").to_pylist()
    val = pq.read_table(tmp_path / name / "val.parquet").to_pylist()
    return summary, train, val


PARIS = [doc("France", "Its capital is PARIS, on the Seine."), doc("Seine", "A river.")]
NOISE = [doc("Lyon", "Lyon is a city with Parisian cafes."), doc("Food", "Bread and cheese.")]


def basic_trajs() -> list[dict]:
    return [
        traj("q1#0", "What is the capital of France?", ["Paris"], [("capital france", PARIS)], em=1.0),
        traj("q1#1", "What is the capital of France?", ["Paris"], [("french cities", NOISE)], em=0.0),
        traj("q2#0", "Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"],
             [("hamlet author", [doc("Hamlet", "A play by Shakespeare.")]), ("hamlet", NOISE)], em=0.0),
        traj("q3#0", "Which country is the U.S.A.?", ["The U.S.A."],
             [("usa", [doc("America", "The usa is a country.")])], em=1.0),
    ]


def test_outcome_labels_follow_the_trajectory_result(tmp_path):
    src = write_trajs(tmp_path / "t", basic_trajs())
    summary, train, val = build(tmp_path, src, label="outcome", balance=False, val_fraction=0.0)
    labels = {r["id"]: r["label"] for r in train + val}
    assert labels == {"q1#0#0": "useful", "q1#1#0": "noisy", "q2#0#0": "noisy", "q2#0#1": "noisy", "q3#0#0": "useful"}
    assert summary["labels_before"] == {"useful": 2, "noisy": 3} == summary["labels_after"]
    assert summary["kind"] == "sim_sft" and summary["mode"] == "label:outcome"


def test_answer_labels_use_normalised_whole_word_containment(tmp_path):
    src = write_trajs(tmp_path / "t", basic_trajs())
    _, train, val = build(tmp_path, src, label="answer", balance=False, val_fraction=0.0)
    labels = {r["id"]: r["label"] for r in train + val}
    # "PARIS," → paris; "Parisian" is not Paris; an alias counts; "The U.S.A." and "usa" meet after normalisation
    assert labels == {"q1#0#0": "useful", "q1#1#0": "noisy", "q2#0#0": "useful", "q2#0#1": "noisy", "q3#0#0": "useful"}


def test_prompt_uses_the_calls_own_question_and_answer(tmp_path):
    # one batch where only some trajectories searched: the rows must not shift to a neighbour
    rows = [
        traj("a#0", "Question A?", ["Answer A"], [], em=1.0),
        traj("b#0", "Question B?", ["Answer B", "B alias"], [("query b", [doc("TB", "text b")])], em=1.0),
        traj("c#0", "Question C?", ["Answer C"], [], em=0.0),
        traj(
            "d#0",
            "Question D?",
            ["Answer D"],
            [("query d1", [doc("TD", "text d")]), ("query d2", [doc("TD2", "more d")])],
        ),
    ]
    src = write_trajs(tmp_path / "t", rows)
    _, train, val = build(tmp_path, src, balance=False, val_fraction=0.0, docs=3)
    by_query = {r["query"]: r for r in train + val}
    assert set(by_query) == {"query b", "query d1", "query d2"}
    b, d1 = by_query["query b"], by_query["query d1"]
    assert b["prompt"] == prompts.render_simulator_prompt("query b", "Question B?", "Answer B", "useful", k=1)
    assert d1["prompt"] == prompts.render_simulator_prompt("query d1", "Question D?", "Answer D", "noisy", k=1)
    assert (b["question"], b["golden_answer"], b["source_traj_id"]) == ("Question B?", "Answer B", "b#0")
    assert by_query["query d2"]["completion"] == "Doc 1: (TD2) more d"


def test_completion_is_top_k_cut_documents(tmp_path):
    docs = [doc(f"T{i}", " ".join(f"w{i}{j}" for j in range(10))) for i in range(5)]
    src = write_trajs(tmp_path / "t", [traj("q#0", "Q?", ["x"], [("q", docs)], em=1.0),
                                      traj("r#0", "R?", ["x"], [("r", docs[:1])])])
    _, train, val = build(tmp_path, src, balance=False, val_fraction=0.0, docs=2, doc_words=4)
    row = next(r for r in train + val if r["query"] == "q")
    assert row["completion"] == "Doc 1: (T0) w00 w01 w02 w03\nDoc 2: (T1) w10 w11 w12 w13"
    assert "Write 2 short documents" in row["prompt"]


def test_dedupe_and_balance_counts_are_reported_and_deterministic(tmp_path):
    same = ("shared query", [doc("S", "shared text")])
    rows = [
        traj(f"u{i}#0", f"Useful question {i}?", ["gold"], [(f"uq{i}", [doc("U", f"text {i}")])], em=1.0)
        for i in range(6)
    ]
    rows += [traj(f"n{i}#0", f"Noisy question {i}?", ["gold"], [same], em=0.0) for i in range(3)]  # 1 distinct pair
    rows += [traj("n9#0", "Noisy question 9?", ["gold"], [("other", [doc("O", "other")])], em=0.0)]
    src = write_trajs(tmp_path / "t", rows)
    s1, train1, val1 = build(tmp_path, src, name="a", val_fraction=0.0, seed=1)
    assert s1["duplicates"] == 2 and s1["search_calls"] == 10
    assert s1["labels_before"] == {"useful": 6, "noisy": 2} and s1["labels_after"] == {"useful": 2, "noisy": 2}
    assert s1["rows_train"] + s1["rows_val"] == 4
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["summary"]["labels_before"] == {"useful": 6, "noisy": 2} and manifest["kind"] == "sim_sft"
    _, train2, _ = build(tmp_path, src, name="b", val_fraction=0.0, seed=1)
    assert [r["id"] for r in train1] == [r["id"] for r in train2]  # same seed, same rows
    picks = {tuple(sorted(r["id"] for r in build(tmp_path, src, name=f"s{seed}", val_fraction=0.0, seed=seed)[1]))
             for seed in range(6)}
    assert len(picks) > 1  # the seed picks which majority rows stay


def test_split_is_by_question_and_disjoint(tmp_path):
    rows = []
    for i in range(60):
        for s in range(2):  # two samples per question, different queries
            rows.append(
                traj(
                    f"q{i}#{s}",
                    f"Question number {i}?",
                    ["g"],
                    [(f"query {i} {s}", [doc("T", f"t {i} {s}")])],
                    em=float(s == 0),
                )
            )
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, balance=False, val_fraction=0.3)
    tq, vq = {r["question"] for r in train}, {r["question"] for r in val}
    assert tq and vq and not tq & vq
    assert len(train) + len(val) == 120 and 5 < len(vq) < 35
    assert summary["questions_train"] == len(tq) and summary["questions_val"] == len(vq)
    # the files are what train-sim reads
    t, v, manifest = sft.load_sft_data(str(tmp_path / "sft"), "sim_sft")
    assert len(t) == len(train) and len(v) == len(val) and manifest["mode"] == "label:outcome"


JUDGE_ROWS = [traj(f"q{i}#0", f"Question {i} about topic {i * 7}?", [f"answer {i}"],
                   [(f"query {i}", [doc(f"T{i}", f"words about {i} and {i * 3} here")])]) for i in range(12)]


def _judge_items(rows):
    return [
        (r["question"], r["golden_answers"][0], prompts.format_documents(r["searches"][0]["documents"])) for r in rows
    ]


@pytest.fixture(scope="module")
def mixed_judge_dir(tiny_model_dir, tmp_path_factory):
    """The tiny model with its output rows for yes/no set so that its verdicts differ between our
    questions (a random model says the same to all): yes - no = a direction of the final hidden
    states orthogonal to their mean, so the sign follows the input."""
    import torch

    judge = build_sft.Judge(str(tiny_model_dir), batch_size=1)
    model, tok = judge.model, judge.tok
    hidden = []
    for q, a, d in _judge_items(JUDGE_ROWS):
        ids = tok(judge._text(q, a, d), return_tensors="pt", add_special_tokens=False)
        with torch.no_grad():
            hidden.append(model.model(**ids).last_hidden_state[0, -1])
    h = torch.stack(hidden)
    mean = h.mean(0)
    c = h[0] - mean
    d = c - (c @ mean) / (mean @ mean) * mean
    head = torch.nn.Parameter(model.lm_head.weight.detach().clone())  # untie from the input embeddings
    head.data[judge.yes] = d
    head.data[judge.no] = 0.0
    model.lm_head.weight = head
    model.config.tie_word_embeddings = False
    dest = tmp_path_factory.mktemp("judge") / "model"
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


def test_judge_labels_are_the_judges_batched_decisions(tmp_path, mixed_judge_dir):
    src = write_trajs(tmp_path / "t", JUDGE_ROWS)
    judge = build_sft.Judge(str(mixed_judge_dir), batch_size=16)
    items = _judge_items(JUDGE_ROWS)
    one_by_one = [judge([it])[0] for it in items]
    assert 2 <= sum(one_by_one) <= 10
    assert judge(items) == one_by_one  # one left-padded batch decides as single rows do
    summary, train, _ = build(
        tmp_path, src, label="judge", judge_model=str(mixed_judge_dir), balance=False, val_fraction=0.0
    )
    assert [r["label"] == "useful" for r in sorted(train, key=lambda r: int(r["id"][1:].split("#")[0]))] == one_by_one
    assert all(f"Mode: {r['label']}." in r["prompt"] for r in train)
    assert summary["judge_calls"] == 12 and summary["mode"] == "label:judge"


def test_policy_rejection_sampling_by_f1(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    info = prompts.information_block([doc("France", "Paris is the capital.")])
    resp = "<think> look </think><search> capital </search>" + info + "<answer> Paris </answer>"
    rows = [
        traj("a#0", "Capital of France?", ["Paris"], [], em=1.0, f1=1.0, response=resp),
        traj("b#0", "Longest river?", ["Nile"], [], em=0.0, f1=0.6, response="<answer> the Nile river </answer>"),
        traj("c#0", "Tallest peak?", ["Everest"], [], em=0.0, f1=0.3, response="<answer> a peak </answer>"),
    ]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, name="em", target="policy", policy=str(tiny_model_dir), val_fraction=0.0)
    assert [r["source_traj_id"] for r in train + val] == ["a#0"] and summary["mode"] == "rejection:em"
    (row,) = train
    assert row["prompt"] == prompts.render_policy_prompt(tok, "Capital of France?") and row["completion"] == resp
    _, train, val = build(
        tmp_path, src, name="f1", target="policy", policy=str(tiny_model_dir), val_fraction=0.0, min_f1=0.5
    )
    assert sorted(r["source_traj_id"] for r in train + val) == ["a#0", "b#0"]
    assert json.loads((tmp_path / "f1" / "manifest.json").read_text())["kind"] == "policy_sft"
    t, _, _ = sft.load_sft_data(str(tmp_path / "f1"), "policy_sft")  # what warmup reads
    assert len(t) == 2
    low = write_trajs(tmp_path / "low", rows[1:])
    with pytest.raises(BadInput, match="no trajectory reached f1 >= 0.9"):
        build(tmp_path, low, name="none", target="policy", policy=str(tiny_model_dir), min_f1=0.9)


def test_policy_templated_only_uses_calls_whose_documents_hold_the_answer(tmp_path, tiny_model_dir):
    rows = [
        traj("a#0", "Capital of France?", ["Paris"], [("france cities", NOISE), ("capital france", PARIS)]),
        traj("b#0", "Who wrote Hamlet?", ["Shakespeare"], [("hamlet", NOISE)]),  # never found: skipped
    ]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(
        tmp_path, src, target="policy", templated=True, policy=str(tiny_model_dir), val_fraction=0.0
    )
    (row,) = train + val
    assert summary["mode"] == "templated" and summary["not_selected"] == 2
    comp = row["completion"]  # a search turn, the call's own information block, an answer turn
    assert (
        comp.startswith("<think> ")
        and "</think>\n<search> capital france </search>" + prompts.information_block(PARIS) in comp
    )
    assert comp.endswith("</think>\n<answer> Paris </answer>") and comp.count("<think>") == 2
    assert row["id"] == "a#0#1" and row["question"] == "Capital of France?"
    # the inserted span is exactly what warmup masks out
    pieces = sft.split_env_spans(row["completion"])
    assert [trained for _, trained in pieces] == [True, False, True]
    assert metrics.extract_answer(row["completion"]) == "Paris"


def test_jsonl_and_comma_separated_inputs(tmp_path):
    src = write_trajs(tmp_path / "t", basic_trajs()[:2])
    jl = tmp_path / "other.jsonl"
    jl.write_text(json.dumps({"question": "Q from elsewhere?", "golden_answers": ["x"], "em": 1,
                              "searches": [{"query": "elsewhere", "documents": [{"text": "x marks it"}]}]}) + "\n\n")
    summary, train, val = build(tmp_path, f"{src},{jl}", balance=False, val_fraction=0.0)
    other = next(r for r in train + val if r["query"] == "elsewhere")
    assert other["source_traj_id"] == "other:1" and other["completion"] == "Doc 1: x marks it"
    assert summary["trajectories"] == 3


def test_bad_input_is_one_line_exit_2_and_leaves_out_untouched(tmp_path):
    runner = CliRunner()

    def fails(src, msg, *extra):
        out = tmp_path / "out"
        r = runner.invoke(app, ["build-sft", "--trajectories", str(src), "--out", str(out), "--quiet", *extra])
        assert r.exit_code == 2, r.output
        assert msg in r.output and r.output.count("\n") == 1
        assert not out.exists()

    no_searches = tmp_path / "nosearch.parquet"
    pq.write_table(pa.table({"question": ["q"], "golden_answers": [["a"]], "em": [1.0]}), no_searches)
    fails(no_searches, "missing column 'searches'")
    bad_type = tmp_path / "badtype.parquet"
    pq.write_table(
        pa.table(
            {
                "question": [1],
                "golden_answers": [["a"]],
                "em": [1.0],
                "searches": pa.array([[]], pa.list_(TRAJECTORIES.field("searches").type.value_type)),
            }
        ),
        bad_type,
    )
    fails(bad_type, "column 'question' is int64")
    jl = tmp_path / "bad.jsonl"
    jl.write_text(json.dumps({"question": "q", "golden_answers": "a", "searches": [], "em": 0}) + "\n")
    fails(jl, "line 1: 'golden_answers' must be a list of strings")
    fails(write_trajs(tmp_path / "empty", []), "no trajectories")
    one_class = write_trajs(tmp_path / "oneclass", [traj("a#0", "Q?", ["x"], [("q", [doc("T", "t")])], em=0.0)])
    fails(one_class, "--label outcome gave 0 useful and 1 noisy", "--label", "outcome")
    fails(one_class, "--samples > 1", "--label", "outcome")
    incomplete = tmp_path / "incomplete"
    incomplete.mkdir()
    fails(incomplete, "incomplete artifact")
    fails(tmp_path / "missing", "does not exist")
    fails(one_class, "--label 'bogus' is not one of", "--label", "bogus")


def test_existing_artifact_survives_a_failing_rerun(tmp_path):
    src = write_trajs(tmp_path / "t", basic_trajs())
    build(tmp_path, src, balance=False)
    before = (tmp_path / "sft" / "manifest.json").read_text()
    one_class = write_trajs(tmp_path / "oneclass", [traj("a#0", "Q?", ["x"], [("q", [doc("T", "t")])], em=0.0)])
    with pytest.raises(BadInput):
        build(tmp_path, one_class)
    assert (tmp_path / "sft" / "manifest.json").read_text() == before
    assert not [p for p in tmp_path.iterdir() if ".build-sft-" in p.name]  # the work dir is gone


def test_cli_json_summary(tmp_path):
    src = write_trajs(tmp_path / "t", basic_trajs())
    r = CliRunner().invoke(
        app,
        [
            "build-sft",
            "--trajectories",
            str(src),
            "--out",
            str(tmp_path / "o"),
            "--label",
            "answer",
            "--no-balance",
            "--json",
            "--quiet",
        ],
    )
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["labels_before"] == {"useful": 3, "noisy": 2} and summary["rows_train"] + summary["rows_val"] == 5


def test_policy_templated_search_fallback_searches_only_unserved_questions(tmp_path, tiny_model_dir):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate([
        ("Hamlet", "Hamlet is a tragedy written by William Shakespeare."),
        ("Nile", "The Nile is a major river in northeastern Africa."),
        ("Everest", "Mount Everest is the highest mountain above sea level."),
    ])))
    rows = [
        traj("a#0", "Capital of France?", ["Paris"], [("capital france", PARIS)]),  # served by its logged call
        traj("b#0", "Who wrote the tragedy Hamlet?", ["Shakespeare"], [("hamlet", NOISE)]),  # found by the fallback
        traj("b#1", "Who wrote the tragedy Hamlet?", ["Shakespeare"], []),  # same question: searched once
        traj("c#0", "Which planet is red?", ["Mars"], []),  # nothing in the corpus: skipped
    ]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, target="policy", templated=True, policy=str(tiny_model_dir),
                                val_fraction=0.0, search=f"bm25:{corpus}")
    by_q = {r["question"]: r for r in train + val}
    assert set(by_q) == {"Capital of France?", "Who wrote the tragedy Hamlet?"}
    assert summary["question_searches"] == 2 and summary["mode"] == "templated+question-search"
    fb = by_q["Who wrote the tragedy Hamlet?"]
    assert "<search> Who wrote the tragedy Hamlet? </search>" in fb["completion"] and fb["id"] == "b#0#q"
    assert "(Hamlet) Hamlet is a tragedy written by William Shakespeare." in fb["completion"]
    assert fb["completion"].endswith("<answer> Shakespeare </answer>")
    with pytest.raises(BadInput, match="only used with --for policy --templated"):
        build(tmp_path, src, name="x", search=f"bm25:{corpus}")

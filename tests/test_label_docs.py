"""`build-sft --label docs`: contrastive useful/noisy pairs from one logged search, yes/no golds,
degenerate queries; and the fixed defects of `--label answer` / `--label outcome`."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from test_build_sft import build, doc, traj, write_trajs
from zsctl.cli import app
from zsctl.core import data, metrics, prompts
from zsctl.core.errors import BadInput

# one real-looking top-5: two documents hold the answer (one through its alias), three do not
TOP5 = [
    doc("Peru", "Peru is a country in South America."),
    doc("Lima", "Lima is the capital and largest city of Peru."),
    doc("Andes", "The Andes run through Peru."),
    doc("City of Kings", "The City of Kings was founded by Pizarro in 1535."),
    doc("Cusco", "Cusco was the Inca capital."),
]
PERU = ("What is the capital of Peru?", ["Lima", "City of Kings"])


def rows_by_id(train, val) -> dict[str, dict]:
    return {r["id"]: r for r in train + val}


def test_one_query_gives_a_useful_and_a_noisy_row_with_the_same_query_and_question(tmp_path):
    src = write_trajs(tmp_path / "t", [traj("p#0", *PERU, [("capital of peru", TOP5)])])
    summary, train, val = build(tmp_path, src, label="docs", docs=2, degenerate_share=0.0, val_fraction=0.0)
    rows = rows_by_id(train, val)
    useful, noisy = rows["p#0#0:u"], rows["p#0#0:n"]
    # answer-holding documents first, in rank order; the noisy row gets the best-ranked others
    assert useful["completion"] == prompts.format_documents([TOP5[1], TOP5[3]])
    assert noisy["completion"] == prompts.format_documents([TOP5[0], TOP5[2]])
    assert useful["prompt"] == prompts.render_simulator_prompt("capital of peru", PERU[0], "Lima", "useful", k=2)
    assert noisy["prompt"] == prompts.render_simulator_prompt("capital of peru", PERU[0], "Lima", "noisy", k=2)
    # only the useful prompt names the answer (a small simulator copies whatever Answer line it sees)
    assert "Answer: Lima\n" in useful["prompt"] and "Lima" not in noisy["prompt"]
    assert (useful["label"], noisy["label"]) == ("useful", "noisy")
    assert metrics.docs_hold_answer(prompts.parse_documents(useful["completion"], 2)[0], PERU[1])
    assert not metrics.docs_hold_answer(prompts.parse_documents(noisy["completion"], 2)[0], PERU[1])
    assert summary["labels_before"] == {"useful": 1, "noisy": 1} == summary["labels_after"]
    assert summary["mode"] == "label:docs"


def test_the_prompt_names_the_gold_alias_the_documents_hold(tmp_path):
    only_alias = [TOP5[3], TOP5[0], TOP5[2]]
    src = write_trajs(tmp_path / "t", [traj("p#0", *PERU, [("peru founded", only_alias)])])
    _, train, val = build(tmp_path, src, label="docs", docs=2, degenerate_share=0.0, val_fraction=0.0)
    rows = rows_by_id(train, val)
    assert (
        rows["p#0#0:u"]["golden_answer"] == "City of Kings" and "Answer: City of Kings\n" in rows["p#0#0:u"]["prompt"]
    )
    # fewer answer-free documents than --docs: both rows shrink to the same k
    assert rows["p#0#0:u"]["completion"].count("Doc ") == rows["p#0#0:n"]["completion"].count("Doc ") == 2


def test_yes_no_golds_and_answerless_results_are_skipped_and_counted(tmp_path):
    rows = [
        traj("p#0", *PERU, [("capital of peru", TOP5)]),
        traj("y#0", "Is Lima in Peru?", ["yes"], [("lima peru", TOP5), ("lima", TOP5)]),
        traj("n#0", "Who wrote Hamlet?", ["Shakespeare"], [("hamlet", TOP5)]),  # nothing holds the answer
    ]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, label="docs", degenerate_share=0.0, val_fraction=0.0)
    assert summary["yes_no"] == 2 and summary["no_answer_docs"] == 1
    assert {r["question"] for r in train + val} == {PERU[0]}


def test_a_logged_degenerate_query_gives_one_answer_free_noisy_row(tmp_path):
    # the engine writes a query that names nothing from the noisy prompt, in either mode
    rows = [traj("p#0", *PERU, [("I need a fact", TOP5), ("capital of peru", TOP5)])]
    summary, train, val = build(tmp_path, write_trajs(tmp_path / "t", rows), label="docs", docs=3,
                                degenerate_share=0.0, val_fraction=0.0)
    rows = rows_by_id(train, val)
    assert set(rows) == {"p#0#0:n", "p#0#1:u", "p#0#1:n"}
    noisy = rows["p#0#0:n"]
    assert "Mode: noisy." in noisy["prompt"] and "Query: I need a fact\n" in noisy["prompt"]
    assert noisy["completion"] == prompts.format_documents([TOP5[0], TOP5[2], TOP5[4]])
    # docs data is never downsampled: a random cut would split pairs
    assert summary["degenerate_queries"] == 1 and summary["labels_after"] == {"useful": 1, "noisy": 2}


def test_placeholder_query_pairs_are_added_for_a_seeded_share(tmp_path):
    rows = [traj(f"p{i}#0", f"What is the capital of Peru, take {i}?", PERU[1], [("capital of peru", TOP5)])
            for i in range(40)]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, "a", label="docs", degenerate_share=0.25, val_fraction=0.0)
    extra = [r for r in train + val if "~" in r["id"]]
    assert all(r["id"].endswith("~:n") and r["label"] == "noisy" for r in extra)
    assert summary["degenerate_synthesized"] == len(extra) and 3 <= len(extra) <= 18
    for r in extra:
        assert r["query"] in prompts.DEGENERATE_QUERIES and metrics.is_degenerate_query(r["query"])
        assert not metrics.docs_hold_answer(prompts.parse_documents(r["completion"], 3)[0], PERU[1])
    assert summary["labels_after"] == {"useful": 40, "noisy": 40 + len(extra)}
    again, _, _ = build(tmp_path, src, "b", label="docs", degenerate_share=0.25, val_fraction=0.0)
    assert again["degenerate_synthesized"] == summary["degenerate_synthesized"]  # seeded
    none, _, _ = build(tmp_path, src, "c", label="docs", degenerate_share=0.0, val_fraction=0.0)
    assert none["degenerate_synthesized"] == 0


def test_pairs_stay_in_one_split(tmp_path):
    rows = [traj(f"p{i}#0", f"Question number {i} about Peru?", PERU[1], [(f"peru {i}", TOP5)]) for i in range(30)]
    src = write_trajs(tmp_path / "t", rows)
    _, train, val = build(tmp_path, src, label="docs", degenerate_share=0.0, val_fraction=0.3)
    assert train and val
    for part in (train, val):
        ids = {r["id"] for r in part}
        assert all(i[:-1] + ("n" if i.endswith("u") else "u") in ids for i in ids)


def test_answer_label_skips_yes_no_golds_instead_of_calling_them_noisy(tmp_path):
    rows = [traj("p#0", *PERU, [("capital of peru", TOP5[:2]), ("andes", TOP5[2:3])]),
            traj("y#0", "Is Lima in Peru?", ["yes"], [("lima peru", TOP5[:1])])]
    src = write_trajs(tmp_path / "t", rows)
    summary, train, val = build(tmp_path, src, label="answer", balance=False, val_fraction=0.0)
    assert summary["yes_no"] == 1 and {r["question"] for r in train + val} == {PERU[0]}


def test_outcome_label_on_question_as_query_searches(tmp_path):
    qsearch = [traj(f"q{i}#0", f"Question {i} about Peru?", PERU[1], [(f"Question {i} about Peru?", TOP5)])
               for i in range(3)]
    src = write_trajs(tmp_path / "qs", qsearch)
    out = tmp_path / "never"
    r = CliRunner().invoke(
        app, ["build-sft", "--trajectories", str(src), "--out", str(out), "--label", "outcome", "--quiet"]
    )
    assert r.exit_code == 2 and "question-as-query" in r.output and "--label docs" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    # mixed with a policy's trajectories: built, but the summary warns
    policy = [traj("w#0", *PERU, [("capital of peru", TOP5[:2])], em=1.0)]
    mixed = f"{src},{write_trajs(tmp_path / 'pol', policy)}"
    summary, _, _ = build(tmp_path, mixed, label="outcome", balance=False)
    assert summary["question_as_query"] == 3 and "question-as-query" in summary["warning"]


def test_docs_label_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path):
    src = write_trajs(tmp_path / "t", [traj("n#0", "Who wrote Hamlet?", ["Shakespeare"], [("hamlet", TOP5)])])
    out = tmp_path / "out"
    r = CliRunner().invoke(
        app, ["build-sft", "--trajectories", str(src), "--out", str(out), "--label", "docs", "--quiet"]
    )
    assert r.exit_code == 2 and "no search call gave a useful/noisy pair" in r.output
    assert len(r.output.strip().splitlines()) == 1 and not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["t"]  # no work folder left beside --out either
    with pytest.raises(BadInput, match="--degenerate-share"):
        build(tmp_path, src, label="docs", degenerate_share=1.5)


def test_cli_docs_label_json(tmp_path):
    src = write_trajs(tmp_path / "t", [traj("p#0", *PERU, [("capital of peru", TOP5)])])
    out = tmp_path / "sft"
    r = CliRunner().invoke(app, ["build-sft", "--trajectories", str(src), "--out", str(out), "--label", "docs",
                                 "--degenerate-share", "0", "--val-fraction", "0", "--json", "--quiet"])
    assert r.exit_code == 0, r.output
    summary = json.loads(r.output.strip().splitlines()[-1])
    assert summary["rows_train"] == 2 and pq.read_table(out / "train.parquet").num_rows == 2


def test_deep_results_give_several_pairs_when_asked(tmp_path):
    holding = [doc(f"Lima {i}", f"Lima fact number {i}.") for i in range(3)]
    free = [doc(f"Other {i}", f"Unrelated fact number {i}.") for i in range(6)]
    top9 = [holding[0], free[0], holding[1], free[1], free[2], holding[2], free[3], free[4], free[5]]
    src = write_trajs(tmp_path / "t", [traj("p#0", *PERU, [("capital of peru", top9)])])
    _, train, val = build(tmp_path, src, "three", label="docs", docs=2, pairs_per_search=3, degenerate_share=0.0,
                          val_fraction=0.0)
    rows = rows_by_id(train, val)
    expect = {
        "p#0#0": ([holding[0], holding[1]], [free[0], free[1]]),
        "p#0#0.1": ([holding[1], free[2]], [free[2], free[3]]),
        "p#0#0.2": ([holding[2], free[4]], [free[4], free[5]]),
    }
    assert set(rows) == {f"{i}:{m}" for i in expect for m in "un"}
    for i, (useful, noisy) in expect.items():
        assert rows[f"{i}:u"]["completion"] == prompts.format_documents(useful)
        assert rows[f"{i}:n"]["completion"] == prompts.format_documents(noisy)
        assert rows[f"{i}:n"]["prompt"] == prompts.render_simulator_prompt("capital of peru", PERU[0], "", "noisy", k=2)
    one, _, _ = build(tmp_path, src, "one", label="docs", docs=2, degenerate_share=0.0, val_fraction=0.0)
    assert one["labels_after"] == {"useful": 1, "noisy": 1}  # the default: one pair per search
    with pytest.raises(BadInput, match="--pairs-per-search"):
        build(tmp_path, src, "bad", label="docs", pairs_per_search=0)


def test_supporting_entities_are_searched_on_the_real_engine(tmp_path, monkeypatch):

    question = "What government position was held by the actress who starred in Kiss and Tell?"
    bench = tmp_path / "data" / "bench"
    bench.mkdir(parents=True)
    (bench / "hotpotqa.jsonl").write_text(json.dumps({
        "id": "dev_1", "question": question, "golden_answers": ["Chief of Protocol"],
        "supporting_docs": [{"title": "Shirley Temple", "text": "x", "is_supporting": True},
                            {"title": "Kiss and Tell (1945 film)", "text": "x", "is_supporting": True},
                            {"title": "Janet Waldo", "text": "x", "is_supporting": False}]}) + "\n")
    monkeypatch.setenv("ZSCTL_DATA_DIR", str(tmp_path / "data"))
    data.supporting_docs_index.cache_clear()
    corpus = tmp_path / "corpus.jsonl"
    passages = [("Shirley Temple", "Shirley Temple was an actress who later served as Chief of Protocol."),
                ("Kiss and Tell (1945 film)", "Kiss and Tell is a 1945 comedy film starring Shirley Temple."),
                ("Janet Waldo", "Janet Waldo was a voice actress."), ("Protocol", "Protocol governs diplomacy."),
                ("Temple", "A temple is a building for worship."), ("Film", "A film is a motion picture.")]
    corpus.write_text(
        "".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(passages))
    )
    logged = [doc(t, x) for t, x in passages[1:4]]  # the question's own search missed the answer
    src = write_trajs(tmp_path / "t", [traj("h#0", question, ["Chief of Protocol"], [(question, logged)])])
    try:
        summary, train, val = build(tmp_path, src, label="docs", docs=2, degenerate_share=0.0, val_fraction=0.0,
                                    search=f"bm25:{corpus}")
        again, _, _ = build(tmp_path, f"{src},{src}", "twice", label="docs", docs=2, degenerate_share=0.0,
                            search=f"bm25:{corpus}")
    finally:
        data.supporting_docs_index.cache_clear()
    # the entities named in the question's supporting documents were searched; only the answer hop pairs
    assert summary["entity_searches"] == 2 and summary["no_answer_docs"] == 2
    rows = rows_by_id(train, val)
    assert set(rows) == {"h#0@0#0:u", "h#0@0#0:n"} and rows["h#0@0#0:u"]["query"] == "Shirley Temple"
    assert rows["h#0@0#0:u"]["completion"].startswith("Doc 1: (Shirley Temple) Shirley Temple was an actress")
    assert again["entity_searches"] == 2  # once per question, however many trajectories ask it
    with pytest.raises(BadInput, match="--search is only used"):
        build(tmp_path, src, "bad", label="answer", search=f"bm25:{corpus}")


def test_the_simulator_template_travels_from_build_sft_through_train_sim_to_the_engine(tiny_model_dir, tmp_path):
    """build-sft --sim-template records the template; train-sim trains on its chat-wrapped prompts and
    records it again; `sim:` then feeds the model exactly the text it was trained on."""
    from zsctl import sft
    from zsctl.core.models import load_tokenizer
    from zsctl.search.base import QueryContext
    from zsctl.search.simulator import SimulatorEngine
    from zsctl.stages import train_sim

    src = write_trajs(tmp_path / "t", [traj(f"p{i}#0", f"{PERU[0]} ({i})", PERU[1], [("capital of peru", TOP5)])
                                       for i in range(4)])
    _, train, val = build(tmp_path, src, label="docs", docs=2, degenerate_share=0.0, val_fraction=0.0,
                          sim_template="zerosearch-sft")
    zs = prompts.load_template("zerosearch-sft", prompts.SIMULATOR_TEMPLATE)
    row = rows_by_id(train, val)["p0#0#0:u"]
    assert row["prompt"] == prompts.render_simulator_prompt("capital of peru", f"{PERU[0]} (0)", "Lima", "useful", 2,
                                                            zs)
    assert "Useful Output:" in row["prompt"]
    data_manifest = json.loads((tmp_path / "sft" / "manifest.json").read_text())
    assert prompts.SimTemplate.recorded(data_manifest) == prompts.SimTemplate(zs.useful, zs.noisy, "", zs.source)

    out = tmp_path / "sim"
    train_sim.run(train_sim.TrainSimConfig(data=str(tmp_path / "sft"), base=str(tiny_model_dir), out=str(out),
                                           max_steps=1, batch_size=2, val_limit=0))
    engine = SimulatorEngine(str(out))
    assert engine.template.useful == zs.useful and engine.template.system == ""
    ctx = QueryContext(f"{PERU[0]} (0)", PERU[1], "useful")
    rendered = engine.render("capital of peru", ctx, "useful", 2)
    assert rendered == row["prompt"]
    # what the engine feeds the model is, token for token, the prompt part train-sim trained on
    tok = load_tokenizer(str(tiny_model_dir))
    (chat,), special = train_sim.as_chat([[row]], prompts.SimTemplate.recorded(data_manifest), str(tiny_model_dir))
    assert not special and chat[0]["prompt"].startswith("<|im_start|>system")
    trained = sft.encode_example(tok, chat[0]["prompt"], row["completion"], mask_env=False,
                                 prompt_special_tokens=special)
    assert engine.encode(engine.model_input(rendered)) == trained["input_ids"][: trained["prompt_len"]]
    # a simulator whose manifest recorded no template falls back to the built-in one
    manifest = json.loads((out / "manifest.json").read_text())
    del manifest["sim_template"]
    (out / "manifest.json").write_text(json.dumps(manifest))
    assert SimulatorEngine(str(out)).template == prompts.SIMULATOR_TEMPLATE
    # a recorded template without its texts is bad input, not a silent fallback
    with pytest.raises(BadInput, match="sim_template"):
        prompts.SimTemplate.recorded({"kind": "simulator", "sim_template": {"useful": "x"}})


def test_sim_template_with_policy_data_is_bad_input(tmp_path):
    src = write_trajs(tmp_path / "t", [traj("p#0", *PERU, [("capital of peru", TOP5)])])
    with pytest.raises(BadInput, match="--sim-template"):
        build(tmp_path, src, target="policy", sim_template="zerosearch-sft")

"""Prompt styles and simulator templates: the upstream projects' formats, byte for byte.

The expected strings below are the formats Search-R1 and ZeroSearch use (document lines, the
information block, the fine-tuned simulator's prompt), written out from their documented behaviour.
"""

from __future__ import annotations

import json

import pytest
from transformers import PreTrainedTokenizerFast

from zsctl.core import prompts
from zsctl.core.errors import BadInput
from zsctl.search.base import Document

DOCS = [Document("Paris", "Paris is the capital of France."), Document("Lyon", "Lyon is a city.")]


def search_r1_passages(contents: list[str]) -> str:
    """Search-R1's client: each result's FlashRAG `contents` split at its first line (the quoted title)."""
    out = ""
    for i, c in enumerate(contents):
        lines = c.split("\n")
        out += f"Doc {i + 1}(Title: {lines[0]}) " + "\n".join(lines[1:]) + "\n"
    return out


def upstream_sft_prompt(query: str, question: str, answer: str, mode: str) -> str:
    """ZeroSearch's fine-tuned simulator prompt for one mode, as its trainer writes it."""
    return ("You are the Google search engine.\n"
            f"Given a query, you need to generate five {mode} documents for the query.\n\n"
            f'The user is trying to answer the question: "{question}" whose answer is {answer}.\n'
            f"Each document should contain about 30 words, and these documents should contain {mode} information.\n\n"
            f"Query: {query}\n{mode.capitalize()} Output:\n")


@pytest.mark.parametrize("style, expected", [
    ("zsctl", "Doc 1: (Paris) Paris is the capital of France.\nDoc 2: (Lyon) Lyon is a city."),
    ("search-r1", 'Doc 1(Title: "Paris") Paris is the capital of France.\nDoc 2(Title: "Lyon") Lyon is a city.'),
    ("zerosearch", "Doc 1: Paris is the capital of France.\nDoc 2: Lyon is a city."),
])
def test_information_block_per_style(style, expected):
    assert prompts.style_of(style).information_block(DOCS) == f"\n\n<information>{expected}</information>\n\n"


def test_search_r1_lines_equal_its_client_on_flashrag_contents():
    contents = [f'"{d.title}"\n{d.text}' for d in DOCS]
    # the client strips the joined lines before inserting them
    assert prompts.style_of("search-r1").format_documents(DOCS) == search_r1_passages(contents).strip()


def test_empty_results_per_style():
    assert prompts.style_of("search-r1").information_block([]) == "\n\n<information></information>\n\n"
    assert "No information available" in prompts.style_of("zerosearch").information_block([])
    assert prompts.information_block([]) == prompts.style_of("zsctl").information_block([])


def test_upstream_styles_send_one_user_message_with_a_question_mark(tiny_model_dir):
    tok = PreTrainedTokenizerFast.from_pretrained(tiny_model_dir)
    for style in ("search-r1", "zerosearch"):
        messages = prompts.policy_messages("who wrote hamlet", style=style)
        assert [m["role"] for m in messages] == ["user"]
        assert messages[0]["content"].endswith("Question: who wrote hamlet?\n")
        text = prompts.render_policy_prompt(tok, "who wrote hamlet", style=style)
        assert text == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert "<|im_start|>system" not in text
    zsctl = prompts.policy_messages("who wrote hamlet")
    assert zsctl[0] == {"role": "system", "content": prompts.POLICY_SYSTEM} and zsctl[1]["content"].endswith("hamlet")


def test_unknown_style_is_one_line():
    with pytest.raises(BadInput, match="prompt style 'r1' is not one of zsctl, search-r1, zerosearch"):
        prompts.style_of("r1")


def test_prompt_from_data_needs_the_column():
    rows = [{"prompt": json.dumps([{"role": "user", "content": "hi"}])}, {"prompt": None}]
    with pytest.raises(BadInput, match="1 of 2 questions have no 'prompt'"):
        prompts.chats_from_data(rows, "nq")
    assert prompts.chats_from_data(rows[:1], "x") == [[{"role": "user", "content": "hi"}]]


def test_chat_without_template_warns_once(capsys):
    class Plain:
        chat_template = None

    msgs = [{"role": "system", "content": ""}, {"role": "user", "content": "Query: x"}]
    assert prompts.render_chat(Plain(), msgs, who="simulator m") == "Query: x"
    prompts.render_chat(Plain(), msgs, who="simulator m")
    err = capsys.readouterr().err
    assert err.count("warning: simulator m has no chat template") == 1 and err.count("\n") == 1


# --- simulator templates ------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["useful", "noisy"])
def test_shipped_zerosearch_template_is_the_official_prompt_byte_for_byte(mode):
    tpl = prompts.load_template("zerosearch-sft", prompts.SIMULATOR_TEMPLATE)
    q, question, answer = "hamlet author", "Who wrote Hamlet?", "William Shakespeare"
    got = prompts.render_simulator_prompt(q, question, answer, mode, 3, tpl)
    assert got == upstream_sft_prompt(q, question, answer, mode)
    assert got.encode() == upstream_sft_prompt(q, question, answer, mode).encode()
    # served as a chat: an empty system message, then the prompt as the user turn
    assert tpl.system == "" and tpl.messages(got) == [
        {"role": "system", "content": ""},
        {"role": "user", "content": got},
    ]


def test_template_file_one_text_per_mode_and_system(tmp_path):
    f = tmp_path / "t.yaml"
    f.write_text('system: "Be a search engine."\nuseful: "U {Mode}: {query} {k}\\n"\nnoisy: "N {mode}: {query}\\n"\n')
    tpl = prompts.load_template(str(f), prompts.SIMULATOR_TEMPLATE)
    assert prompts.render_simulator_prompt("q", "Q", "A", "useful", 2, tpl) == "U Useful: q 2\n"
    assert prompts.render_simulator_prompt("q", "Q", "A", "noisy", 2, tpl) == "N noisy: q\n"
    assert tpl.system == "Be a search engine."
    plain = tmp_path / "t.txt"
    plain.write_text("{Mode} docs for {query}")
    assert (
        prompts.render_simulator_prompt("q", "Q", "A", "noisy", 2, prompts.load_template(str(plain), ""))
        == "Noisy docs for q"
    )


@pytest.mark.parametrize("body, suffix, match", [
    ("{problem} {query}", ".txt", r"unknown field\(s\) \['problem'\]"),
    ("template: x\nextra: y\n", ".yaml", r"unknown key\(s\) \['extra'\]"),
    ("useful: only one\n", ".yaml", "needs 'template'"),
    ("[1, 2]", ".json", "must hold a mapping"),
])
def test_bad_template_files(tmp_path, body, suffix, match):
    f = tmp_path / f"bad{suffix}"
    f.write_text(body)
    with pytest.raises(BadInput, match=match) as e:
        prompts.load_template(str(f), prompts.SIMULATOR_TEMPLATE)
    assert "\n" not in str(e.value)


def test_in_process_simulator_chats_with_a_system_template(tiny_model_dir, capsys):
    from zsctl.core.models import load_model
    from zsctl.search.base import QueryContext
    from zsctl.search.simulator import SimulatorEngine

    model, tok = load_model(str(tiny_model_dir))
    engine = SimulatorEngine("tiny", model=model, tokenizer=tok, template="zerosearch-sft", max_new_tokens=8)
    prompt = upstream_sft_prompt("hamlet author", "Who wrote Hamlet?", "Shakespeare", "useful")
    messages = [{"role": "system", "content": ""}, {"role": "user", "content": prompt}]
    assert engine.model_input(prompt) == tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    (result,) = engine.search(["hamlet author"], 3, [QueryContext("Who wrote Hamlet?", ["Shakespeare"], "useful")])
    assert result.prompt == prompt and len(result.docs) == 3
    tok.chat_template = None  # a model without a chat template: said once, on stderr
    engine.model_input(prompt)
    engine.model_input(prompt)
    assert capsys.readouterr().err.count("warning: simulator sim:tiny has no chat template") == 1

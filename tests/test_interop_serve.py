"""`zsctl serve` under the upstream projects' own client logic, unchanged.

The clients below are re-implemented from the projects' documented API (request and response
shapes, how they format what comes back), not copied: Search-R1's trainer posts a whole rollout
batch to /retrieve and writes `Doc i(Title: ...)` lines from FlashRAG `contents`; ZeroSearch's wiki
client posts one `{query, top_k}` and reads a list of `{text}`; its simulator client sends a chat
with an empty system message and the prompt as a list of text parts.
"""

from __future__ import annotations

import json

import httpx
import pytest

from conftest import free_port, script_model, serving, wait_until_healthy
from test_interop_prompts import search_r1_passages, upstream_sft_prompt
from test_interop_sim_http import vllm_like_app
from zsctl.core import prompts
from zsctl.core.models import load_model
from zsctl.search import make_engine
from zsctl.search.base import QueryContext
from zsctl.search.simulator import SimulatorEngine
from zsctl.stages.serve import Caps, make_app, start_in_thread

ROLLOUT_BATCH = 512 * 5  # Search-R1's default: 512 prompts, 5 responses each, searched in one request
WORDS = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliet"]


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text("".join(json.dumps({"id": f"wiki-{i}", "title": w.title(), "text": f"{w} is word {i} of the list"})
                            + "\n" for i, w in enumerate(WORDS)))
    return path


# --- the upstream clients ------------------------------------------------------------------------


def searchr1_batch_search(url: str, queries: list[str], topk) -> list:
    """Search-R1's trainer: one POST with every query of the rollout batch, scores asked for."""
    return httpx.post(url, json={"queries": queries, "topk": topk, "return_scores": True}, timeout=300).json()["result"]


def zerosearch_wiki(url: str, query: str, topk: int) -> str:
    """ZeroSearch's wiki client: one query per POST, a list of documents back, their text used."""
    docs = httpx.post(url, json={"query": query, "top_k": topk}, timeout=60).json()
    return "\n".join(f"Doc {i + 1}: {doc['text']}" for i, doc in enumerate(docs))


def zerosearch_ask_llm(base: str, prompt: str, temperature: float, topk: int) -> str:
    """ZeroSearch's simulator client: a chat (empty system message, the prompt as a text part) to
    an OpenAI-style server with model '', then its cut at the first document too many."""
    body = {"model": "", "max_tokens": 600, "temperature": temperature,
            "messages": [{"role": "system", "content": ""},
                         {"role": "user", "content": [{"type": "text", "text": prompt}]}]}
    reply = httpx.post(f"{base}/v1/chat/completions", json=body, timeout=120).json()["choices"][0]["message"]["content"]
    return reply.replace("\n\n", "\n").split(f"Doc {topk + 1}")[0]


# --- Search-R1 -----------------------------------------------------------------------------------


def test_a_whole_search_r1_rollout_batch_in_one_request(corpus):
    engine = make_engine(f"bm25:{corpus}")
    queries = [f"{WORDS[i % len(WORDS)]} question {i}" for i in range(ROLLOUT_BATCH)]
    with serving(make_app(engine)) as url:
        result = searchr1_batch_search(f"{url}/retrieve", queries, 3)
    assert len(result) == ROLLOUT_BATCH and all(len(items) == 3 for items in result)
    for i in (0, 1, ROLLOUT_BATCH - 1):
        docs = engine.search([queries[i]], 3)[0].docs
        # the trainer's passage lines are our search-r1 style's lines for the same documents
        assert search_r1_passages([it["document"]["contents"] for it in result[i]]).strip() == \
            prompts.style_of("search-r1").format_documents(docs)
        # document ids are the corpus ids
        assert [it["document"]["id"] for it in result[i]] == [d.id for d in docs]
        assert result[i][0]["document"]["id"] == f"wiki-{i % len(WORDS)}"


@pytest.mark.parametrize("topk", [None, 0])
def test_topk_null_or_zero_means_the_server_default(corpus, topk):
    with serving(make_app(make_engine(f"bm25:{corpus}"), default_topk=4)) as url:
        result = searchr1_batch_search(f"{url}/retrieve", ["alpha", "golf"], topk)
        missing = httpx.post(f"{url}/retrieve", json={"queries": ["alpha"]}).json()["result"]
    assert [len(items) for items in result] == [4, 4] and len(missing[0]) == 4


def test_requests_over_the_caps_are_refused_in_one_line(corpus):
    with serving(make_app(make_engine(f"bm25:{corpus}"))) as url:
        too_many = httpx.post(f"{url}/retrieve", json={"queries": ["a"] * (Caps().max_queries + 1)}, timeout=60)
        negative = httpx.post(f"{url}/retrieve", json={"queries": ["a"], "topk": -1})
    assert too_many.status_code == 413 and str(Caps().max_queries) in too_many.json()["detail"]
    assert negative.status_code == 400 and "topk" in negative.json()["detail"]
    assert Caps().max_queries >= ROLLOUT_BATCH


def test_simulated_engine_gets_each_querys_question_and_answer(servers_sim):
    backend, serve_url = servers_sim
    body = {"queries": ["hamlet author", "peru capital"], "topk": 3, "return_scores": True,
            "questions": ["Who wrote Hamlet?", "What is the capital of Peru?"],
            "golden_answers": [["William Shakespeare", "Shakespeare"], "Lima"], "noise": "useful"}
    r = httpx.post(f"{serve_url}/retrieve", json=body, timeout=60)
    assert r.status_code == 200, r.text
    sent = [b["messages"][1]["content"] for b in backend.state.bodies]
    assert sorted(sent) == sorted([
        upstream_sft_prompt("hamlet author", "Who wrote Hamlet?", "William Shakespeare", "useful"),
        upstream_sft_prompt("peru capital", "What is the capital of Peru?", "Lima", "useful")])


@pytest.fixture()
def servers_sim():
    backend = vllm_like_app("Doc 1: It is so.\nDoc 2: Also so.\nDoc 3: Still so.")
    server, backend_url = start_in_thread(backend)
    backend.state.server = server
    engine = make_engine(f"sim+{backend_url}/v1", template="zerosearch-sft")
    try:
        with serving(make_app(engine)) as url:
            yield backend, url
    finally:
        engine.close()
        server.should_exit = True
        server.thread.join(timeout=10)


def test_a_simulated_request_without_questions_is_warned_about_once(servers_sim, capsys, monkeypatch):
    monkeypatch.setattr(prompts, "_warned", set())  # an earlier test in this process may have warned already
    _, url = servers_sim
    for _ in range(2):
        assert httpx.post(f"{url}/retrieve", json={"queries": ["q"], "topk": 3}, timeout=60).status_code == 200
    assert capsys.readouterr().err.count("no 'questions'") == 1


# --- ZeroSearch ----------------------------------------------------------------------------------


def test_zerosearch_wiki_client(corpus):
    engine = make_engine(f"bm25:{corpus}")
    with serving(make_app(engine)) as url:
        text = zerosearch_wiki(f"{url}/retrieve", "golf", 3)
        bad = httpx.post(f"{url}/retrieve", json={"query": "golf", "queries": ["golf"]})
    assert text == prompts.style_of("zerosearch").format_documents(engine.search(["golf"], 3)[0].docs)
    assert text.startswith("Doc 1: golf is word 6")
    assert bad.status_code == 400 and "either" in bad.json()["detail"]


def test_zerosearch_simulator_client_over_chat_completions(tiny_model_dir):
    model, tok = load_model(str(tiny_model_dir))
    reply = "Doc 1: Hamlet is a play.\n\nDoc 2: By Shakespeare.\n\nDoc 3: x\nDoc 4: y"
    script_model(model, tok, {"hamlet author": [reply, reply]})  # one reply per client below
    app = make_app(SimulatorEngine("tiny", model=model, tokenizer=tok), model, tok, model_name="sim")
    prompt = upstream_sft_prompt("hamlet author", "Who wrote Hamlet?", "Shakespeare", "useful")
    with serving(app) as url:
        assert zerosearch_ask_llm(url, prompt, 0.0, 3) == "Doc 1: Hamlet is a play.\nDoc 2: By Shakespeare.\nDoc 3: x\n"
        # and our own client, the way it talks to a released simulator
        engine = make_engine(f"sim+{url}/v1", template="zerosearch-sft")
        (result,) = engine.search(["hamlet author"], 3, [QueryContext("Who wrote Hamlet?", ["Shakespeare"], "useful")])
        engine.close()
    assert [d.text for d in result.docs] == ["Hamlet is a play.", "By Shakespeare.", "x"]


def test_the_zsctl_serve_command_with_both_clients(corpus, tmp_path):
    """The command itself, in its own process, with its default caps and --topk."""
    import os
    import signal
    import subprocess
    import sys

    port = free_port()
    env = {**os.environ, "ZSCTL_CACHE_DIR": str(tmp_path / "cache")}
    command = [sys.executable, "-m", "zsctl.cli", "serve", "--search", f"bm25:{corpus}", "--port", str(port),
               "--topk", "2", "--quiet"]
    proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_healthy(proc, url)
        queries = [f"{WORDS[i % len(WORDS)]} question {i}" for i in range(ROLLOUT_BATCH)]
        result = searchr1_batch_search(f"{url}/retrieve", queries, None)
        assert len(result) == ROLLOUT_BATCH and {len(items) for items in result} == {2}
        assert zerosearch_wiki(f"{url}/retrieve", "hotel", 1) == "Doc 1: hotel is word 7 of the list"
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)

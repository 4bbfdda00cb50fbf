"""`zsctl serve` on real local ports: the Search-R1 /retrieve API over BM25 and the simulator, the
OpenAI-style completions endpoint, `sim+http://` against it (two endpoints), caps, failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from conftest import ROOT, free_port, script_model, serving, wait_until_healthy
from zsctl.core.errors import BadInput, RunFailure
from zsctl.core.models import load_model
from zsctl.search import make_engine
from zsctl.search.base import QueryContext
from zsctl.search.simulator import SimulatorEngine, make_sim_http
from zsctl.stages.serve import Caps, make_app, start_in_thread

PASSAGES = [
    ("Lima", "Lima is the capital and largest city of Peru, on the Pacific coast."),
    ("Hamlet", "Hamlet is a tragedy written by William Shakespeare around 1600."),
    ("Mount Everest", "Mount Everest is Earth's highest mountain above sea level, in the Himalayas."),
    ("Photosynthesis", "Photosynthesis turns light energy into chemical energy in plants."),
]
QUESTIONS = {  # question -> (query, gold)
    "Who wrote Hamlet?": ("hamlet author", "Shakespeare"),
    "What is the capital of Peru?": ("peru capital", "Lima"),
    "Which is the highest mountain?": ("highest mountain", "Everest"),
    "What do plants turn light into?": ("photosynthesis product", "chemical energy"),
}


def _script(question: str) -> str:
    query, gold = QUESTIONS[question]
    return f"Doc 1: ({query}) It is {gold}.\nDoc 2: (Other) Not {gold} here."


@pytest.fixture()
def corpus(tmp_path):
    path = tmp_path / "corpus.jsonl"
    path.write_text(
        "".join(json.dumps({"id": str(i), "title": t, "text": x}) + "\n" for i, (t, x) in enumerate(PASSAGES))
    )
    return path


def _tiny(tiny_model_dir, scripted=True, extra=None):
    model, tok = load_model(str(tiny_model_dir))
    if scripted:
        script_model(model, tok, {**{q: [_script(q)] for q in QUESTIONS}, **(extra or {})})
    return model, tok


def test_retrieve_over_bm25(corpus):
    app = make_app(make_engine(f"bm25:{corpus}"))
    with serving(app) as url:
        assert httpx.get(f"{url}/health").json()["status"] == "ok"
        r = httpx.post(f"{url}/retrieve", json={"queries": ["capital of Peru", "who wrote Hamlet"], "topk": 2,
                                                "return_scores": True})
        assert r.status_code == 200
        result = r.json()["result"]
        assert [len(items) for items in result] == [2, 2]
        top = result[0][0]
        assert top["document"]["contents"] == f'"Lima"\n{PASSAGES[0][1]}' and top["document"]["id"]
        assert result[1][0]["document"]["contents"].startswith('"Hamlet"\n')
        assert top["score"] >= result[0][1]["score"]
        plain = httpx.post(f"{url}/retrieve", json={"queries": ["capital of Peru"], "topk": 1}).json()["result"]
        assert plain == [[top["document"]]]  # without scores the items are the documents themselves
        r = httpx.post(f"{url}/retrieve", json={"queries": ["x"], "noise": "noisy"})
        assert r.status_code == 400 and "simulated" in r.json()["detail"]


def test_retrieve_over_simulator_with_contexts_and_noise(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir)
    engine = SimulatorEngine("tiny", model=model, tokenizer=tok)
    answered = []  # the server's search results, prompts included
    search = engine.search
    engine.search = lambda *a, **kw: answered.extend(search(*a, **kw)) or answered[-len(a[0]):]
    app = make_app(engine)
    questions = list(QUESTIONS)[::-1]
    with serving(app) as url:
        body = {"queries": [QUESTIONS[q][0] for q in questions], "topk": 2, "return_scores": True,
                "questions": questions, "golden_answers": [[QUESTIONS[q][1], "alias"] for q in questions],
                "noise": "useful"}
        r = httpx.post(f"{url}/retrieve", json=body, timeout=60)
        assert r.status_code == 200, r.text
        data = r.json()
    assert data["modes"] == ["useful"] * 4
    for q, items, prompt in zip(questions, data["result"], [r.prompt for r in answered]):
        query, gold = QUESTIONS[q]
        assert items[0]["document"]["contents"] == f'"{query}"\nIt is {gold}.'
        assert f"Question: {q}\nAnswer: {gold}\n" in prompt and "Mode: useful." in prompt


def test_completions_endpoint(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir, extra={"long story": ["one two three four five six seven eight"]})
    app = make_app(SimulatorEngine("tiny", model=model, tokenizer=tok), model, tok, model_name="tiny-sim")
    questions = list(QUESTIONS)
    with serving(app) as url:
        assert httpx.get(f"{url}/v1/models").json()["data"][0]["id"] == "tiny-sim"
        r = httpx.post(f"{url}/v1/completions", timeout=60, json={
            "model": "tiny-sim", "prompt": [f"Question: {q}\n" for q in questions], "max_tokens": 60,
            "temperature": 0, "stop": ["Doc 2:"]})
        assert r.status_code == 200, r.text
        choices = r.json()["choices"]
        assert [c["index"] for c in choices] == [0, 1, 2, 3]
        for q, c in zip(questions, choices):
            assert c["text"] == _script(q).split("Doc 2:")[0] and c["finish_reason"] == "stop"
        short = httpx.post(f"{url}/v1/completions", timeout=60,
                           json={"prompt": "a long story", "max_tokens": 3, "temperature": 0}).json()
        assert short["choices"][0]["finish_reason"] == "length" and short["usage"]["completion_tokens"] == 3
        r = httpx.post(f"{url}/v1/completions", json={"model": "other", "prompt": "x"})
        assert r.status_code == 404 and "tiny-sim" in r.json()["detail"]


def test_sim_http_load_balances_over_two_servers(tiny_model_dir):
    apps = [make_app(SimulatorEngine("tiny", model=m, tokenizer=t), m, t, model_name="tiny-sim")
            for m, t in (_tiny(tiny_model_dir), _tiny(tiny_model_dir))]
    with serving(apps[0]) as url_a, serving(apps[1]) as url_b:
        engine = make_sim_http(f"sim+{url_a},{url_b}/v1", batch_size=8)  # a bare address gets /v1
        assert engine.model_name == "tiny-sim"
        questions = list(QUESTIONS)
        ctxs = [QueryContext(q, [QUESTIONS[q][1]], m) for q, m in zip(questions, ["useful", "noisy"] * 2)]
        results = engine.search([QUESTIONS[q][0] for q in questions], k=2, contexts=ctxs)
        for q, r in zip(questions, results):  # order kept across the two servers
            docs = r.docs
            query, gold = QUESTIONS[q]
            assert (docs[0].title, docs[0].text, docs[1].text) == (query, f"It is {gold}.", f"Not {gold} here.")
        assert [r.mode for r in results] == ["useful", "noisy"] * 2 and [r.well_formed for r in results] == [True] * 4
        # the four prompts were split over both endpoints: one request of two prompts each
        assert [a.state.requests["completions"] for a in apps] == [1, 1]
        assert engine.requests_per_url == {f"{url_a}/v1": 1, f"{url_b}/v1": 1}
        engine.search(["one"], k=2, contexts=[QueryContext(questions[0], ["x"])])
        engine.search(["two"], k=2, contexts=[QueryContext(questions[1], ["y"])])
        assert [a.state.requests["completions"] for a in apps] == [2, 2]  # single prompts alternate
        assert engine.stats.calls == 6 and engine.stats.retries == 0
        engine.close()


def test_concurrent_retrieve_calls_reach_a_sim_http_backend_together():
    """serve holds no lock around /retrieve: four requests over a sim+http backend are at the backend
    at the same time (it answers only once all four arrived), and each gets its own modes back."""
    from test_search import http_server

    n = 4
    arrived = threading.Barrier(n, timeout=30)

    def completions(request, _):
        if request["path"].endswith("/models"):
            return 200, {"data": [{"id": "sim"}]}
        try:
            arrived.wait()
        except threading.BrokenBarrierError:
            return 400, {"detail": "the requests came one at a time"}
        return 200, {"choices": [{"index": i, "text": f"Doc 1: (T) {p.split('Query: ')[-1][:2]}"}
                                 for i, p in enumerate(request["body"]["prompt"])]}

    def retrieve(i: int) -> httpx.Response:
        body = {"queries": [f"q{i}"] * 2, "topk": 1, "noise": ["useful", "noisy"][i % 2]}
        return httpx.post(f"{url}/retrieve", json=body, timeout=60)

    with http_server(completions) as (backend, _):
        engine = make_sim_http(f"sim+{backend}/v1?tries=1")
        with serving(make_app(engine)) as url, ThreadPoolExecutor(n) as pool:
            replies = list(pool.map(retrieve, range(n)))
        engine.close()
    assert [r.status_code for r in replies] == [200] * n, replies[0].text
    for i, r in enumerate(replies):
        assert r.json()["modes"] == [["useful", "noisy"][i % 2]] * 2
        assert [items[0]["contents"] for items in r.json()["result"]] == [f'"T"\nq{i}'] * 2


def test_request_caps_and_validation(corpus, tiny_model_dir):
    model, tok = _tiny(tiny_model_dir, scripted=False)
    caps = Caps(max_queries=2, max_query_chars=20, max_tokens=8, max_body_bytes=5000)
    app = make_app(make_engine(f"bm25:{corpus}"), model, tok, caps, model_name="tiny")
    with serving(app) as url:
        post = lambda path, body: httpx.post(f"{url}{path}", json=body, timeout=30)  # noqa: E731
        cases = [
            ("/retrieve", {"queries": ["a", "b", "c"]}, 413, "at most 2"),
            ("/retrieve", {"queries": ["x" * 21]}, 413, "20 characters"),
            ("/retrieve", {"queries": ["a"], "topk": -1}, 400, "topk"),  # 0 or null: the default
            ("/retrieve", {"queries": ["a"], "golden_answers": [["x"], ["y"]]}, 400, "golden_answers"),
            ("/retrieve", {"topk": 3}, 400, "queries"),
            ("/retrieve", {"queries": "not a list"}, 422, "queries"),
            ("/retrieve", {"queries": ["a"] * 2000}, 413, "bytes"),
            ("/v1/completions", {"prompt": "hi", "max_tokens": 9}, 400, "max_tokens"),
            ("/v1/completions", {"prompt": ["a", "b", "c"]}, 413, "at most 2"),
            ("/v1/completions", {"prompt": "hi", "n": 2, "max_tokens": 2}, 400, "n=1"),
            ("/v1/completions", {"max_tokens": 2}, 422, "prompt"),
        ]
        for path, body, code, words in cases:
            r = post(path, body)
            assert r.status_code == code, (body, r.text)
            assert words in json.dumps(r.json()["detail"]), r.text
        r = httpx.post(f"{url}/retrieve", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 422
        assert httpx.get(f"{url}/health").status_code == 200  # still serving


def test_endpoint_down_is_bad_input_naming_the_url():
    url = f"http://127.0.0.1:{free_port()}/v1"
    with pytest.raises(BadInput, match=url.replace(".", r"\.")):
        make_sim_http(f"sim+{url}")
    with pytest.raises(BadInput, match="sim\\+http://HOST"):
        make_sim_http("sim+ftp://x")


def test_endpoint_dying_mid_run_fails_after_retries_and_serve_says_502(tiny_model_dir):
    model, tok = _tiny(tiny_model_dir)
    server, url = start_in_thread(make_app(SimulatorEngine("tiny", model=model, tokenizer=tok), model, tok,
                                           model_name="tiny"))
    engine = make_sim_http(f"sim+{url}/v1?tries=2&timeout=5&backoff=0.1")
    server.should_exit = True
    server.thread.join(timeout=10)
    with pytest.raises(RunFailure, match=f"{url}/v1/completions failed after 2 attempt"):
        engine.search(["q"], k=2, contexts=[QueryContext(list(QUESTIONS)[0], ["x"])])
    assert engine.stats.retries == 1 and engine.stats.errors == 1
    with serving(make_app(engine)) as front:  # a server whose engine fails answers 502, and lives on
        r = httpx.post(f"{front}/retrieve", json={"queries": ["q"]}, timeout=30)
        assert r.status_code == 502 and url in r.json()["detail"]
        assert httpx.get(f"{front}/health").status_code == 200


def test_serve_command_end_to_end(corpus):
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "zsctl.cli", "serve", "--search", f"bm25:{corpus}", "--port", str(port), "--quiet"],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        wait_until_healthy(proc, f"http://127.0.0.1:{port}")
        r = httpx.post(f"http://127.0.0.1:{port}/retrieve", json={"queries": ["highest mountain"], "topk": 1})
        assert r.json()["result"][0][0]["contents"].startswith('"Mount Everest"')
        # a second server on the same port: one line, exit 2
        taken = subprocess.run(
            [sys.executable, "-m", "zsctl.cli", "serve", "--search", f"bm25:{corpus}", "--port", str(port)],
            env=env, capture_output=True, text=True, timeout=60,
        )
        assert taken.returncode == 2 and str(port) in taken.stderr and len(taken.stderr.strip().splitlines()) == 1
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
    assert proc.returncode == 0

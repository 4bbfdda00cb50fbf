"""`sim+http:` against OpenAI-compatible servers as released simulators are served: a real local
server that refuses more than four stop strings (as vLLM's does), speaks chat completions, and dies
in the middle of a run."""

from __future__ import annotations

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from test_interop_prompts import upstream_sft_prompt
from zsctl.core.errors import BadInput, RunFailure
from zsctl.search import make_engine
from zsctl.search.base import QueryContext
from zsctl.stages.serve import start_in_thread

STOP_CAP = 4
SERVED = "released-sim"


def vllm_like_app(reply: str, die_after: int | None = None):
    """/v1/models, /v1/completions and /v1/chat/completions; HTTP 400 for more than STOP_CAP stop
    strings; after `die_after` answered requests the server shuts itself down."""
    app = FastAPI()
    app.state.bodies = []

    def refuse(body):
        stop = body.get("stop") or []
        if len(stop) > STOP_CAP:
            return JSONResponse({"object": "error", "message": f"at most {STOP_CAP} stop strings"}, status_code=400)
        app.state.bodies.append(body)
        if die_after is not None and len(app.state.bodies) >= die_after:
            app.state.server.should_exit = True
        return None

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": SERVED, "object": "model"}]}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await request.json()
        bad = refuse(body)
        if bad:
            return bad
        prompts = body["prompt"] if isinstance(body["prompt"], list) else [body["prompt"]]
        return {"choices": [{"index": i, "text": reply, "finish_reason": "stop"} for i in range(len(prompts))]}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        bad = refuse(body)
        if bad:
            return bad
        return {"choices": [{"index": 0, "message": {"role": "assistant", "content": reply}, "finish_reason": "stop"}]}

    return app


@pytest.fixture()
def servers():
    started = []

    def start(reply: str, die_after: int | None = None):
        app = vllm_like_app(reply, die_after)
        server, url = start_in_thread(app)
        app.state.server = server
        started.append(server)
        return app, f"{url}/v1"

    yield start
    for s in started:
        s.should_exit = True
        s.thread.join(timeout=10)


# Our tuned format, with a line after the documents that only a stop string beyond the first four cuts.
TUNED_REPLY = (
    "Doc 1: (Paris) Paris is the capital.\nDoc 2: (Lyon) Lyon.\nDoc 3: (Nice) Nice.\nExample (mode noisy) junk"
)
# A released simulator's way: blank lines between documents, and more documents than asked.
RELEASED_REPLY = "Doc 1: Paris is the capital.\n\nDoc 2: Lyon is a city.\n\nDoc 3: Nice.\n\nDoc 4: extra"


def _ctx(n: int) -> list[QueryContext]:
    return [QueryContext(f"Question {i}?", [f"answer {i}"], "useful") for i in range(n)]


def test_at_most_four_stop_strings_are_sent_and_the_rest_cut_here(servers):
    app, url = servers(TUNED_REPLY)
    engine = make_engine(f"sim+{url}?temperature=0.7&top_p=0.9")
    results = engine.search(["capital of france"], 3, _ctx(1))
    (body,) = app.state.bodies
    assert len(body["stop"]) == STOP_CAP and len(engine.stops(3)) > STOP_CAP
    assert [d.text for d in results[0].docs] == ["Paris is the capital.", "Lyon.", "Nice."]
    assert "junk" not in results[0].text and results[0].well_formed
    # the engine's own sampling settings go in the request; no extension field unless asked for
    assert (body["temperature"], body["top_p"], body["model"]) == (0.7, 0.9, SERVED)
    assert "no_repeat_ngram_size" not in body
    engine.close()
    engine = make_engine(f"sim+{url}?no_repeat=3")
    engine.search(["q"], 3, _ctx(1))
    assert app.state.bodies[-1]["no_repeat_ngram_size"] == 3
    engine.close()


def test_doc_words_cuts_what_a_server_writes(servers):
    # a server cannot stop a document at the length the simulator trained on: the reply is cut here
    app, url = servers(TUNED_REPLY)
    engine = make_engine(f"sim+{url}?doc_words=2")
    (r,) = engine.search(["capital of france"], 3, _ctx(1))
    assert [d.text for d in r.docs] == ["Paris is", "Lyon.", "Nice."]
    engine.close()
    with pytest.raises(BadInput, match="doc_words=-1"):
        make_engine(f"sim+{url}?doc_words=-1")


def test_released_simulator_is_sent_as_a_chat_with_its_exact_prompt(servers):
    app, url = servers(RELEASED_REPLY)
    engine = make_engine(f"sim+{url}", template="zerosearch-sft")
    assert engine.api == "chat"
    ctx = [QueryContext("Who wrote Hamlet?", ["William Shakespeare", "Shakespeare"], "noisy")]
    (result,) = engine.search(["hamlet author"], 3, ctx)
    (body,) = app.state.bodies
    assert body["messages"] == [
        {"role": "system", "content": ""},
        {
            "role": "user",
            "content": upstream_sft_prompt("hamlet author", "Who wrote Hamlet?", "William Shakespeare", "noisy"),
        },
    ]
    assert body["stop"] == ["Doc 4"]  # cut where ZeroSearch cuts a reply
    assert [d.text for d in result.docs] == ["Paris is the capital.", "Lyon is a city.", "Nice."]
    assert result.mode == "noisy"
    engine.close()


def test_a_dead_endpoint_hands_its_work_to_the_live_one(servers):
    dying, url_a = servers(TUNED_REPLY, die_after=1)
    alive, url_b = servers(TUNED_REPLY)
    engine = make_engine(f"sim+{url_a},{url_b}?batch_size=2&tries=1&backoff=0&cooldown=600")
    engine.search(["first"], 3, _ctx(1))  # the run's first search goes to A, which then shuts down
    dying.state.server.thread.join(timeout=10)
    assert len(dying.state.bodies) == 1 and not alive.state.bodies
    queries = [f"query {i}" for i in range(8)]
    results = engine.search(queries, 3, _ctx(8))  # four requests, those for A fail over to B
    assert all(len(r.docs) == 3 and r.docs[0].text == "Paris is the capital." for r in results)
    assert len(alive.state.bodies) == 4 and engine.failovers >= 1
    # A rests: the next search goes to B alone, without failing on A first
    failovers = engine.failovers
    engine.search(queries[:4], 3, _ctx(4))
    assert engine.failovers == failovers and len(alive.state.bodies) == 6
    engine.close()


def test_every_endpoint_dead_is_a_run_failure(servers):
    app, url = servers(TUNED_REPLY, die_after=1)
    engine = make_engine(f"sim+{url}?tries=1&backoff=0")
    engine.search(["q"], 3, _ctx(1))
    app.state.server.thread.join(timeout=10)
    with pytest.raises(RunFailure, match="every simulator endpoint failed"):
        engine.search(["q"], 3, _ctx(1))
    engine.close()


def test_a_refused_request_is_not_failed_over(servers, monkeypatch):
    import zsctl.search.simulator as sim

    _, url_a = servers(TUNED_REPLY)
    _, url_b = servers(TUNED_REPLY)
    engine = make_engine(f"sim+{url_a},{url_b}?tries=1&backoff=0")
    monkeypatch.setattr(sim, "MAX_SENT_STOPS", STOP_CAP + 1)  # a client that sends too many stop strings
    with pytest.raises(RunFailure, match="HTTP 400"):
        engine.search(["q"], 3, _ctx(1))
    assert engine.failovers == 0  # another endpoint would refuse it too
    engine.close()


def test_prompt_mode_without_a_tokenizer_warns_once(servers, capsys):
    _, url = servers("Doc 1: a\nDoc 2: b")
    engine = make_engine(f"sim+{url}?sim_mode=prompt")  # the served name is no loadable tokenizer
    engine.search(["q"], 2, _ctx(1))
    engine.search(["r"], 2, _ctx(1))
    err = capsys.readouterr().err
    assert err.count("warning: the chat template of simulator") == 1
    engine.close()


def test_http_options_are_checked():
    with pytest.raises(BadInput, match="api=rest"):
        make_engine("sim+http://127.0.0.1:9/v1?api=rest&model=m")
    with pytest.raises(BadInput, match="apply only to sim\\+http"):
        make_engine("sim:x?cooldown=3")

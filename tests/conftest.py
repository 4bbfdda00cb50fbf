"""Shared fixtures: a tiny real Llama built from a config, with a tokenizer trained in-process.

No downloads: the tokenizer is a byte-level BPE trained on the bundled corpus and our own prompt
templates, the model a 2-layer Llama with random weights (SFT/GRPO steps take ~0.1 s).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tiny_model(dest: Path, vocab_size: int = 600, seed: int = 0) -> Path:
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from zsctl.core import prompts

    texts = [
        prompts.POLICY_INSTRUCTION,
        prompts.SIMULATOR_USEFUL,
        prompts.SIMULATOR_NOISY,
        prompts.INVALID_ACTION,
        prompts.FINAL_TURN,
        "<think> </think> <search> </search> <answer> </answer> <information> </information> Doc 1: Doc 2:",
    ]
    with open(ROOT / "data" / "corpus" / "wiki_sample.jsonl", encoding="utf-8") as f:
        for n, line in enumerate(f):
            if n >= 400:
                break
            row = json.loads(line)
            texts.append(row["title"] + " " + row["text"])
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.train_from_iterator(
        texts * 3,
        trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=specials,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        ),
    )
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>", bos_token="<|endoftext|>"
    )
    tok.chat_template = CHATML
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    tok.save_pretrained(dest)
    return dest


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Engines and models cache under ZSCTL_CACHE_DIR; keep tests off the user's ~/.cache,
    # but share one dir per session so the converted smollm2 is reused by slow tests.
    if "ZSCTL_CACHE_DIR" not in os.environ or os.environ.get("ZSCTL_TEST_OWN_CACHE"):
        monkeypatch.setenv("ZSCTL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "zscache"))
        monkeypatch.setenv("ZSCTL_TEST_OWN_CACHE", "1")


class ScriptedLogits:
    """A LogitsProcessor that makes a real model write a fixed script, round by round.

    `scripts[key]` is the list of texts the sample whose prompt contains `key` writes in its
    successive generation rounds (after the last one it writes EOS). Used only to test the agent
    loop's mechanics deterministically with a real model and the real `generate`. With `successive`,
    rows of one call that share a key take successive entries (a simulator's retries drawn
    together); else they all write the entry of the key's latest round.
    """

    def __init__(self, tokenizer, scripts: dict[str, list[str]], successive: bool = False):
        self.tok = tokenizer
        self.scripts = scripts
        self.successive = successive
        self.row_rounds: list[int] = []
        self.rounds = {k: -1 for k in scripts}
        self.last_width = None
        self.start = 0
        self.row_keys: list[str] = []

    def __call__(self, input_ids, scores):
        import torch

        width = input_ids.shape[1]
        continues = (
            self.last_width is not None
            and width == self.last_width + 1
            and self.last_ids.shape[0] == input_ids.shape[0]
            and bool((self.last_ids == input_ids[:, :-1]).all())
        )
        if not continues:  # a new generate call (or a new round of the agent loop's decoder)
            self.start = width
            self.row_keys, self.row_rounds = [], []
            for row in input_ids.tolist():
                text = self.tok.decode(row)
                key = next(k for k in self.scripts if k in text)
                self.rounds[key] += 1
                self.row_keys.append(key)
                self.row_rounds.append(self.rounds[key])
        self.last_width, self.last_ids = width, input_ids.clone()
        for r, key in enumerate(self.row_keys):
            script = self.scripts[key]
            i = self.row_rounds[r] if self.successive else self.rounds[key]
            want = script[i] if i < len(script) else ""
            so_far = self.tok.decode(input_ids[r, self.start:].tolist())
            rest = want[len(so_far):] if want.startswith(so_far) else ""
            nxt = self.tok(rest, add_special_tokens=False)["input_ids"][0] if rest else self.tok.eos_token_id
            scores[r] = torch.full_like(scores[r], -1e9)
            scores[r, nxt] = 0.0
        return scores


def script_model(model, tokenizer, scripts: dict[str, list[str]], successive: bool = False):
    """Make `model.generate` and the agent loop's decoder follow `scripts` (see ScriptedLogits);
    returns the processor."""
    from transformers import LogitsProcessorList

    proc = ScriptedLogits(tokenizer, scripts, successive)
    model.rollout_logits_processor = LogitsProcessorList([proc])  # read by zsctl.agent.AgentLoop
    orig = model.generate

    def generate(*args, **kw):
        proc.last_width = None
        kw["logits_processor"] = LogitsProcessorList([proc])
        return orig(*args, **kw)

    model.generate = generate
    return proc


def train_capturing_rollouts(trainer) -> list[dict]:
    """Train, keeping what every call of the trainer's rollout_func returned."""
    outputs = []
    rollout = trainer.rollout_func
    trainer.rollout_func = lambda prompts, tr: outputs.append(rollout(prompts, tr)) or outputs[-1]
    trainer.train()
    return outputs


def assert_logprobs_aligned(outputs: list[dict], max_len: int, policy_below: float) -> None:
    """Per completion: ids, logprobs and env mask of one length within the bound; inserted tokens
    carry logprob 0.0, policy tokens a real one below `policy_below`."""
    for out in outputs:
        for ids, lps, mask in zip(out["completion_ids"], out["logprobs"], out["env_mask"]):
            assert len(ids) == len(lps) == len(mask) <= max_len
            assert all(lp == 0.0 for lp, m in zip(lps, mask) if not m)
            assert all(lp < policy_below for lp, m in zip(lps, mask) if m)


@contextlib.contextmanager
def serving(app):
    """`zsctl serve`'s app on a real 127.0.0.1 port for the duration; yields its base URL."""
    from zsctl.stages.serve import start_in_thread

    server, url = start_in_thread(app)
    try:
        yield url
    finally:
        server.should_exit = True
        server.thread.join(timeout=10)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until_healthy(proc, url: str, seconds: float = 60) -> None:
    """Wait for a `zsctl serve` process to answer GET {url}/health; fail with its stderr if it dies."""
    import time

    import httpx

    deadline = time.monotonic() + seconds
    while True:
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "zsctl serve did not come up"
        time.sleep(0.2)

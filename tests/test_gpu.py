"""GPU tier (`pytest -m gpu`; pipelines/gpu_check.sh runs it): `rl --use-vllm` with real vLLM.

The model is a tiny random Llama shaped for vLLM's attention kernels (head size 64). Its next-token
distribution is nearly uniform over the vocabulary, so every sampled token has a logprob far from
0 and a logprob misaligned by even one position shows up as a large difference in TRL's check.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import assert_logprobs_aligned, build_tiny_model, train_capturing_rollouts

pytestmark = pytest.mark.gpu


def build_vllm_tiny_model(dest: Path) -> Path:
    """The test suite's tiny tokenizer with a 2-layer Llama whose head size vLLM supports."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    build_tiny_model(dest)
    tok = AutoTokenizer.from_pretrained(dest)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=4096,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg).to(torch.bfloat16)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(dest)
    return dest


@pytest.fixture(scope="module")
def vllm_model(tmp_path_factory) -> Path:
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    pytest.importorskip("vllm")
    return build_vllm_tiny_model(tmp_path_factory.mktemp("vllm_tiny") / "model")


def test_colocated_vllm_rl_steps_correct_with_vllm_logprobs(tmp_path, vllm_model):
    from zsctl.stages import rl

    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps({"id": f"q{i}", "question": f"question number {i}?",
                                         "golden_answers": [f"answer {i}"]}) + "\n" for i in range(8)))
    cfg = rl.RLConfig(policy=str(vllm_model), search="none", train=str(train), out=str(tmp_path / "run"), steps=2,
                      batch_size=8, group_size=4, max_turns=1, max_new_tokens=16, max_response_tokens=160,
                      lora=False, lr=1e-4, use_vllm=True, vllm_mode="colocate")
    trainer, _, recorder, _ = rl.build_trainer(cfg)
    outputs = train_capturing_rollouts(trainer)
    assert len(outputs) == 2
    assert_logprobs_aligned(outputs, cfg.max_response_tokens, policy_below=-1)  # nearly uniform over ~600 tokens
    logs = [h for h in trainer.state.log_history if "sampling/sampling_logp_difference/mean" in h]
    assert len(logs) == 2
    for h in logs:
        # bf16 rounding differs between vLLM and the trainer; a shifted logprob would differ by nats
        assert h["sampling/sampling_logp_difference/mean"] < 0.1, h
        assert 0.8 < h["sampling/importance_sampling_ratio/mean"] < 1.25, h
        assert math.isfinite(h["loss"])
    import pyarrow.parquet as pq

    mets = [pq.read_table(f).to_pylist()[0] for f in sorted(recorder.metrics_dir.glob("*.parquet"))]
    assert [m["step"] for m in mets] == [1, 2] and all(m["vllm_logp_diff_mean"] < 0.1 for m in mets)

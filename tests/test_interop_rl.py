"""RL on a Search-R1 / ZeroSearch training file with its own prompts and the project's conventions."""

from __future__ import annotations

import pyarrow.parquet as pq

from conftest import train_capturing_rollouts
from test_interop_eval import corpus, searchr1_parquet  # noqa: F401 (corpus is a fixture)
from zsctl.core.progress import Progress
from zsctl.stages import rl


def test_rl_rolls_out_each_rows_own_prompt(tmp_path, tiny_model_dir, corpus):  # noqa: F811
    bench = searchr1_parquet(tmp_path / "train.parquet")
    cfg = rl.RLConfig(policy=str(tiny_model_dir), search=f"bm25:{corpus}", train=str(bench), out=str(tmp_path / "run"),
                      steps=1, batch_size=4, group_size=2, max_turns=1, max_new_tokens=8, max_response_tokens=64,
                      lora_r=4, prompt_style="search-r1", prompt_from_data=True)
    trainer, engine, _, _ = rl.build_trainer(cfg, Progress())
    try:
        outputs = train_capturing_rollouts(trainer)
    finally:
        engine.close()
    tok = trainer.processing_class
    expected = {tok.apply_chat_template(r["prompt"], tokenize=False, add_generation_prompt=True)
                for r in pq.read_table(bench).to_pylist()}
    seen = {tok.decode(p) for out in outputs for p in out["prompt_ids"]}
    assert seen and seen <= expected

"""`data.path` for `cpe-jax train`: JSONL rows or the paper's verl-layout parquet, read as released."""

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpe_jax import cli
from cpe_jax.errors import UserError
from cpe_jax.rl.trainer import PromptStream, default_config
from tests.helpers import SHARED_SAMPLE, make_persona_world_policy

RL_SAMPLE = os.path.join(SHARED_SAMPLE, "RL_data", "test_sample.parquet")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _data_config(path):
    config = default_config()
    config.data.path = str(path)
    return config.data


def test_prompt_stream_reads_the_released_parquet():
    stream = PromptStream(_data_config(RL_SAMPLE), language="zh")
    raw = pq.read_table(RL_SAMPLE).to_pylist()
    assert len(stream.items) == len(raw) == 16
    for item, row in zip(stream.items, raw):
        text = row["prompt"][-1]["content"]
        assert item["messages"] == row["prompt"]
        assert isinstance(item["persona"], dict) and item["persona"]["Name"] in text
        assert item["question"] and item["question"] in text.split("以下是用户问题：")[-1]
        assert (item["reference"], item["prompt_id"]) == (row["reward_model"]["ground_truth"], row["extra_info"]["index"])
    # The seeded order visits every prompt once per epoch.
    assert sorted(p["prompt_id"] for p in stream.take(0, 16)) == [r["extra_info"]["index"] for r in raw]


def test_prompt_stream_errors_name_the_file(tmp_path):
    with pytest.raises(UserError, match="config field data.path: set it"):
        PromptStream(_data_config(""))
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(RL_SAMPLE).slice(0, 0), empty)
    with pytest.raises(UserError, match=rf"{empty}: the parquet file has no rows"):
        PromptStream(_data_config(empty))
    blank = tmp_path / "prompts.jsonl"
    blank.write_text("\n")
    with pytest.raises(UserError, match=rf"data.path {blank} has no prompts"):
        PromptStream(_data_config(blank))
    blank.write_bytes(b'{"persona": "p", "question": "\xa3"}\n')
    with pytest.raises(UserError, match=rf"{blank}:1: not UTF-8 text"):
        PromptStream(_data_config(blank))


def test_a_row_matching_no_template_names_the_row(tmp_path):
    rows = pq.read_table(RL_SAMPLE).to_pylist()[:3]
    rows[2]["prompt"] = [{"content": "你好", "role": "user"}]
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.Table.from_pylist(rows), bad)
    with pytest.raises(UserError, match=rf"{bad}: row 2 \(extra_info.index 888\): cannot recover 'persona' and "
                                        "'question': no persona and no question in the prompt"):
        PromptStream(_data_config(bad))


def test_train_runs_on_the_released_parquet(tmp_path):
    """One PPO step of `cpe-jax train` straight from the verl parquet (tiny policy, truncated prompts)."""
    policy = tmp_path / "policy"
    make_persona_world_policy(policy)
    cli.main(["train", "--config=" + os.path.join(REPO, "configs", "smoke.py"), f"--workdir={tmp_path / 'run'}",
              f"--config.policy={policy}", "--config.data.source=jsonl", f"--config.data.path={RL_SAMPLE}",
              "--config.language=zh", "--config.total_steps=1", "--config.edit.strategy=none",
              "--config.grm.judge_fn=tests.test_trainer:short_answer_judge"])
    with open(tmp_path / "run" / "metrics.jsonl") as f:
        step = json.loads(f.readline())
    assert step["data/position"] == 4 and step["grm/failure_rate"] == 0 and step["train/rows"] > 0

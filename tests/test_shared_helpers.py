"""The one padding helper, the one resumable JSONL writer, the one judge factory and the explicit
GRM prompt style, each held to what its callers rely on."""

import json

import ml_collections
import numpy as np
import pytest

from cpe_jax.data.jsonl import JsonlAppender, read_finished_rows, write_jsonl_atomic
from cpe_jax.data.padding import left_pad
from cpe_jax.data.prompts import grm_messages
from cpe_jax.errors import UserError


def test_left_pad_right_aligns_keeps_the_last_tokens_and_counts_truncation():
    tokens, mask, truncated = left_pad([[1, 2, 3], [], [4, 5, 6, 7, 8]], 4, pad_id=9)
    assert tokens.dtype == np.int32 and mask.dtype == bool
    np.testing.assert_array_equal(tokens, [[9, 1, 2, 3], [9, 9, 9, 9], [5, 6, 7, 8]])
    np.testing.assert_array_equal(mask, [[0, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])
    assert truncated == 1


def test_resumable_jsonl_keeps_finished_rows_and_drops_only_a_torn_last_line(tmp_path):
    path = tmp_path / "out.jsonl"
    with JsonlAppender(str(path), fsync=True) as out:
        out.write({"key": "a"}, {"key": "b"})
    with open(path, "a") as f:
        f.write('{"key": "c", "te')  # the write an interruption cut
    rows = read_finished_rows(str(path), lambda r: "key" in r, "not ours")
    assert [r["key"] for _, r in rows] == ["a", "b"]
    assert path.read_text() == '{"key": "a"}\n{"key": "b"}\n'  # the torn line is gone from the file
    with JsonlAppender(str(path)) as out:
        out.write({"key": "c"})
    assert [r["key"] for _, r in read_finished_rows(str(path), lambda r: "key" in r, "not ours")] == ["a", "b", "c"]

    path.write_text('{"key": "a"}\nnot json\n{"key": "b"}\n')  # a broken row in the middle is the user's
    with pytest.raises(UserError, match=r"out.jsonl:2: not ours"):
        read_finished_rows(str(path), lambda r: "key" in r, "not ours")
    assert read_finished_rows(str(tmp_path / "missing.jsonl"), lambda r: True, "x") == []

    write_jsonl_atomic(str(path), [{"k": 1}, {"k": "é"}])
    assert [json.loads(line) for line in path.read_text().splitlines()] == [{"k": 1}, {"k": "é"}]
    assert not (tmp_path / "out.jsonl.tmp").exists()


def test_one_judge_factory_for_flags_and_config():
    from cpe_jax.reward.judge_factory import build_judge, judge_from_config
    from cpe_jax.reward.judges import CallableJudge, HTTPJudge

    judge, label = build_judge("python", judge_fn="cpe_jax.data.persona_world:grm_teacher")
    assert isinstance(judge, CallableJudge) and label == "python:cpe_jax.data.persona_world:grm_teacher"
    with pytest.raises(UserError, match="--judge-fn='nomodule' must look like"):
        build_judge("python", judge_fn="nomodule")
    grm = ml_collections.ConfigDict({"type": "python", "judge_fn": "cpe_jax.data.persona_world:NoSuch",
                                     "max_tokens": 16})
    with pytest.raises(UserError, match="grm.judge_fn=.*has no attribute 'NoSuch'"):
        judge_from_config(grm)  # errors name the config field, not a flag
    grm.type = "smoke-signals"
    with pytest.raises(UserError, match="config field grm.type: 'smoke-signals' is not one of python, http, flax"):
        judge_from_config(grm)
    http = judge_from_config(ml_collections.ConfigDict({"type": "http", "model_name": "m", "api_key_env": "",
                                                        "base_url": "http://127.0.0.1:9/v1", "max_retries": 2}))
    assert isinstance(http, HTTPJudge)


def test_judge_flags_refuse_another_kinds_flags():
    import argparse

    from cpe_jax.reward.judge_factory import add_judge_arguments, judge_from_arguments

    p = argparse.ArgumentParser()
    add_judge_arguments(p)
    args = p.parse_args(["--judge", "python", "--judge-fn", "cpe_jax.data.persona_world:grm_teacher",
                         "--base-url", "http://x/v1"])
    with pytest.raises(UserError, match="--base-url cannot be used with --judge python"):
        judge_from_arguments(args)
    with pytest.raises(UserError, match="--judge http needs --base-url"):
        judge_from_arguments(p.parse_args(["--judge", "http"]))


def test_grm_prompt_style_is_an_argument_not_the_environment(monkeypatch, tmp_path):
    from cpe_jax.reward.grm import GRMScorer
    from cpe_jax.reward.judges import CallableJudge
    from cpe_jax.reward.label import label

    monkeypatch.setenv("CPE_JAX_GRM_PROMPT", "compact")  # the old switch: ignored now
    full = grm_messages("a vegan", "What should I cook?", "Tofu.")
    compact = grm_messages("a vegan", "What should I cook?", "Tofu.", style="compact")
    assert full != compact and len(compact[0]["content"]) < len(full[0]["content"])
    with pytest.raises(UserError, match="GRM prompt style must be one of"):
        grm_messages("p", "q", "r", style="tiny")

    seen = []

    def teacher(conversation):
        seen.append(conversation[0]["content"])
        return "<critique>fine</critique>\n<scores>\nHelpfulness: 1\nPersonalization: 1\nNatural: 1\n</scores>"

    example = {"persona": "a vegan", "question": "What should I cook?", "response": "Tofu."}
    GRMScorer(CallableJudge(teacher), prompt_style="compact").score([example])
    assert seen[-1] == compact[0]["content"]
    rows = tmp_path / "in.jsonl"
    rows.write_text(json.dumps(example) + "\n")
    label(CallableJudge(teacher), str(rows), str(tmp_path / "out.jsonl"), prompt_style="compact")
    assert seen[-1] == compact[0]["content"]
    label(CallableJudge(teacher), str(rows), str(tmp_path / "out_full.jsonl"))
    assert seen[-1] == full[0]["content"]
    with pytest.raises(UserError, match="GRM prompt style must be one of"):
        GRMScorer(CallableJudge(teacher), prompt_style="tiny")


def test_demo_presets_refuse_a_misspelt_override():
    from cpe_jax.demo import preset

    config = preset("sft", {"lr": 5e-3, "mesh": {"data": 1}})
    assert config.lr == 5e-3 and config.mesh.data == 1
    with pytest.raises((AttributeError, KeyError)):
        preset("sft", {"learning_rate": 1.0})

import collections
import json
import os
import random

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from cpe_jax.data import personafeedback as pf
from cpe_jax.data import prompts
from cpe_jax.errors import UserError
from tests.helpers import SHARED_SAMPLE

SAMPLE = SHARED_SAMPLE
if not os.path.isdir(SAMPLE):
    SAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "personafeedback_sample")
RELEASE_FILES = {"easy": "general_easy.jsonl", "medium": "general_mid.jsonl", "hard": "general_hard.jsonl"}


def _raw_rows(name):
    with open(os.path.join(SAMPLE, "rm_benchmark_all", name), encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _raw_persona(user_id):
    with open(os.path.join(SAMPLE, "persona_all", f"{user_id}.json"), encoding="utf-8") as f:
        return json.load(f)


def _write_jsonl(path, rows):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write((row if isinstance(row, str) else json.dumps(row, ensure_ascii=False)) + "\n")


def _release_copy(root, edit=None):
    """A writable copy of the sample's release layout; `edit(name, rows)` may alter a file's rows."""
    for name in RELEASE_FILES.values():
        rows = _raw_rows(name)
        _write_jsonl(os.path.join(root, "rm_benchmark_all", name), edit(name, rows) if edit else rows)
    os.makedirs(os.path.join(root, "persona_all"))
    for name in os.listdir(os.path.join(SAMPLE, "persona_all")):
        with open(os.path.join(SAMPLE, "persona_all", name), encoding="utf-8") as f:
            text = f.read()
        with open(os.path.join(root, "persona_all", name), "w", encoding="utf-8") as f:
            f.write(text)
    return str(root)


# ----------------------------------------------------------------------------------------------
# Release layout (the shared sample itself).


def test_release_layout_sample():
    pairs = pf.load_pairs(SAMPLE)
    expected = [(tier, row) for tier, name in RELEASE_FILES.items() for row in _raw_rows(name)]
    assert len(pairs) == len(expected) == 36
    assert collections.Counter(p.tier for p in pairs) == {"easy": 12, "medium": 12, "hard": 12}
    for pair, (tier, row) in zip(pairs, expected):
        assert isinstance(pair, pf.PreferencePair)
        assert (pair.user_id, pair.question, pair.chosen, pair.rejected) == (
            row["user_id"], row["question"], row["chosen"], row["reject"]
        )
        assert pair.tier == tier and pair.category == "general"
        assert pair.persona == _raw_persona(row["user_id"])  # names with spaces and Chinese resolve
    assert pairs[0].source == "rm_benchmark_all/general_easy.jsonl:1"
    assert pairs[-1].source == "rm_benchmark_all/general_hard.jsonl:12"


def test_release_filters_and_aliases():
    assert {p.tier for p in pf.load_pairs(SAMPLE, tiers=("mid",))} == {"medium"}
    assert len(pf.load_pairs(SAMPLE, tiers=("easy", "hard"))) == 24
    with pytest.raises(UserError, match="category 'specific' was asked for but has no pair files"):
        pf.load_pairs(SAMPLE, categories=("specific",))  # the sample has no specific tier files
    with pytest.raises(UserError, match="category 'specific' was asked for"):
        pf.load_pairs(SAMPLE, categories=("general", "specific"))
    with pytest.raises(UserError, match=r"unknown tier 'extreme'; known: easy, medium \(or mid\), hard"):
        pf.load_pairs(SAMPLE, tiers=("extreme",))


def test_absent_category_not_asked_for_is_a_note():
    found = pf.find_pair_files(SAMPLE)
    assert [tier for _, tier, _ in found.files] == ["easy", "medium", "hard"]
    assert len(found.notes) == 1 and "no 'specific' pair files" in found.notes[0]
    assert "specific_mid.jsonl" in found.notes[0]


def _tier_gap(root, gap):
    """The sample's release copy with one tier file emptied, removed or renamed."""
    root = _release_copy(root)
    bench = os.path.join(root, "rm_benchmark_all")
    if gap == "empty":
        open(os.path.join(bench, "general_hard.jsonl"), "w").close()
    elif gap == "blank":
        with open(os.path.join(bench, "general_hard.jsonl"), "w") as f:
            f.write("\n  \n")
    elif gap == "missing":
        os.remove(os.path.join(bench, "general_mid.jsonl"))
    elif gap == "renamed":
        os.rename(os.path.join(bench, "general_mid.jsonl"), os.path.join(bench, "general_medium.jsonl"))
    return root


@pytest.mark.parametrize("gap,missing,found", [
    ("empty", r"general/hard: rm_benchmark_all/general_hard\.jsonl is empty", r"general_hard\.jsonl \(empty\)"),
    ("blank", r"general/hard: rm_benchmark_all/general_hard\.jsonl is empty", r"general_hard\.jsonl \(empty\)"),
    ("missing", r"general/medium: no rm_benchmark_all/general_mid\.jsonl", r"general_easy\.jsonl, .*general_hard\.jsonl\)"),
    ("renamed", r"general/medium: no rm_benchmark_all/general_mid\.jsonl", r"general_medium\.jsonl"),
])
def test_missing_or_empty_tier_file_is_an_error(tmp_path, gap, missing, found):
    root = _tier_gap(tmp_path, gap)
    with pytest.raises(UserError, match="incomplete: " + missing.replace("/", r"[/\\]") + r" \(found for general: .*" + found):
        pf.load_pairs(root)
    lost = "hard" if gap in ("empty", "blank") else "medium"
    kept = tuple(t for t in pf.TIERS if t != lost)
    assert len(pf.load_pairs(root, tiers=kept)) == 24  # naming fewer tiers reads the rest
    found_files = pf.find_pair_files(root, allow_missing=True)
    assert [t for _, t, _ in found_files.files] == list(kept)
    warnings = [n for n in found_files.notes if n.startswith("warning:")]
    assert len(warnings) == 1 and f"general/{lost}" in warnings[0]
    assert len(pf.read_pairs(found_files)) == 24


def test_hf_layout_tier_gap(tmp_path):
    _hf_fixture(tmp_path)
    os.remove(tmp_path / "data" / "spedific" / "medium.jsonl")
    with pytest.raises(UserError, match=r"specific/medium: no data[/\\]spedific[/\\]medium\.jsonl"):
        pf.load_pairs(tmp_path)
    assert len(pf.load_pairs(tmp_path, categories=("general",))) == 36


def test_no_files_at_all(tmp_path):
    with pytest.raises(UserError, match="no PersonaFeedback files"):
        pf.load_pairs(tmp_path)
    with pytest.raises(UserError, match="does not exist"):
        pf.load_pairs(tmp_path / "missing")


# ----------------------------------------------------------------------------------------------
# Hugging Face layout, built from the sample rows.


def _hf_fixture(root, specific_dir="spedific", ids_in_lines=False):
    """The sample in the HF layout: integer user ids, personas in one JSONL file.

    Returns the expected (persona, release row) per loaded pair, in load order.
    """
    user_ids = sorted({row["user_id"] for name in RELEASE_FILES.values() for row in _raw_rows(name)})
    number = {uid: i + 1 for i, uid in enumerate(user_ids)}
    persona_lines = [dict(_raw_persona(uid)) for uid in user_ids]
    if ids_in_lines:  # lines carry their id and come in any order
        for uid, line in zip(user_ids, persona_lines):
            line["user_id"] = number[uid]
        random.Random(0).shuffle(persona_lines)
    _write_jsonl(os.path.join(root, "persona", "all_personas.jsonl"), persona_lines)
    expected = []
    for category, directory in (("general", "general"), ("specific", specific_dir)):
        for tier, name in RELEASE_FILES.items():
            rows = _raw_rows(name)[: 12 if category == "general" else 2]
            hf_rows = [dict(row, user_id=number[row["user_id"]]) for row in rows]
            if category == "specific" and tier == "hard":
                hf_rows[0]["user_id"] = str(hf_rows[0]["user_id"])  # "7" is read as 7
            _write_jsonl(os.path.join(root, "data", directory, f"{tier}.jsonl"), hf_rows)
            expected += [(category, tier, number[r["user_id"]], _raw_persona(r["user_id"]), r) for r in rows]
    return expected


@pytest.mark.parametrize("specific_dir,ids_in_lines", [("spedific", False), ("specific", True)])
def test_hf_layout(tmp_path, specific_dir, ids_in_lines):
    expected = _hf_fixture(tmp_path, specific_dir, ids_in_lines)
    pairs = pf.load_pairs(tmp_path)
    assert len(pairs) == len(expected) == 36 + 6
    for pair, (category, tier, number, persona, row) in zip(pairs, expected):
        assert (pair.category, pair.tier, pair.user_id) == (category, tier, str(number))
        assert pair.persona == persona
        assert (pair.question, pair.chosen, pair.rejected) == (row["question"], row["chosen"], row["reject"])
    assert pairs[-1].source == os.path.join("data", specific_dir, "hard.jsonl") + ":2"
    assert len(pf.load_pairs(tmp_path, categories=("specific",), tiers=("medium",))) == 2


def test_hf_unknown_user_id(tmp_path):
    _hf_fixture(tmp_path)
    path = tmp_path / "data" / "general" / "easy.jsonl"
    lines = path.read_text(encoding="utf-8").splitlines()
    lines[4] = json.dumps(dict(json.loads(lines[4]), user_id=99999))
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(UserError, match=r"general[/\\]easy\.jsonl:5: user_id 99999 has no persona"):
        pf.load_pairs(tmp_path)


# ----------------------------------------------------------------------------------------------
# Broken rows: a UserError naming file and line, never a dropped row.


def _edit_line(target, lineno, new):
    def edit(name, rows):
        if name != target:
            return rows
        rows = list(rows)
        rows[lineno - 1] = new(rows[lineno - 1])
        return rows

    return edit


@pytest.mark.parametrize(
    "lineno,new,message",
    [
        (3, lambda row: json.dumps(row, ensure_ascii=False)[:80], ":3: bad JSON"),
        (7, lambda row: {k: v for k, v in row.items() if k != "chosen"}, ":7: missing field 'chosen'"),
        (2, lambda row: dict(row, reject=["a", "b"]), ":2: field 'reject' must be str, got list"),
        (5, lambda row: dict(row, user_id="Nobody_0000"), r":5: persona file not found: .*Nobody_0000\.json"),
        (6, lambda row: dict(row, user_id="../x"), ":6: field 'user_id'"),
        (9, lambda row: "[1, 2]", ":9: expected a JSON object"),
    ],
)
def test_broken_rows(tmp_path, lineno, new, message):
    root = _release_copy(tmp_path, _edit_line("general_easy.jsonl", lineno, new))
    with pytest.raises(UserError, match=r"rm_benchmark_all[/\\]general_easy\.jsonl" + message):
        pf.load_pairs(root)


def test_bad_byte_in_a_pair_file(tmp_path):
    root = _release_copy(tmp_path)
    path = os.path.join(root, "rm_benchmark_all", "general_mid.jsonl")
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    lines[3] = lines[3].replace(b'"question": "', b'"question": "\xff', 1)
    with open(path, "wb") as f:
        f.write(b"\n".join(lines))
    with pytest.raises(UserError, match=r"general_mid\.jsonl:4: not UTF-8 text"):
        pf.load_pairs(root)


def test_bad_byte_in_a_persona_file(tmp_path):
    root = _release_copy(tmp_path)
    user_id = _raw_rows("general_easy.jsonl")[0]["user_id"]
    with open(os.path.join(root, "persona_all", f"{user_id}.json"), "wb") as f:
        f.write(b'{\n  "Name": "x",\n  "Bio": "\xe4\xb8"\n}\n')  # a character cut in half on line 3
    with pytest.raises(UserError, match=rf"{user_id}\.json:3: not UTF-8 text"):
        pf.load_pairs(root)


def test_broken_persona_file(tmp_path):
    root = _release_copy(tmp_path)
    user_id = _raw_rows("general_mid.jsonl")[0]["user_id"]
    with open(os.path.join(root, "persona_all", f"{user_id}.json"), "w", encoding="utf-8") as f:
        f.write('{\n  "Name": "x",\n  "Age": \n}\n')
    with pytest.raises(UserError, match=rf"{user_id}\.json:4: bad JSON"):
        pf.load_pairs(root)


# ----------------------------------------------------------------------------------------------
# RL prompts and the evaluation set.


def test_rl_prompts_sample():
    path = os.path.join(SAMPLE, "RL_data", "test_sample.parquet")
    rows = pf.load_rl_prompts(path)
    reference = pq.read_table(path).to_pylist()
    assert len(rows) == len(reference) == 16
    for row, ref in zip(rows, reference):
        assert row == ref  # every column kept: data_source, extra_info.index, reward_model, ...
        assert all(set(m) >= {"role", "content"} for m in row["prompt"])
        assert isinstance(row["extra_info"]["index"], int)


def test_rl_prompts_errors(tmp_path):
    bad = tmp_path / "bad.parquet"
    pq.write_table(pa.table({"prompt": [[{"role": "user", "content": "hi"}], []]}), bad)
    with pytest.raises(UserError, match=r"bad\.parquet: row 1: field 'prompt' is an empty message list"):
        pf.load_rl_prompts(bad)
    pq.write_table(pa.table({"question": ["hi"]}), bad)
    with pytest.raises(UserError, match="row 0: missing field 'prompt'"):
        pf.load_rl_prompts(bad)
    text = tmp_path / "not.parquet"
    text.write_text("hello")
    with pytest.raises(UserError, match="not a readable parquet file"):
        pf.load_rl_prompts(text)
    with pytest.raises(UserError, match="does not exist"):
        pf.load_rl_prompts(tmp_path / "missing.parquet")


def test_zero_row_parquet_is_an_error(tmp_path):
    empty = tmp_path / "empty.parquet"
    pq.write_table(pq.read_table(RL_SAMPLE).slice(0, 0), empty)
    with pytest.raises(UserError, match=r"empty\.parquet: the parquet file has no rows"):
        pf.load_rl_prompts(empty)
    with pytest.raises(UserError, match=r"empty\.parquet: the parquet file has no rows"):
        pf.load_prompt_set(empty)


RL_SAMPLE = os.path.join(SAMPLE, "RL_data", "test_sample.parquet")
PERSONA_HEAD, PERSONA_TAIL = "当前用户配置：\n", "\n\n根据用户配置"
QUESTION_HEAD, QUESTION_TAIL = "以下是用户问题：", "\n\n生成1个"


def _split_release_prompt(text):
    """(persona JSON, question) of a released prompt, by its headings alone (no template)."""
    a = text.index(PERSONA_HEAD) + len(PERSONA_HEAD)
    b = text.index(PERSONA_TAIL, a)
    q = text.rindex(QUESTION_HEAD) + len(QUESTION_HEAD)
    return json.loads(text[a:b]), text[q:text.rindex(QUESTION_TAIL)].strip()


def _with(text, persona, question):
    """A released prompt with another persona and question put in their places."""
    a = text.index(PERSONA_HEAD) + len(PERSONA_HEAD)
    b = text.index(PERSONA_TAIL, a)
    text = text[:a] + json.dumps(persona, ensure_ascii=False, indent=2) + text[b:]
    q = text.rindex(QUESTION_HEAD) + len(QUESTION_HEAD)
    newline = "\n" if text[q] == "\n" else ""  # the two variants differ here
    return text[:q] + newline + question + text[text.rindex(QUESTION_TAIL):]


def test_prompt_set_from_the_released_parquet():
    prompts = pf.load_prompt_set(RL_SAMPLE)
    raw = pq.read_table(RL_SAMPLE).to_pylist()
    assert len(prompts) == len(raw) == 16
    variants = collections.Counter("5. 尽量结合" in r["prompt"][-1]["content"] for r in raw)
    assert variants == {True: 11, False: 5}  # both released templates are in the sample
    for p, row in zip(prompts, raw):
        persona, question = _split_release_prompt(row["prompt"][-1]["content"])
        assert (p.persona, p.question) == (persona, question)
        assert p.messages == row["prompt"]  # the policy sees the prompt as released
        assert p.reference == row["reward_model"]["ground_truth"]
        assert p.id == row["extra_info"]["index"]


def _verl_table(rows):
    return pa.Table.from_pylist([
        {"data_source": "persona alignment", "prompt": [{"content": text, "role": "user"}], "ability": "alignment",
         "reward_model": {"ground_truth": ref, "style": "model"}, "extra_info": {"index": i, "split": "train"},
         **extra}
        for i, (text, ref, extra) in enumerate(rows)
    ])


def test_prompt_set_generated_in_both_release_variants(tmp_path):
    raw = pq.read_table(RL_SAMPLE).to_pylist()
    plain = next(r for r in raw if "5. 尽量结合" not in r["prompt"][-1]["content"])["prompt"][-1]["content"]
    example = next(r for r in raw if "5. 尽量结合" in r["prompt"][-1]["content"])["prompt"][-1]["content"]
    personas = [{"Name": "甲", "Preference": {"Food": "面条"}}, {"Name": "Bo", "Age": 40, "List": ["a", "b"]}]
    questions = ["周末去哪里？", "How do I\nfix a bike?"]
    rows = [(_with(t, p, q), f"ref {i}", {"persona": None, "question": None}) for i, (t, p, q) in
            enumerate([(plain, personas[0], questions[0]), (example, personas[1], questions[1]),
                       (example, personas[0], questions[1])])]
    rows.append(("free text the release never used", "ref 3",
                 {"persona": json.dumps(personas[1]), "question": "explicit?"}))
    path = tmp_path / "train.parquet"
    pq.write_table(_verl_table([(text, ref, {}) for text, ref, _ in rows[:3]]), path)
    got = pf.load_prompt_set(path)
    assert [(p.persona, p.question, p.reference, p.id) for p in got] == [
        (personas[0], questions[0], "ref 0", 0), (personas[1], questions[1], "ref 1", 1),
        (personas[0], questions[1], "ref 2", 2)]
    pq.write_table(_verl_table(rows), path)  # explicit columns (null where unset) serve prompts of any wording
    got = pf.load_prompt_set(path)
    assert (got[3].persona, got[3].question, got[0].question) == (personas[1], "explicit?", questions[0])


@pytest.mark.parametrize("text,missing", [
    ("你好，请回答：周末去哪里？", r"cannot recover 'persona' and 'question': no persona and no question in the prompt"),
    ("当前用户配置：\n{}\n\n随便问问", r"cannot recover 'persona' and 'question': no question in the prompt"),
    ("当前用户配置：\n{}\n\n以下是用户问题：你好", r"cannot recover .*: .*matches none of the known policy templates"),
])
def test_prompt_matching_no_template_names_the_row(tmp_path, text, missing):
    raw = pq.read_table(RL_SAMPLE).to_pylist()
    good = raw[0]["prompt"][-1]["content"]
    path = tmp_path / "train.parquet"
    pq.write_table(_verl_table([(good, "r", {}), (text, "r", {})]), path)
    with pytest.raises(UserError, match=r"train\.parquet: row 1 \(extra_info\.index 1\): " + missing):
        pf.load_prompt_set(path)


def test_prompt_set_jsonl_and_its_errors(tmp_path):
    path = tmp_path / "prompts.jsonl"
    _write_jsonl(path, [{"persona": {"Name": "Ada"}, "question": "q1", "reference": "r1", "id": "a"},
                        {"persona": "likes tea", "question": "q2", "messages": [{"role": "user", "content": "hi"}]}])
    first, second = pf.load_prompt_set(path, language="zh")
    assert (first.reference, first.id, first.messages[-1]["content"].count("q1")) == ("r1", "a", 1)
    assert "当前用户配置" in first.messages[-1]["content"]
    assert (second.persona, second.messages, second.reference, second.id) == (
        "likes tea", [{"role": "user", "content": "hi"}], None, 2)
    path.write_bytes(b'{"persona": "a", "question": "q"}\n{"persona": "\xc3(", "question": "q"}\n')
    with pytest.raises(UserError, match=r"prompts\.jsonl:2: not UTF-8 text"):
        pf.load_prompt_set(path)
    path.write_text("\n\n")
    with pytest.raises(UserError, match=r"data\.path .*prompts\.jsonl has no prompts"):
        pf.load_prompt_set(path)
    _write_jsonl(path, [{"persona": "a"}])
    with pytest.raises(UserError, match=r"prompts\.jsonl:1: missing field 'question'"):
        pf.load_prompt_set(path)


@pytest.mark.parametrize("name", ["mix_gpt-4o.jsonl", "mix_gpt-4o-mini.jsonl"])
def test_eval_set_sample(name):
    path = os.path.join(SAMPLE, "generate_data_300", name)
    with open(path, encoding="utf-8") as f:
        raw = [json.loads(line) for line in f if line.strip()]
    examples = pf.load_eval_set(path)
    assert len(examples) == len(raw) == 16
    for i, (ex, row) in enumerate(zip(examples, raw), start=1):
        assert (ex.question, ex.response) == (row["question"], row["response"])
        assert ex.persona == json.loads(row["persona"]) and isinstance(ex.persona, dict)
        assert ex.tier is None and ex.category is None and ex.source == f"{name}:{i}"


def test_eval_set_optional_fields_and_errors(tmp_path):
    path = tmp_path / "eval.jsonl"
    persona = {"Name": "Ada"}
    _write_jsonl(path, [
        {"question": "q1", "persona": persona, "response": "r1", "tier": "mid", "category": "spedific"},
        {"question": "q2", "persona": json.dumps(persona), "response": "r2"},
    ])
    first, second = pf.load_eval_set(path)
    assert (first.persona, first.tier, first.category) == (persona, "medium", "specific")
    assert (second.persona, second.tier, second.category) == (persona, None, None)
    for row, message in [
        ({"question": "q", "persona": "{not json", "response": "r"},
         r"field 'persona' is not valid JSON \(Expecting property name enclosed in double quotes at line 1, "
         r"column 2\); give a JSON object or a string holding one$"),
        ({"question": "q", "persona": persona, "response": "r", "tier": "extreme"},
         r"unknown tier 'extreme'; known: easy, medium \(or mid\), hard"),
        ({"question": "q", "persona": persona, "response": "r", "category": "personal"},
         r"unknown category 'personal'; known: general, specific \(or spedific\)"),
        ({"question": "q", "persona": "[1]", "response": "r"}, "persona must be a JSON object"),
        ({"question": "q", "persona": persona}, "missing field 'response'"),
        ({"question": 3, "persona": persona, "response": "r"}, "field 'question' must be str"),
    ]:
        _write_jsonl(path, [{"question": "q", "persona": persona, "response": "r"}, row])
        with pytest.raises(UserError, match=r"eval\.jsonl:2: " + message):
            pf.load_eval_set(path)


def test_eval_set_bad_byte_and_empty_file(tmp_path):
    path = tmp_path / "eval.jsonl"
    good = json.dumps({"question": "q", "persona": {"Name": "Ada"}, "response": "r"}).encode()
    path.write_bytes(good + b"\n" + good.replace(b'"r"', b'"\x92r"') + b"\n")  # a cp1252 quote
    with pytest.raises(UserError, match=r"eval\.jsonl:2: not UTF-8 text"):
        pf.load_eval_set(path)
    path.write_bytes(b"\xef\xbb\xbf" + good + b"\n")  # a byte-order mark is not a broken byte
    assert pf.load_eval_set(path)[0].question == "q"
    path.write_text("")
    with pytest.raises(UserError, match=r"evaluation file .*eval\.jsonl has no rows"):
        pf.load_eval_set(path)


def test_format_persona():
    persona = {"Name": "Ada", "Demographics": {"Age": 36, "Language": ["English", "中文"]}, "Bio": ""}
    assert prompts.format_persona(persona) == (
        "Name: Ada\nDemographics:\n  Age: 36\n  Language:\n    - English\n    - 中文\nBio: "
    )

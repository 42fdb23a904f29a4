"""PersonaFeedback pairs, RL prompts and the evaluation questions, read from local files.

Two layouts of PersonaFeedback exist and both are read by `load_pairs`:

- the paper's release: `ROOT/rm_benchmark_all/{general,specific}_{easy,mid,hard}.jsonl` with rows
  `{user_id, question, chosen, reject}`, and one persona per file, `ROOT/persona_all/<user_id>.json`;
- the Hugging Face dataset: `ROOT/data/general/{easy,medium,hard}.jsonl` and
  `ROOT/data/spedific/...` (sic; `specific` is accepted too), with integer `user_id`s pointing into
  `ROOT/persona/all_personas.jsonl`. That file has no ids of its own, so the persona on line i
  (1-based, counting every line) is user i, unless the line carries a `user_id` field, which wins.

Rows are read with the json module rather than `datasets` so every error can name its file and line:
a broken row is a UserError, never a silently dropped example.
"""

import dataclasses
import json
import os

from cpe_jax.data.jsonl import read_jsonl
from cpe_jax.errors import UserError

CATEGORIES = ("general", "specific")
TIERS = ("easy", "medium", "hard")
_TIER_ALIASES = {"mid": "medium"}
_CATEGORY_ALIASES = {"spedific": "specific"}

_RELEASE_DIR = "rm_benchmark_all"
_RELEASE_TIER_NAMES = {"easy": "easy", "medium": "mid", "hard": "hard"}
_HF_CATEGORY_DIRS = {"general": ("general",), "specific": ("spedific", "specific")}
_HF_PERSONAS = os.path.join("persona", "all_personas.jsonl")


def known_first(names, known_order):
    """`names` with the ones in `known_order` first, in that order, then the rest sorted: tables
    list PersonaFeedback's tiers in difficulty order and keep any other grouping a dataset uses."""
    names = set(names)
    return [n for n in known_order if n in names] + sorted(n for n in names if n not in known_order)


@dataclasses.dataclass(frozen=True)
class PreferencePair:
    """One PersonaFeedback comparison: `chosen` suits the persona better than `rejected`."""

    user_id: str
    persona: dict
    question: str
    chosen: str
    rejected: str
    tier: str  # "easy" | "medium" | "hard"
    category: str  # "general" | "specific"
    source: str  # "file:line", relative to the dataset root


@dataclasses.dataclass(frozen=True)
class EvalExample:
    """One evaluation question with its persona and the baseline's response."""

    question: str
    persona: dict
    response: str
    source: str  # "file:line"
    tier: str | None = None
    category: str | None = None


# ----------------------------------------------------------------------------------------------
# Reading JSON with errors that point at the line.


def _read_json_file(path):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: bad JSON: {e.msg}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"cannot read {path}: {e}") from None


def _field(row, name, types, where):
    """row[name], checked to be one of `types`; `where` is the "file:line" prefix of errors."""
    if name not in row:
        raise UserError(f"{where}: missing field {name!r}")
    value = row[name]
    if not isinstance(value, types) or isinstance(value, bool):
        expected = " or ".join(t.__name__ for t in (types if isinstance(types, tuple) else (types,)))
        raise UserError(f"{where}: field {name!r} must be {expected}, got {type(value).__name__}")
    return value


def _check_persona(persona, where):
    if not isinstance(persona, dict):
        raise UserError(f"{where}: persona must be a JSON object, got {type(persona).__name__}")
    return persona


def _normalized(values, allowed, aliases, what):
    if isinstance(values, str):
        values = (values,)
    out = []
    for v in values:
        v = aliases.get(v, v)
        if v not in allowed:
            raise UserError(f"unknown {what} {v!r}; expected some of {allowed}")
        out.append(v)
    return tuple(out)


# ----------------------------------------------------------------------------------------------
# PersonaFeedback pairs.


def detect_layout(root):
    """'release' or 'hf', from the directories present under `root`."""
    if os.path.isdir(os.path.join(root, _RELEASE_DIR)):
        return "release"
    if any(
        os.path.isdir(os.path.join(root, "data", d)) for dirs in _HF_CATEGORY_DIRS.values() for d in dirs
    ):
        return "hf"
    raise UserError(
        f"no PersonaFeedback files under {root}: expected {_RELEASE_DIR}/<category>_<tier>.jsonl "
        "(release layout) or data/<category>/<tier>.jsonl (Hugging Face layout)"
    )


def _pair_files(root, layout, categories, tiers):
    """(category, tier, relative path) of every pair file that exists."""
    found = []
    for category in categories:
        for tier in tiers:
            if layout == "release":
                candidates = [os.path.join(_RELEASE_DIR, f"{category}_{_RELEASE_TIER_NAMES[tier]}.jsonl")]
            else:
                candidates = [os.path.join("data", d, f"{tier}.jsonl") for d in _HF_CATEGORY_DIRS[category]]
            for rel in candidates:
                if os.path.isfile(os.path.join(root, rel)):
                    found.append((category, tier, rel))
                    break
    return found


class _ReleasePersonas:
    """persona_all/<user_id>.json, read once per user."""

    def __init__(self, root):
        self.dir = os.path.join(root, "persona_all")
        self.cache = {}

    def __call__(self, user_id, where):
        if not isinstance(user_id, str) or not user_id or os.sep in user_id or user_id in (".", ".."):
            raise UserError(f"{where}: field 'user_id' must be a persona file name, got {user_id!r}")
        if user_id not in self.cache:
            path = os.path.join(self.dir, f"{user_id}.json")
            if not os.path.isfile(path):
                raise UserError(f"{where}: persona file not found: {path}")
            self.cache[user_id] = _check_persona(_read_json_file(path), path)
        return user_id, self.cache[user_id]


class _HFPersonas:
    """persona/all_personas.jsonl: user i is line i unless the line names its own `user_id`."""

    def __init__(self, root):
        self.path = os.path.join(root, _HF_PERSONAS)
        self.by_id = None

    def _load(self):
        if not os.path.isfile(self.path):
            raise UserError(f"persona file not found: {self.path}")
        self.by_id = {}
        for lineno, obj in read_jsonl(self.path):
            where = f"{self.path}:{lineno}"
            uid = _user_number(obj.pop("user_id"), where) if "user_id" in obj else lineno
            if uid in self.by_id:
                raise UserError(f"{where}: duplicate persona for user_id {uid}")
            self.by_id[uid] = obj

    def __call__(self, user_id, where):
        if self.by_id is None:
            self._load()
        uid = _user_number(user_id, where)
        if uid not in self.by_id:
            raise UserError(f"{where}: user_id {uid} has no persona in {self.path}")
        return str(uid), self.by_id[uid]


def _user_number(user_id, where):
    if isinstance(user_id, int) and not isinstance(user_id, bool):
        return user_id
    if isinstance(user_id, str) and user_id.strip().isdigit():
        return int(user_id)
    raise UserError(f"{where}: field 'user_id' must be an integer, got {user_id!r}")


def load_pairs(root, *, categories=CATEGORIES, tiers=TIERS):
    """All preference pairs under `root` (either layout), in file order; missing tier files are skipped."""
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"PersonaFeedback directory does not exist: {root}")
    categories = _normalized(categories, CATEGORIES, _CATEGORY_ALIASES, "category")
    tiers = _normalized(tiers, TIERS, _TIER_ALIASES, "tier")
    layout = detect_layout(root)
    files = _pair_files(root, layout, categories, tiers)
    if not files:
        raise UserError(
            f"no PersonaFeedback pair files for categories {categories} and tiers {tiers} "
            f"under {root} ({layout} layout)"
        )
    persona_of = _ReleasePersonas(root) if layout == "release" else _HFPersonas(root)
    pairs = []
    for category, tier, rel in files:
        path = os.path.join(root, rel)
        for lineno, row in read_jsonl(path):
            where = f"{path}:{lineno}"
            if "user_id" not in row:
                raise UserError(f"{where}: missing field 'user_id'")
            user_id, persona = persona_of(row["user_id"], where)
            pairs.append(
                PreferencePair(
                    user_id=user_id,
                    persona=persona,
                    question=_field(row, "question", str, where),
                    chosen=_field(row, "chosen", str, where),
                    rejected=_field(row, "reject", str, where),
                    tier=tier,
                    category=category,
                    source=f"{rel}:{lineno}",
                )
            )
    return pairs


# ----------------------------------------------------------------------------------------------
# RL prompts (verl parquet) and the evaluation questions.


def load_rl_prompts(path):
    """Rows of a verl-layout parquet as dicts, every column kept.

    `prompt` is checked to be a non-empty list of chat messages; errors count rows from 0, as pandas.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"RL prompt file does not exist: {path}")
    try:
        rows = pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file: {e}") from None
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        messages = _field(row, "prompt", list, where)
        if not messages:
            raise UserError(f"{where}: field 'prompt' is an empty message list")
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UserError(f"{where}: prompt[{j}] must be a chat message, got {message!r:.60}")
            for key in ("role", "content"):
                _field(message, key, str, f"{where}: prompt[{j}]")
    return rows


def load_eval_set(path):
    """The evaluation questions `{question, persona, response}` (+ optional `tier`, `category`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"evaluation file does not exist: {path}")
    examples = []
    for lineno, row in read_jsonl(path):
        where = f"{path}:{lineno}"
        persona = _field(row, "persona", (str, dict), where)
        if isinstance(persona, str):
            try:
                persona = json.loads(persona)
            except json.JSONDecodeError as e:
                raise UserError(f"{where}: field 'persona' is not valid JSON: {e.msg}") from None
        examples.append(
            EvalExample(
                question=_field(row, "question", str, where),
                persona=_check_persona(persona, where),
                response=_field(row, "response", str, where),
                source=f"{os.path.basename(path)}:{lineno}",
                tier=_optional_label(row, "tier", _TIER_ALIASES, where),
                category=_optional_label(row, "category", _CATEGORY_ALIASES, where),
            )
        )
    return examples


def _optional_label(row, name, aliases, where):
    """An optional string field such as `tier`, with the release's spellings mapped ("mid" -> "medium")."""
    if row.get(name) is None:
        return None
    value = _field(row, name, str, where)
    return aliases.get(value, value)


# ----------------------------------------------------------------------------------------------
# Persona as readable text.


def format_persona(persona):
    """An indented outline of the persona JSON: `Key: value` lines, lists as `- item` bullets."""
    lines = []

    def walk(value, indent):
        pad = "  " * indent
        if isinstance(value, dict):
            for key, item in value.items():
                label = str(key).replace("_", " ")
                if isinstance(item, (dict, list)) and item:
                    lines.append(f"{pad}{label}:")
                    walk(item, indent + 1)
                else:
                    lines.append(f"{pad}{label}: {_scalar(item)}")
        elif isinstance(value, list):
            for item in value:
                if isinstance(item, (dict, list)) and item:
                    lines.append(f"{pad}-")
                    walk(item, indent + 1)
                else:
                    lines.append(f"{pad}- {_scalar(item)}")
        else:
            lines.append(f"{pad}{_scalar(value)}")

    walk(persona, 0)
    return "\n".join(lines)


def _scalar(value):
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)

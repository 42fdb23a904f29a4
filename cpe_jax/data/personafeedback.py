"""PersonaFeedback pairs, RL prompts and the evaluation questions, read from the released files.

Two layouts of PersonaFeedback exist and both are read by `load_pairs`:

- the paper's release: `ROOT/rm_benchmark_all/{general,specific}_{easy,mid,hard}.jsonl` with rows
  `{user_id, question, chosen, reject}`, and one persona per file, `ROOT/persona_all/<user_id>.json`;
- the Hugging Face dataset: `ROOT/data/general/{easy,medium,hard}.jsonl` and
  `ROOT/data/spedific/...` (sic; `specific` is accepted too), with integer `user_id`s pointing into
  `ROOT/persona/all_personas.jsonl`. That file has no ids of its own, so the persona on line i
  (1-based, counting every line) is user i, unless the line carries a `user_id` field, which wins.

Rows are read with the json module rather than `datasets` so every error can name its file and line:
a broken row is a UserError, never a silently dropped example. Whole files are not dropped either:
`find_pair_files` insists on every tier of a category that has files (see there).
"""

import dataclasses
import json
import logging
import os

from cpe_jax.data.jsonl import read_jsonl
from cpe_jax.errors import UserError

log = logging.getLogger(__name__)

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
    id: str | int | None = None  # aligns a responses file by id when both files have one


# ----------------------------------------------------------------------------------------------
# Reading JSON with errors that point at the line.


def _read_json_file(path):
    from cpe_jax.data.jsonl import decode_text, open_binary

    with open_binary(path) as f:
        text = decode_text(f.read(), path)
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: bad JSON: {e.msg} (column {e.colno})") from None


def require_field(row, name, types, where):
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


def _known_names(allowed, aliases):
    """"easy, medium (or mid), hard": the names a user may type."""
    return ", ".join(n + "".join(f" (or {a})" for a, v in aliases.items() if v == n) for n in allowed)


def _normalized(values, allowed, aliases, what):
    if isinstance(values, str):
        values = (values,)
    out = []
    for v in values:
        v = aliases.get(v, v)
        if v not in allowed:
            raise UserError(f"unknown {what} {v!r}; known: {_known_names(allowed, aliases)}")
        if v not in out:
            out.append(v)
    if not out:
        raise UserError(f"no {what} given; known: {_known_names(allowed, aliases)}")
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


def _tier_candidates(layout, category, tier):
    """Relative paths the file of one (category, tier) may have, in order of preference."""
    if layout == "release":
        return [os.path.join(_RELEASE_DIR, f"{category}_{_RELEASE_TIER_NAMES[tier]}.jsonl")]
    return [os.path.join("data", d, f"{tier}.jsonl") for d in _HF_CATEGORY_DIRS[category]]


def _has_rows(path):
    """Whether `path` has a line that is not blank (a zero-byte or all-blank file has no pairs)."""
    with open(path, "rb") as f:
        return any(line.strip() for line in f)


def _found_listing(root, layout, category):
    """What is there instead: the .jsonl files of the category's directory, empty ones marked."""
    dirs = [_RELEASE_DIR] if layout == "release" else [os.path.join("data", d) for d in _HF_CATEGORY_DIRS[category]]
    names = []
    for d in dirs:
        full = os.path.join(root, d)
        if not os.path.isdir(full):
            continue
        for name in sorted(os.listdir(full)):
            if layout == "release" and not name.startswith(f"{category}_"):
                continue
            path = os.path.join(full, name)
            if name.endswith(".jsonl") and os.path.isfile(path):
                names.append(os.path.join(d, name) + ("" if _has_rows(path) else " (empty)"))
    return ", ".join(names) or "nothing"


@dataclasses.dataclass(frozen=True)
class PairFiles:
    """The pair files of a PersonaFeedback directory that `read_pairs` reads, and what to say about
    the rest: `notes` are lines to print above a table (a category absent and not asked for, and
    with `allow_missing` the missing or empty tier files)."""

    root: str
    layout: str  # "release" | "hf"
    files: tuple  # (category, tier, path relative to root)
    notes: tuple  # strings


def find_pair_files(root, *, categories=None, tiers=None, allow_missing=False):
    """The pair files under `root` (either layout), checked to be complete.

    Within a category that has files, every tier of `tiers` (default all three) must have a
    non-empty file; a missing or empty one is a UserError naming it and what was found instead.
    A category in `categories` without any file is an error too; with `categories` left at None,
    an absent category is only named in `notes` (the paper's release has no `specific` files).
    `allow_missing` turns those errors into notes starting with "warning:".
    """
    root = os.fspath(root)
    if not os.path.isdir(root):
        raise UserError(f"PersonaFeedback directory does not exist: {root}")
    requested = categories is not None
    categories = _normalized(CATEGORIES if categories is None else categories, CATEGORIES, _CATEGORY_ALIASES,
                             "category")
    tiers = _normalized(TIERS if tiers is None else tiers, TIERS, _TIER_ALIASES, "tier")
    layout = detect_layout(root)
    files, notes, problems, found_here = [], [], [], []
    for category in categories:
        present = {}
        for tier in TIERS:
            for rel in _tier_candidates(layout, category, tier):
                if os.path.isfile(os.path.join(root, rel)):
                    present[tier] = rel
                    break
        if not present:
            looked = ", ".join(_tier_candidates(layout, category, t)[0] for t in tiers)
            if requested:
                problems.append(f"category {category!r} was asked for but has no pair files (looked for {looked})")
            else:
                notes.append(f"no {category!r} pair files under {root} (looked for {looked}); "
                             f"the table has no {category} rows")
            continue
        gaps = []
        for tier in tiers:
            rel = present.get(tier)
            if rel is None:
                gaps.append(f"{category}/{tier}: no {_tier_candidates(layout, category, tier)[0]}")
            elif not _has_rows(os.path.join(root, rel)):
                gaps.append(f"{category}/{tier}: {rel} is empty")
            else:
                files.append((category, tier, rel))
        if gaps:
            problems += gaps
            found_here.append(f"found for {category}: {_found_listing(root, layout, category)}")
    if problems and not allow_missing:
        raise UserError(
            f"PersonaFeedback under {root} is incomplete: " + "; ".join(problems)
            + (f" ({'; '.join(found_here)})" if found_here else "") + ". Read fewer with --tiers / --categories, or go on without them with --allow-missing"
        )
    notes += [f"warning: {p}; the table has no row for it" for p in problems]
    if not files:
        raise UserError(
            f"no PersonaFeedback pair files for categories {categories} and tiers {tiers} "
            f"under {root} ({layout} layout)" + (": " + "; ".join(problems) if problems else "")
        )
    return PairFiles(root=root, layout=layout, files=tuple(files), notes=tuple(notes))


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


def load_pairs(root, *, categories=None, tiers=None, allow_missing=False):
    """All preference pairs under `root` (either layout), in file order.

    The files are those of `find_pair_files` (see there for which missing files are errors); its
    notes are logged as warnings. To print them next to a table, call `find_pair_files` and
    `read_pairs` yourself.
    """
    found = find_pair_files(root, categories=categories, tiers=tiers, allow_missing=allow_missing)
    for note in found.notes:
        log.warning("%s", note)
    return read_pairs(found)


def read_pairs(found):
    """The preference pairs of the files in `found` (a `PairFiles`), in file order."""
    root = found.root
    persona_of = _ReleasePersonas(root) if found.layout == "release" else _HFPersonas(root)
    pairs = []
    for category, tier, rel in found.files:
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
                    question=require_field(row, "question", str, where),
                    chosen=require_field(row, "chosen", str, where),
                    rejected=require_field(row, "reject", str, where),
                    tier=tier,
                    category=category,
                    source=f"{rel}:{lineno}",
                )
            )
    return pairs


# ----------------------------------------------------------------------------------------------
# RL prompts (verl parquet) and the evaluation questions.


def load_rl_prompts(path):
    """Rows of a verl-layout parquet (local or gs://...) as dicts, every column kept.

    `prompt` is checked to be a non-empty list of chat messages; errors count rows from 0, as
    pandas. A file without rows is an error: training on nothing is never what was meant.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from cpe_jax.data.jsonl import open_binary
    from cpe_jax.errors import require_path

    path = require_path(path, "RL prompt file")
    try:
        with open_binary(path, "RL prompt file") as f:
            rows = pq.read_table(f).to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise UserError(f"{path}: not a readable parquet file: {e}") from None
    if not rows:
        raise UserError(f"{path}: the parquet file has no rows")
    for i, row in enumerate(rows):
        where = f"{path}: row {i}"
        messages = require_field(row, "prompt", list, where)
        if not messages:
            raise UserError(f"{where}: field 'prompt' is an empty message list")
        for j, message in enumerate(messages):
            if not isinstance(message, dict):
                raise UserError(f"{where}: prompt[{j}] must be a chat message, got {message!r:.60}")
            for key in ("role", "content"):
                require_field(message, key, str, f"{where}: prompt[{j}]")
    return rows


@dataclasses.dataclass(frozen=True)
class RLPrompt:
    """One RL prompt: what the policy is asked (`messages`) and what the GRM and the edit step need."""

    persona: dict | str  # a JSON object, or text used as it is
    question: str
    messages: list  # the chat the policy answers
    reference: str | None  # a reference answer (verl's reward_model.ground_truth), when the file has one
    id: object  # extra_info.index / the row's `id`; else the row number
    source: str  # "file: row i" (parquet) or "file:line" (JSONL)


def load_prompt_set(path, language="en"):
    """The RL prompts of `path`: a verl-layout parquet (`.parquet`) or JSONL rows, local or gs://.

    JSONL rows are `{persona, question[, messages][, reference][, id]}`; without `messages` the
    policy prompt is `prompts.policy_messages` in `language`. Parquet rows keep their `prompt`
    as the policy's chat; persona and question come from explicit `persona` / `question` columns
    when present, otherwise from the last user turn, read back through the policy template it was
    made with (`prompts.POLICY_TEMPLATES`: both variants of the paper's release and ours). A row
    that yields no persona or question is a UserError naming the row and what is missing.
    """
    from cpe_jax.errors import require_path

    path = require_path(path, "data.path")
    if path.endswith(".parquet"):
        prompts = [_parquet_prompt(row, i, path) for i, row in enumerate(load_rl_prompts(path))]
    else:
        prompts = [_jsonl_prompt(row, lineno, path, language) for lineno, row in read_jsonl(path, "data.path")]
    if not prompts:
        raise UserError(f"data.path {path} has no prompts")
    return prompts


def _jsonl_prompt(row, lineno, path, language):
    from cpe_jax.data.prompts import policy_messages

    where = f"{path}:{lineno}"
    persona = require_field(row, "persona", (dict, str), where)
    question = require_field(row, "question", str, where)
    messages = row.get("messages") or policy_messages(persona, question, language)
    reference = require_field(row, "reference", str, where) if row.get("reference") is not None else None
    return RLPrompt(persona=persona, question=question, messages=messages, reference=reference,
                    id=row.get("id", lineno), source=where)


def _parquet_prompt(row, index, path):
    from cpe_jax.data.prompts import parse_policy_prompt

    extra = row.get("extra_info") if isinstance(row.get("extra_info"), dict) else {}
    row_id = extra.get("index", row.get("id"))
    where = f"{path}: row {index}" + (f" (extra_info.index {row_id})" if "index" in extra else "")
    fields = {name: row.get(name) for name in ("persona", "question") if row.get(name) is not None}
    if len(fields) < 2:
        users = [m["content"] for m in row["prompt"] if m["role"] == "user"]
        try:
            if not users:
                raise ValueError("the prompt has no user turn")
            _, persona_text, question = parse_policy_prompt(users[-1])
        except ValueError as e:
            absent = " and ".join(repr(n) for n in ("persona", "question") if n not in fields)
            raise UserError(f"{where}: cannot recover {absent}: {e}; add {absent} column(s) to the file") from None
        fields.setdefault("persona", persona_text)
        fields.setdefault("question", question.strip())
    persona = fields["persona"]
    if isinstance(persona, str):
        parsed = _persona_object(persona)
        persona = persona.strip() if parsed is None else parsed
    elif not isinstance(persona, dict):
        raise UserError(f"{where}: field 'persona' must be a JSON object or text, got {type(persona).__name__}")
    if not isinstance(fields["question"], str):
        raise UserError(f"{where}: field 'question' must be str, got {type(fields['question']).__name__}")
    reward = row.get("reward_model") if isinstance(row.get("reward_model"), dict) else {}
    reference = reward.get("ground_truth")
    if reference is not None and not isinstance(reference, str):
        raise UserError(f"{where}: reward_model.ground_truth must be text, got {type(reference).__name__}")
    return RLPrompt(persona=persona, question=fields["question"], messages=row["prompt"], reference=reference,
                    id=index if row_id is None else row_id, source=where)


def _persona_object(text):
    """`text` parsed as a JSON object, or None when it is not one (then the text is the persona)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return None
    return value if isinstance(value, dict) else None


def parse_persona(value, where):
    """A persona field: a JSON object, or a string holding one; a UserError with the reason otherwise."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise UserError(
                f"{where}: field 'persona' is not valid JSON ({e.msg} at line {e.lineno}, column {e.colno}); "
                "give a JSON object or a string holding one"
            ) from None
    return _check_persona(value, where)


def load_eval_set(path):
    """The evaluation questions `{question, persona, response}` (+ optional `tier`, `category`, `id`)."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise UserError(f"evaluation file does not exist: {path}")
    examples = []
    for lineno, row in read_jsonl(path, "evaluation file"):
        where = f"{path}:{lineno}"
        examples.append(
            EvalExample(
                question=require_field(row, "question", str, where),
                persona=parse_persona(require_field(row, "persona", (str, dict), where), where),
                response=require_field(row, "response", str, where),
                source=f"{os.path.basename(path)}:{lineno}",
                tier=optional_label(row, "tier", where),
                category=optional_label(row, "category", where),
                id=require_field(row, "id", (str, int), where) if row.get("id") is not None else None,
            )
        )
    if not examples:
        raise UserError(f"evaluation file {path} has no rows")
    return examples


_LABELS = {"tier": (TIERS, _TIER_ALIASES), "category": (CATEGORIES, _CATEGORY_ALIASES)}


def optional_label(row, name, where):
    """An optional `tier` or `category` field, the release's spellings mapped ("mid" -> "medium");
    an unknown value is a UserError listing the known ones."""
    if row.get(name) is None:
        return None
    value = require_field(row, name, str, where)
    allowed, aliases = _LABELS[name]
    value = aliases.get(value, value)
    if value not in allowed:
        raise UserError(f"{where}: unknown {name} {value!r}; known: {_known_names(allowed, aliases)}")
    return value

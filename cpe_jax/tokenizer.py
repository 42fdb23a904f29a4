"""Tokenizers from a local model directory, with the Qwen ChatML template as the fallback.

Only local files are read (no hub access, no remote code): a model directory must carry its
tokenizer as `tokenizer.json` or as `vocab.json` + `merges.txt`.
"""

import json
import logging
import os

import numpy as np

from cpe_jax.errors import UserError, require_path

logger = logging.getLogger(__name__)

# Qwen2.5's ChatML layout, used when the directory has no chat template of its own.
QWEN_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Special tokens that end a turn in Qwen checkpoints; counted as EOS when the vocabulary has them.
QWEN_EOS_TOKENS = ("<|im_end|>", "<|endoftext|>")


def _has_tokenizer_files(model_dir):
    def exists(name):
        return os.path.isfile(os.path.join(model_dir, name))

    return exists("tokenizer.json") or (exists("vocab.json") and exists("merges.txt"))


def _tokenizer_from_files(model_dir):
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    path = os.path.join(model_dir, "tokenizer.json")
    if os.path.isfile(path):
        return PreTrainedTokenizerFast(tokenizer_file=path)
    return Qwen2Tokenizer(
        vocab=os.path.join(model_dir, "vocab.json"), merges=os.path.join(model_dir, "merges.txt")
    )


def _register_qwen_special_tokens(tokenizer):
    """Make ChatML markers single tokens (never split into bytes) when the vocabulary has them."""
    missing = []
    for token in ("<|im_start|>",) + QWEN_EOS_TOKENS:
        token_id = _vocab_id(tokenizer, token)
        if token_id is not None and tokenizer.encode(token, add_special_tokens=False) != [token_id]:
            missing.append(token)
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})


def load_tokenizer(model_dir):
    """Load the tokenizer of `model_dir` as a transformers fast tokenizer with a chat template.

    Raises a UserError naming the directory when it has no tokenizer files.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    model_dir = require_path(model_dir, "model directory")
    if not _has_tokenizer_files(model_dir):
        raise UserError(
            f"no tokenizer in {model_dir}: expected tokenizer.json or vocab.json + merges.txt"
        )
    # tokenizer.json describes the whole pipeline (normalizer, pre-tokenizer, BPE), so it is read
    # as is: a class picked from config.json (e.g. Qwen2Tokenizer) would substitute its own
    # pre-tokenizer, and the same files would tokenize differently with or without config.json.
    has_json = os.path.isfile(os.path.join(model_dir, "tokenizer.json"))
    loader = PreTrainedTokenizerFast if has_json else AutoTokenizer
    try:
        tokenizer = loader.from_pretrained(
            model_dir, local_files_only=True, trust_remote_code=False
        )
    except (ValueError, OSError, KeyError):
        # No tokenizer_config.json / config.json naming a class that fits the files: build one
        # straight from the files, which describe the whole vocabulary.
        tokenizer = _tokenizer_from_files(model_dir)
    _register_qwen_special_tokens(tokenizer)
    if not getattr(tokenizer, "chat_template", None):
        tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    if tokenizer.eos_token_id is None:
        for token in QWEN_EOS_TOKENS:
            if tokenizer.convert_tokens_to_ids(token) not in (None, tokenizer.unk_token_id):
                tokenizer.eos_token = token
                break
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def apply_chat_template(tokenizer, messages, add_generation_prompt=True):
    """Token ids of a chat (list of {"role", "content"} dicts), ready to be sampled from.

    Rendered as text first and encoded without extra special tokens, so the ids are exactly the
    template's tokens whatever the tokenizer's BOS settings.
    """
    text = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    return list(tokenizer.encode(text, add_special_tokens=False))


def _vocab_id(tokenizer, token):
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        return None
    return int(token_id)


def eos_token_ids(tokenizer=None, model_dir=None, vocab_size=None):
    """All token ids that end a response: the tokenizer's EOS, Qwen's turn-end tokens, and the
    `eos_token_id` of the model's generation_config.json / config.json (int or list). With
    `vocab_size`, only the ids a model of that vocabulary can sample (see `sampleable_ids`)."""
    ids = []
    if tokenizer is not None:
        if tokenizer.eos_token_id is not None:
            ids.append(int(tokenizer.eos_token_id))
        for token in QWEN_EOS_TOKENS:
            token_id = _vocab_id(tokenizer, token)
            if token_id is not None:
                ids.append(token_id)
    if model_dir is not None:
        for name in ("generation_config.json", "config.json"):
            path = os.path.join(os.fspath(model_dir), name)
            if not os.path.isfile(path):
                continue
            try:
                with open(path) as f:
                    value = json.load(f).get("eos_token_id")
            except (json.JSONDecodeError, AttributeError) as e:
                raise UserError(f"{path}: not a JSON object ({e})") from None
            if value is None:
                continue
            ids.extend(int(v) for v in (value if isinstance(value, list) else [value]))
    ids = tuple(dict.fromkeys(ids))  # unique, in order
    return ids if vocab_size is None else sampleable_ids(ids, vocab_size, "EOS")


def sampleable_ids(ids, vocab_size, what="token"):
    """The ids in [0, vocab_size), in order: an id past the vocabulary can never be sampled, so as
    a stop token it would never fire. Dropped ids are named in one warning."""
    ids = tuple(int(i) for i in ids)
    kept = tuple(i for i in ids if 0 <= i < vocab_size)
    if len(kept) != len(ids):
        logger.warning("%s ids %s lie outside the vocabulary [0, %d) and are ignored", what,
                       [i for i in ids if i not in kept], vocab_size)
    return kept


def check_token_ids(ids, vocab_size, where):
    """`ids` unchanged, or a UserError naming `where` and the first id outside [0, vocab_size):
    such an id (a tokenizer larger than the model, a hand-written id) would read past the
    embedding table."""
    array = np.asarray(ids, np.int64)
    bad = (array < 0) | (array >= vocab_size)
    if bad.any():
        raise UserError(f"{where}: token id {int(array[bad][0])} is outside the model's vocabulary "
                        f"[0, {vocab_size})")
    return ids


def pad_token_id(tokenizer, vocab_size, eos_ids=()):
    """A padding id inside the vocabulary: the tokenizer's pad token if it is there, else the
    first EOS id that is, else 0. Padded positions are masked, but the id still has to be one the
    model can embed and a reader of the token buffer can decode."""
    for candidate in (getattr(tokenizer, "pad_token_id", None), *eos_ids):
        if candidate is not None and 0 <= int(candidate) < vocab_size:
            return int(candidate)
    return 0

import json

import pytest

from cpe_jax.errors import UserError
from cpe_jax.tokenizer import QWEN_CHAT_TEMPLATE, apply_chat_template, eos_token_ids, load_tokenizer

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Personalized answers respect what the user likes and dislikes.",
    "Revise the original reply according to the feedback.",
    "hello world, hello user, hello assistant",
] * 20


def write_tiny_tokenizer(model_dir, vocab_size=300, config=True, files="json"):
    """Train a byte-level BPE with Qwen's special tokens and save it like a Qwen checkpoint."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    model_dir.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    if files == "json":
        tok.save(str(model_dir / "tokenizer.json"))
    else:
        tok.model.save(str(model_dir))  # vocab.json + merges.txt
    if config:
        cfg = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "eos_token": "<|endoftext|>",
            "pad_token": "<|endoftext|>",
            "model_max_length": 4096,
        }
        (model_dir / "tokenizer_config.json").write_text(json.dumps(cfg))
    return model_dir


def _chatml(messages, add_generation_prompt):
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if add_generation_prompt else "")


MESSAGES = [
    {"role": "system", "content": "You are helpful."},
    {"role": "user", "content": "hello world"},
]


@pytest.mark.parametrize("config", [True, False])
def test_chatml_fallback_template_renders_qwen_layout(tmp_path, config):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "m", config=config))
    assert tok.chat_template == QWEN_CHAT_TEMPLATE
    for gen in (True, False):
        ids = apply_chat_template(tok, MESSAGES, add_generation_prompt=gen)
        assert ids == tok.encode(_chatml(MESSAGES, gen), add_special_tokens=False)
        assert tok.decode(ids) == _chatml(MESSAGES, gen)
    # special tokens are single ids, not split into bytes
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    assert apply_chat_template(tok, MESSAGES)[0] == im_start


def test_own_chat_template_wins(tmp_path):
    d = write_tiny_tokenizer(tmp_path / "m")
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    cfg["chat_template"] = "{% for m in messages %}[{{ m['content'] }}]{% endfor %}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    tok = load_tokenizer(d)
    assert tok.decode(apply_chat_template(tok, MESSAGES)) == "[You are helpful.][hello world]"


def test_vocab_and_merges_files_load_and_round_trip(tmp_path):
    tok = load_tokenizer(write_tiny_tokenizer(tmp_path / "m", files="vocab_merges"))
    text = "hello world, the quick fox"
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    ids = apply_chat_template(tok, MESSAGES)
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert tok.decode(ids) == _chatml(MESSAGES, True)


def test_eos_ids_from_tokenizer_and_generation_config(tmp_path):
    d = write_tiny_tokenizer(tmp_path / "m")
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 2]}))
    tok = load_tokenizer(d)
    endoftext = tok.convert_tokens_to_ids("<|endoftext|>")
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.pad_token_id == endoftext
    assert im_end == 2  # so the generation config repeats it
    assert eos_token_ids(tok, d) == (endoftext, im_end, 7)


def test_missing_tokenizer_names_directory(tmp_path):
    d = tmp_path / "no_tokenizer"
    d.mkdir()
    with pytest.raises(UserError, match="no_tokenizer"):
        load_tokenizer(d)
    with pytest.raises(UserError, match="does_not_exist"):
        load_tokenizer(tmp_path / "does_not_exist")


def test_same_files_tokenize_the_same_with_or_without_config_json(tmp_path):
    """A plain ByteLevel tokenizer.json must not be re-interpreted because config.json says qwen2."""
    import json

    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    from cpe_jax.tokenizer import load_tokenizer

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["hello world, it's 2024!  spaced   text"] * 50, trainer)
    plain, with_config = tmp_path / "plain", tmp_path / "with_config"
    for d in (plain, with_config):
        d.mkdir()
        tok.save(str(d / "tokenizer.json"))
    (with_config / "config.json").write_text(json.dumps({"model_type": "qwen2"}))
    text = "hello world, it's 2024!  spaced   text"
    assert load_tokenizer(str(plain)).encode(text) == load_tokenizer(str(with_config)).encode(text)

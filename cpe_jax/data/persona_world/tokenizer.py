"""PersonaWorld's BPE tokenizer: trained on the world's texts and the pipeline's prompt
templates, saved as a Hugging Face tokenizer with the ChatML special tokens."""

import json
import os
import random

from cpe_jax.data.persona_world.responses import generate_response, random_quality
from cpe_jax.data.persona_world.teacher import teacher_judgement
from cpe_jax.data.persona_world.world import persona_text, policy_messages


SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_corpus(world, n_responses=3000, seed=0, grm_prompt_style="full"):
    """Texts the tokenizer should encode compactly: personas, questions, responses of every
    quality, teacher critiques, and the pipeline's prompt templates in ChatML (the GRM prompt in
    `grm_prompt_style`, the one the pipeline will judge with)."""
    from cpe_jax.data import prompts

    rng = random.Random(seed)
    personas = world.train_personas + world.eval_personas
    questions = world.train_questions + world.eval_questions
    # Every prompt carries a persona line and a question: seen often enough to become few tokens.
    texts = ([persona_text(p) for p in personas] + [q["text"] for q in questions]) * 4
    texts += [f"{label}: {score}" for label in prompts.SCORE_LABELS for score in range(-5, 6)]
    for k in range(n_responses):
        persona, question = rng.choice(personas), rng.choice(questions)
        response = generate_response(world, persona, question, rng, random_quality(rng))
        judgement = teacher_judgement(persona, question, response)
        texts += [response, judgement, teacher_judgement(persona, question, response, "short")]
        if k % 20 == 0:  # the fixed templates only need to be seen a few times
            user_prompt = policy_messages(persona, question)[0]["content"]
            for messages in (
                policy_messages(persona, question),
                prompts.grm_messages(persona_text(persona), question["text"], response, style=grm_prompt_style),
                prompts.post_edit_messages(user_prompt, response, judgement),
                prompts.pairwise_judge_messages(persona_text(persona), question["text"],
                                                response, response),
            ):
                texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                     for m in messages))
    return texts


def train_tokenizer(world, out_dir, vocab_size=2048, n_responses=3000, seed=0, grm_prompt_style="full"):
    """Train a Qwen-style byte-level BPE on the world's text and save it in Hugging Face format.

    `transformers.AutoTokenizer.from_pretrained(out_dir)` loads it offline, with the ChatML chat
    template and `<|im_end|>` as EOS like Qwen2.5-Instruct. Returns the loaded tokenizer.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from cpe_jax.tokenizer import QWEN_CHAT_TEMPLATE

    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(tokenizer_corpus(world, n_responses, seed, grm_prompt_style), trainer)

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>", "<|im_end|>"],
        chat_template=QWEN_CHAT_TEMPLATE, model_max_length=4096, clean_up_tokenization_spaces=False)
    os.makedirs(out_dir, exist_ok=True)
    fast.save_pretrained(out_dir)
    # Older transformers read the template, class and special tokens from tokenizer_config.json.
    config_path = os.path.join(out_dir, "tokenizer_config.json")
    with open(config_path) as f:
        config = json.load(f)
    config.update(tokenizer_class="PreTrainedTokenizerFast", chat_template=QWEN_CHAT_TEMPLATE,
                  additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    with open(config_path, "w") as f:
        json.dump(config, f, indent=2)
    special_map = os.path.join(out_dir, "special_tokens_map.json")
    if not os.path.exists(special_map):  # recent transformers keep these in tokenizer_config only
        with open(special_map, "w") as f:
            json.dump({"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>",
                       "additional_special_tokens": ["<|im_start|>", "<|im_end|>"]}, f, indent=2)
    return AutoTokenizer.from_pretrained(out_dir, local_files_only=True)

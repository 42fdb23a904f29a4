"""The teacher as chat judges, reading prompts built by cpe_jax.data.prompts: `ChatJudge`s and
plain `module:function` judges (`grm_teacher`, `grm_teacher_short`, `pairwise_teacher`)."""

import math
import re

from cpe_jax.data.persona_world.catalog import PREFERENCE_TEMPERATURE
from cpe_jax.data.persona_world.teacher import teacher_judgement, teacher_preference
from cpe_jax.errors import UserError


def prompt_field(conversation, name):
    """The text of a `<<<NAME>>>` ... `<<<END NAME>>>` field (layout of cpe_jax.data.prompts)."""
    text = "\n".join(m.get("content", "") for m in conversation if m.get("role") == "user")
    m = re.search(rf"<<<{name}>>>\n(.*?)\n<<<END {name}>>>", text, re.DOTALL)
    if not m:
        raise UserError(f"the PersonaWorld teacher found no <<<{name}>>> field in the judge prompt; "
                        "it reads prompts built by cpe_jax.data.prompts")
    return m.group(1).replace("&lt;", "<")  # undo prompts.neutralize_markup


def teacher_chat_judge(world=None, critique_style="full"):
    """The teacher as a ChatJudge over `prompts.grm_messages` conversations (plays GPT-4o-mini).

    Everything is read back from the prompt (the persona rendering carries all attributes), so
    `world` is optional and only kept for call-site symmetry with `teacher_pairwise_chat_judge`.
    """
    from cpe_jax.reward.judges import CallableJudge

    del world

    def judge(conversation):
        return teacher_judgement(prompt_field(conversation, "PERSONA"),
                                 prompt_field(conversation, "QUESTION"),
                                 prompt_field(conversation, "RESPONSE"), critique_style)

    return CallableJudge(judge)


def teacher_pairwise_chat_judge(world=None, temperature=PREFERENCE_TEMPERATURE):
    """The pairwise teacher as a ChatJudge over `prompts.pairwise_judge_messages` (plays GPT-4.1).

    Replies with the preferred letter and first-token log-probs of "A" and "B" carrying the soft
    preference, which `eval.winrate` reads.
    """
    from cpe_jax.reward.judges import CallableJudge, JudgeReply

    del world

    def judge(conversation):
        p = teacher_preference(prompt_field(conversation, "PERSONA"),
                               prompt_field(conversation, "QUESTION"),
                               prompt_field(conversation, "RESPONSE A"),
                               prompt_field(conversation, "RESPONSE B"), temperature)
        p = min(max(p, 1e-12), 1 - 1e-12)
        return JudgeReply(text="A" if p >= 0.5 else "B",
                          first_token_logprobs={"A": math.log(p), "B": math.log(1 - p)})

    return CallableJudge(judge)


def grm_teacher(conversation):
    """The teacher as a plain `fn(conversation) -> str`, for `module:function` judge settings
    (`--judge-fn cpe_jax.data.persona_world:grm_teacher`, `grm.judge_fn` in RL configs)."""
    return teacher_chat_judge().fn(conversation)


def grm_teacher_short(conversation):
    """`grm_teacher` with terse critiques (`critique_style="short"`), for distilling tiny GRMs."""
    return teacher_chat_judge(critique_style="short").fn(conversation)


def pairwise_teacher(conversation):
    """The pairwise teacher as a plain `fn(conversation) -> JudgeReply` (soft preference in logprobs)."""
    return teacher_pairwise_chat_judge().fn(conversation)

"""PersonaWorld: a synthetic personalization benchmark small enough for a tiny model on a CPU.

Real personalization data needs a 7B policy and GPT-4-class judges. PersonaWorld keeps the shape of
the problem (personas, questions, a rubric judge that writes critiques) but shrinks the language:
responses are 15-60 words assembled from a few hundred words, so a tiny Qwen2 with a ~1k BPE
vocabulary can learn to personalize in minutes.

Every fact the judge needs is visible in the words: each suggested item is a fixed phrase with tags
(diet, cost, level, category), tone is carried by marker phrases, padding is a fixed set of filler
sentences or a repeated sentence. The programmatic teacher therefore parses free text (a policy's
output) rather than trusting hidden labels, and plays both the GRM teacher and the evaluation judge.

Modules, by concern: catalog (attributes, items, templates, phrase recognisers), world (personas,
questions, splits), responses (grammar, damage, revisions), teacher (scores, critiques,
preferences), judges (the teacher as chat judges), tokenizer (BPE). Every public name is
imported here, so `from cpe_jax.data.persona_world import X` and `persona_world:grm_teacher`
judge settings keep working.
"""

from cpe_jax.data.persona_world.catalog import (  # noqa: F401
    BUDGETS,
    CATEGORIES,
    CLOSERS,
    DETAILED_CONTENT,
    DIETS,
    DIET_ALLOWS,
    DRIFTS,
    DRIFT_KEYS,
    EXPERTISE,
    FILLERS,
    FILLER_KEYS,
    INTERESTS,
    INTEREST_LINKS,
    INTEREST_PATTERN,
    ITEMS,
    ITEMS_BY_CATEGORY,
    ITEM_BY_NAME,
    ITEM_PATTERN,
    Item,
    KNOWN_SENTENCES,
    LENGTHS,
    NAMES,
    OCCUPATIONS,
    OPENERS,
    PREFERENCE_TEMPERATURE,
    QUESTION_FORMS,
    QUESTION_TOPICS,
    SHORTER_ON_TIE,
    SUGGESTION_FORMS,
    TIPS,
    TIP_CATEGORY,
    TONES,
    TONE_MARKERS,
    USES_DIET,
    USES_EXPERTISE,
    normalize_sentence,
    other_value,
    split_sentences,
)
from cpe_jax.data.persona_world.world import (  # noqa: F401
    World,
    as_rng,
    make_persona,
    make_world,
    persona_attributes,
    persona_from_text,
    persona_text,
    policy_messages,
    question_category,
    question_text,
    sample_prompts,
)
from cpe_jax.data.persona_world.responses import (  # noqa: F401
    BEST_QUALITY,
    DAMAGES,
    best_response,
    damaged_response,
    generate_response,
    noisy_demonstration,
    random_quality,
    revise_response,
)
from cpe_jax.data.persona_world.teacher import (  # noqa: F401
    CRITIQUE_STYLES,
    teacher_judgement,
    teacher_preference,
    teacher_reward,
    teacher_scores,
)
from cpe_jax.data.persona_world.judges import (  # noqa: F401
    grm_teacher,
    grm_teacher_short,
    pairwise_teacher,
    prompt_field,
    teacher_chat_judge,
    teacher_pairwise_chat_judge,
)
from cpe_jax.data.persona_world.tokenizer import (  # noqa: F401
    SPECIAL_TOKENS,
    tokenizer_corpus,
    train_tokenizer,
)

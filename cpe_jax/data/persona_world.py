"""PersonaWorld: a synthetic personalization benchmark small enough for a tiny model on a CPU.

Real personalization data needs a 7B policy and GPT-4-class judges. PersonaWorld keeps the shape of
the problem (personas, questions, a rubric judge that writes critiques) but shrinks the language:
responses are 15-60 words assembled from a few hundred words, so a tiny Qwen2 with a ~1k BPE
vocabulary can learn to personalize in minutes.

Every fact the judge needs is visible in the words: each suggested item is a fixed phrase with tags
(diet, cost, level, category), tone is carried by marker phrases, padding is a fixed set of filler
sentences or a repeated sentence. The programmatic teacher therefore parses free text (a policy's
output) rather than trusting hidden labels, and plays both the GRM teacher and the evaluation judge.
"""

import dataclasses
import itertools
import json
import math
import os
import random
import re
from typing import Optional

from cpe_jax.errors import UserError

# ------------------------------------------------------------------------------------------------
# Static catalog: the vocabulary of the world. Only persona sampling and splits depend on the seed.
# ------------------------------------------------------------------------------------------------

DIETS = ("omnivore", "pescatarian", "vegetarian", "vegan")
BUDGETS = ("low", "high")
TONES = ("casual", "formal")
LENGTHS = ("short", "detailed")
EXPERTISE = ("beginner", "expert")
INTERESTS = (
    "hiking", "music", "photography", "gaming", "reading",
    "gardening", "painting", "cycling", "chess", "dancing",
)
NAMES = (
    "Mia", "Leo", "Ava", "Noah", "Emma", "Liam", "Zoe", "Omar", "Lina", "Ivan", "Sara", "Tom",
    "Nina", "Ali", "Rosa", "Ben", "Yuki", "Max", "Ella", "Sam", "Ada", "Jon", "Lea", "Kai",
)
OCCUPATIONS = (
    "teacher", "nurse", "engineer", "student", "designer", "driver", "farmer", "lawyer",
    "chef", "clerk", "writer", "doctor",
)

# Diets each diet accepts, by the diet tag of a dish.
DIET_ALLOWS = {
    "omnivore": {"vegan", "vegetarian", "fish", "meat"},
    "pescatarian": {"vegan", "vegetarian", "fish"},
    "vegetarian": {"vegan", "vegetarian"},
    "vegan": {"vegan"},
}


@dataclasses.dataclass(frozen=True)
class Item:
    """One suggestion phrase. `diet` only for dishes; `cost` cheap/luxury/None; `level` basic/jargon/None."""

    name: str
    category: str
    diet: Optional[str] = None
    cost: Optional[str] = None
    level: Optional[str] = None

    @property
    def text(self):
        return ("an " if self.name[0] in "aeiou" else "a ") + self.name


def _items(category, rows):
    return tuple(Item(name, category, *tags) for name, *tags in rows)


ITEMS = (
    _items("food", [
        ("lentil curry", "vegan", "cheap"),
        ("chickpea salad", "vegan", "cheap"),
        ("bean chili", "vegan", "cheap"),
        ("tofu stir fry", "vegan", None),
        ("vegetable soup", "vegan", "cheap"),
        ("vegan tasting menu", "vegan", "luxury"),
        ("mushroom risotto", "vegetarian", None),
        ("cheese omelette", "vegetarian", "cheap"),
        ("spinach pasta bake", "vegetarian", None),
        ("truffle pasta", "vegetarian", "luxury"),
        ("grilled steak", "meat", "luxury"),
        ("roast chicken", "meat", None),
        ("bacon sandwich", "meat", "cheap"),
        ("wagyu burger", "meat", "luxury"),
        ("salmon fillet", "fish", None),
        ("lobster dinner", "fish", "luxury"),
        ("tuna wrap", "fish", "cheap"),
    ])
    + _items("travel", [
        ("hostel bed", None, "cheap"),
        ("camping site", None, "cheap"),
        ("night train", None, "cheap"),
        ("free walking tour", None, "cheap"),
        ("local bus pass", None, "cheap"),
        ("luxury hotel", None, "luxury"),
        ("private yacht tour", None, "luxury"),
        ("first class flight", None, "luxury"),
        ("spa resort", None, "luxury"),
        ("museum visit", None, None),
        ("day hike", None, None),
        ("harbor boat ride", None, None),
    ])
    + _items("fitness", [
        ("short daily walk", None, "cheap", "basic"),
        ("gentle stretching routine", None, "cheap", "basic"),
        ("light squat session", None, None, "basic"),
        ("easy jog", None, "cheap", "basic"),
        ("beginner yoga class", None, None, "basic"),
        ("periodized hypertrophy block", None, None, "jargon"),
        ("lactate threshold run", None, None, "jargon"),
        ("progressive overload plan", None, "cheap", "jargon"),
        ("zone two base phase", None, "cheap", "jargon"),
        ("plyometric power circuit", None, None, "jargon"),
        ("personal trainer", None, "luxury", None),
        ("premium gym membership", None, "luxury", None),
        ("swim session", None, None, None),
    ])
    + _items("gifts", [
        ("handwritten card", None, "cheap"),
        ("homemade cake", None, "cheap"),
        ("photo album", None, "cheap"),
        ("small potted plant", None, "cheap"),
        ("designer watch", None, "luxury"),
        ("diamond necklace", None, "luxury"),
        ("silk scarf", None, "luxury"),
        ("good novel", None, None),
        ("concert ticket", None, None),
        ("cozy blanket", None, None),
    ])
    + _items("learning", [
        ("free online course", None, "cheap", "basic"),
        ("simple starter book", None, "cheap", "basic"),
        ("short daily practice", None, "cheap", "basic"),
        ("easy video lesson", None, "cheap", "basic"),
        ("spaced repetition schedule", None, "cheap", "jargon"),
        ("interleaved practice plan", None, None, "jargon"),
        ("metacognitive error log", None, "cheap", "jargon"),
        ("private tutor", None, "luxury", None),
        ("expensive masterclass", None, "luxury", None),
        ("weekly study group", None, None, None),
    ])
)
CATEGORIES = ("food", "travel", "fitness", "gifts", "learning")
ITEMS_BY_CATEGORY = {c: tuple(i for i in ITEMS if i.category == c) for c in CATEGORIES}
ITEM_BY_NAME = {i.name: i for i in ITEMS}

# Which attributes matter for which category.
USES_DIET = {"food"}
USES_EXPERTISE = {"fitness", "learning"}

QUESTION_TOPICS = {
    "food": ("dinner", "lunch", "a weekend brunch", "a party with friends"),
    "travel": ("a weekend trip", "a summer holiday", "a city break", "a trip to the coast"),
    "fitness": ("getting stronger", "running faster", "staying active", "having more energy"),
    "gifts": ("my sister", "my father", "a close friend", "my colleague"),
    "learning": ("the guitar", "spanish", "coding", "drawing"),
}
QUESTION_FORMS = {
    "food": ("What should I cook for {}?", "Any ideas for {}?", "What can I make for {} this week?"),
    "travel": ("How should I plan {}?", "Any ideas for {}?", "What do you suggest for {}?"),
    "fitness": ("How can I work on {}?", "Any tips for {}?", "What do you suggest for {}?"),
    "gifts": ("What gift should I buy for {}?", "Any gift ideas for {}?", "What is a good present for {}?"),
    "learning": ("How should I start learning {}?", "Any tips for learning {}?", "What is the best way to learn {}?"),
}

TIPS = {
    "food": ("Cook a big batch and keep some for later.", "Add fresh herbs for more flavor.",
             "Prepare the vegetables the night before."),
    "travel": ("Book early to get better prices.", "Pack light and bring a rain jacket.",
               "Check the local events calendar."),
    "fitness": ("Rest one day between sessions.", "Drink plenty of water.",
                "Warm up for five minutes first."),
    "gifts": ("Add a short personal note.", "Wrap it in simple paper.",
              "Think about what they like most."),
    "learning": ("Set one small goal each week.", "Review your notes every weekend.",
                 "Keep a list of new words and ideas."),
}
TIP_CATEGORY = {tip.lower().rstrip("."): c for c, tips in TIPS.items() for tip in tips}

INTEREST_LINKS = {
    "hiking": "plan it around a trail walk",
    "music": "add a playlist you like",
    "photography": "bring your camera along",
    "gaming": "turn it into a little game",
    "reading": "pair it with a good story",
    "gardening": "use herbs from your garden",
    "painting": "sketch what you see",
    "cycling": "get there by bike",
    "chess": "plan each step like a chess game",
    "dancing": "end the day with a dance",
}

# Tone lives in openers, closers and suggestion templates; None is the neutral register.
OPENERS = {
    "casual": ("Hey!", "Hey there!", "Oh, fun one!"),
    "formal": ("Certainly.", "Good day.", "Thank you for asking."),
    None: ("Here are some ideas.", "Sure."),
}
CLOSERS = {
    "casual": ("Have fun!", "You got this!", "Enjoy, buddy!"),
    "formal": ("Kind regards.", "Best wishes.", "I hope this helps."),
    None: ("Good luck.", "Hope that works."),
}
SUGGESTION_FORMS = {
    "casual": ("Grab {}!", "Try {}, so cool!", "{} is awesome!"),
    "formal": ("I recommend {}.", "Consider {}.", "I suggest {}."),
    None: ("One option is {}.", "Another idea is {}.", "You can pick {}."),
}
TONE_MARKERS = {
    "casual": ("hey", "fun one", "grab", "so cool", "awesome", "have fun", "you got this",
               "buddy"),
    "formal": ("certainly", "good day", "thank you for asking", "i recommend", "consider",
               "i suggest", "kind regards", "best wishes", "i hope this helps"),
}
FILLERS = (
    "As you may know, it depends.",
    "To be honest, it is up to you.",
    "In any case, everyone is different.",
    "All in all, there is a lot to say.",
    "Needless to say, options vary.",
)
DRIFTS = {
    "the weather": "By the way, the weather has been lovely lately.",
    "colors": "Also, my favorite color is blue.",
    "cats": "Speaking of which, cats sleep a lot.",
    "the moon": "On another note, the moon looks bright tonight.",
}

# Distinct suggestions + tips from which an answer counts as detailed (padding never counts).
DETAILED_CONTENT = 4

PREFERENCE_TEMPERATURE = 0.5
SHORTER_ON_TIE = 0.55  # P(shorter wins) when the combined scores are exactly equal


# ------------------------------------------------------------------------------------------------
# Personas, questions and the world
# ------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class World:
    """A seeded PersonaWorld: disjoint train/eval personas and questions."""

    seed: int
    train_personas: list
    eval_personas: list
    train_questions: list
    eval_questions: list

    def personas(self, split):
        return {"train": self.train_personas, "eval": self.eval_personas}[_check_split(split)]

    def questions(self, split):
        return {"train": self.train_questions, "eval": self.eval_questions}[_check_split(split)]


def _check_split(split):
    if split not in ("train", "eval"):
        raise UserError(f"split must be 'train' or 'eval', got {split!r}")
    return split


def _make_persona(pid, name, age, occupation, diet, budget, tone, length, expertise, interests):
    attributes = {
        "diet": diet, "budget": budget, "tone": tone, "length": length,
        "expertise": expertise, "interests": list(interests),
    }
    return {
        "id": pid,
        "Name": name,
        "Demographics": {"Age": age, "Occupation": occupation},
        "Personality": {"Tone": tone, "Expertise": expertise},
        "Preference": {"Diet": diet, "Budget": budget, "Answer_Length": length},
        "Content_Interests": list(interests),
        "attributes": attributes,
    }


def make_world(seed=0, n_train_personas=160, n_eval_personas=40, n_eval_questions_per_category=3):
    """Sample a world. Eval personas have attribute combinations never seen in training, and eval
    questions are (topic, wording) pairs never seen in training."""
    rng = random.Random(seed)
    combos = list(itertools.product(
        DIETS, BUDGETS, TONES, LENGTHS, EXPERTISE, itertools.combinations(INTERESTS, 2)))
    n_total = n_train_personas + n_eval_personas
    if n_total > len(combos):
        raise UserError(f"at most {len(combos)} personas, asked for {n_total}")
    chosen = rng.sample(combos, n_total)
    personas = []
    for k, (diet, budget, tone, length, expertise, interests) in enumerate(chosen):
        personas.append(_make_persona(
            f"u{seed}_{k:04d}", rng.choice(NAMES), rng.randint(18, 70), rng.choice(OCCUPATIONS),
            diet, budget, tone, length, expertise, interests))

    train_q, eval_q = [], []
    for category in CATEGORIES:
        questions = [
            {"id": f"{category}_{t}_{f}", "category": category, "topic": topic,
             "text": form.format(topic)}
            for t, topic in enumerate(QUESTION_TOPICS[category])
            for f, form in enumerate(QUESTION_FORMS[category])
        ]
        rng.shuffle(questions)
        eval_q += questions[:n_eval_questions_per_category]
        train_q += questions[n_eval_questions_per_category:]
    return World(seed, personas[:n_train_personas], personas[n_train_personas:], train_q, eval_q)


def persona_text(persona):
    """Short one-line rendering for prompts; `persona_from_text` reads it back."""
    a = persona["attributes"]
    d = persona["Demographics"]
    return (
        f"User: {persona['Name']}, {d['Age']}, {d['Occupation']}. Diet: {a['diet']}. "
        f"Budget: {a['budget']}. Tone: {a['tone']}. Answers: {a['length']}. "
        f"Level: {a['expertise']}. Interests: {', '.join(a['interests'])}."
    )


_PERSONA_FIELDS = {
    "diet": (r"diet", DIETS),
    "budget": (r"budget", BUDGETS),
    "tone": (r"tone", TONES),
    "length": (r"answers|answer[ _]length|length", LENGTHS),
    "expertise": (r"level|expertise", EXPERTISE),
}


def persona_from_text(text):
    """Structured attributes from a persona rendering: `persona_text` or a JSON dump of the dict.

    The field names are searched with their value right after them, so the layout (one line,
    JSON, YAML-ish) does not matter. Raises a UserError naming the missing field.
    """
    attributes = {}
    for field, (keys, values) in _PERSONA_FIELDS.items():
        m = re.search(rf"\b(?:{keys})\W+({'|'.join(values)})\b", text, re.IGNORECASE)
        if not m:
            raise UserError(f"persona text has no recognisable {field!r} field: {text[:80]!r}")
        attributes[field] = m.group(1).lower()
    m = re.search(r"interests\W+([^.\]\n]*(?:\n[^\]:]*)?)", text, re.IGNORECASE)
    span = m.group(1).lower() if m else ""
    attributes["interests"] = [i for i in INTERESTS if re.search(rf"\b{i}\b", span)]
    name = re.search(r"(?:user|name)\W+(\w+)", text, re.IGNORECASE)
    return _make_persona(None, name.group(1) if name else "user", 0, "", attributes["diet"],
                         attributes["budget"], attributes["tone"], attributes["length"],
                         attributes["expertise"], attributes["interests"])


def question_category(question):
    """Category of a question dict or of a question text (by its topic words)."""
    if isinstance(question, dict):
        return question["category"]
    text = question.lower()
    for category, topics in QUESTION_TOPICS.items():
        if any(topic in text for topic in topics):
            return category
    for category, forms in QUESTION_FORMS.items():  # an unseen topic in a known wording
        for form in forms:
            pattern = re.escape(form.lower()).replace(r"\{\}", ".+")
            if re.fullmatch(pattern, text.strip()):
                return category
    return None


def question_text(question):
    return question["text"] if isinstance(question, dict) else str(question)


def policy_messages(persona, question):
    """The policy's chat prompt: persona line and question in one short user turn."""
    return [{"role": "user",
             "content": f"{persona_text(persona)}\nQuestion: {question_text(question)}"}]


def sample_prompts(world, split, n, rng):
    """`n` (persona, question) pairs from a split, sampled with replacement by `rng`."""
    rng = _as_rng(rng)
    personas, questions = world.personas(split), world.questions(split)
    return [(rng.choice(personas), rng.choice(questions)) for _ in range(n)]


def _as_rng(rng):
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"expected random.Random or an int seed, got {type(rng).__name__}")


# ------------------------------------------------------------------------------------------------
# Response grammar
# ------------------------------------------------------------------------------------------------

BEST_QUALITY = {
    "diet": True, "budget": True, "tone": True, "length": True, "expertise": True,
    "interest": True, "on_topic": True, "padding": 0,
}


def _respects(item, attrs, category):
    """Whether `item` is compatible with every attribute that matters for `category`."""
    if category in USES_DIET and item.diet not in DIET_ALLOWS[attrs["diet"]]:
        return False
    if attrs["budget"] == "low" and item.cost == "luxury":
        return False
    if category in USES_EXPERTISE:
        if attrs["expertise"] == "beginner" and item.level == "jargon":
            return False
        if attrs["expertise"] == "expert" and item.level == "basic":
            return False
    return True


def _violators(attrs, category, which):
    """Items of `category` that break attribute `which` for this persona (maybe none)."""
    pool = ITEMS_BY_CATEGORY[category]
    if which == "diet" and category in USES_DIET:
        return [i for i in pool if i.diet not in DIET_ALLOWS[attrs["diet"]]]
    if which == "budget":
        return [i for i in pool if i.cost == ("luxury" if attrs["budget"] == "low" else "cheap")]
    if which == "expertise" and category in USES_EXPERTISE:
        bad = "jargon" if attrs["expertise"] == "beginner" else "basic"
        return [i for i in pool if i.level == bad]
    return []


def _pick_items(attrs, category, n, quality, rng):
    pool = ITEMS_BY_CATEGORY[category]
    good = [i for i in pool if _respects(i, attrs, category)]
    picked = []
    # A high-budget user is served by at least one luxury option; an expert by real jargon.
    if quality.get("budget", True) and attrs["budget"] == "high":
        picked.append(rng.choice([i for i in good if i.cost == "luxury"]))
    if (quality.get("expertise", True) and category in USES_EXPERTISE
            and attrs["expertise"] == "expert"):
        picked.append(rng.choice([i for i in good if i.level == "jargon" and i not in picked]))
    for which in ("diet", "budget", "expertise"):
        if not quality.get(which, True):
            bad = [i for i in _violators(attrs, category, which) if i not in picked]
            if bad:
                picked.append(rng.choice(bad))
    if not quality.get("budget", True) and attrs["budget"] == "high":
        good = [i for i in good if i.cost != "luxury"]  # only cheap or plain options
    rest = [i for i in good if i not in picked]
    rng.shuffle(rest)
    picked += rest[: max(0, n - len(picked))]
    picked = picked[:max(n, 1)]
    rng.shuffle(picked)
    return picked


def _persona_attrs(persona):
    """Structured attributes of a persona dict, of an attributes dict, or of a rendering."""
    if isinstance(persona, str):
        return persona_from_text(persona)["attributes"]
    if "attributes" in persona:
        return persona["attributes"]
    if "diet" in persona:
        return persona
    return persona_from_text(json.dumps(persona, ensure_ascii=False))["attributes"]


def generate_response(world, persona, question, rng, quality=None):
    """A response whose flaws are controlled by `quality` (missing keys take BEST_QUALITY).

    quality keys: diet/budget/expertise (True respects, False adds a violating suggestion where
    the category allows one), tone (True persona's tone, False the opposite, None neutral),
    length (True matches the preferred length, False the other one), interest (True links to one
    of the persona's interests, False to an interest the persona lacks, None no link), on_topic
    (False inserts an off-topic sentence or an item from another category), padding (number of
    filler or repeated sentences).
    """
    del world  # the grammar is static; kept in the signature for world-specific variants
    rng = _as_rng(rng)
    q = dict(BEST_QUALITY, **(quality or {}))
    attrs = _persona_attrs(persona)
    category = question_category(question)
    if category is None:
        raise UserError(f"question {question_text(question)!r} is not a PersonaWorld question")

    tone = attrs["tone"] if q["tone"] is True else (None if q["tone"] is None else
                                                     _other(TONES, attrs["tone"]))
    detailed = (attrs["length"] == "detailed") == bool(q["length"])
    n_items, n_tips = (3, 1) if detailed else (2, 1)

    body = [rng.choice(SUGGESTION_FORMS[tone]).format(item.text)
            for item in _pick_items(attrs, category, n_items, q, rng)]
    body = [s[0].upper() + s[1:] for s in body]
    body += rng.sample(TIPS[category], n_tips)
    if q["interest"] is not None:
        if q["interest"]:
            interest = rng.choice(attrs["interests"])
        else:
            interest = rng.choice([i for i in INTERESTS if i not in attrs["interests"]])
        verb = rng.choice(("love", "enjoy", "like"))
        body.append(f"Since you {verb} {interest}, {INTEREST_LINKS[interest]}.")
    if not q["on_topic"]:
        if rng.random() < 0.5:
            drift = rng.choice(list(DRIFTS.values()))
        else:
            other = rng.choice([c for c in CATEGORIES if c != category])
            drift = rng.choice(SUGGESTION_FORMS[tone]).format(
                rng.choice(ITEMS_BY_CATEGORY[other]).text)
            drift = drift[0].upper() + drift[1:]
        body.insert(rng.randint(1, len(body)), drift)
    for _ in range(int(q["padding"])):
        if rng.random() < 0.5:
            extra = rng.choice(FILLERS)
        else:
            extra = rng.choice(body)
        body.insert(rng.randint(0, len(body)), extra)
    return " ".join([rng.choice(OPENERS[tone]), *body, rng.choice(CLOSERS[tone])])


def _other(values, value):
    return next(v for v in values if v != value)


def best_response(world, persona, question, rng):
    """A response that respects every attribute, stays on topic and has no padding."""
    return generate_response(world, persona, question, rng, BEST_QUALITY)


def random_quality(rng, p_good=0.5):
    """A random mix of strengths and flaws; `p_good` is the chance each aspect is right."""
    rng = _as_rng(rng)
    good = lambda: rng.random() < p_good  # noqa: E731
    return {
        "diet": good(), "budget": good(), "expertise": good(), "length": good(),
        "tone": True if good() else rng.choice([False, None]),
        "interest": True if good() else rng.choice([False, None]),
        "on_topic": rng.random() < 0.5 + p_good / 2,
        "padding": 0 if good() else rng.randint(1, 2),
    }


def noisy_demonstration(world, persona, question, rng, p_good=0.5):
    """An SFT target of mixed quality, so a policy trained on many of them starts mediocre."""
    rng = _as_rng(rng)
    return generate_response(world, persona, question, rng, random_quality(rng, p_good))


DAMAGES = ("no_suggestion", "only_link", "truncated", "repeated", "garbled", "stutter", "opener_only")


def damaged_response(world, persona, question, rng, damage=None):
    """A response broken in a way a policy under RL drifts into and the grammar never produces:
    no suggestion at all, just an interest link, cut off mid-sentence, one sentence repeated,
    words dropped, a stuttered word, or a greeting alone. A reward model distilled from the
    teacher must see these to score them as badly as the teacher does."""
    rng = _as_rng(rng)
    damage = damage or rng.choice(DAMAGES)
    if damage not in DAMAGES:
        raise UserError(f"damage must be one of {DAMAGES}, got {damage!r}")
    sentences = split_sentences(generate_response(world, persona, question, rng, random_quality(rng, 0.7)))
    opener, body, closer = sentences[0], sentences[1:-1], sentences[-1]
    with_items = [s for s in body if _ITEM_PATTERN.search(_norm(s))]
    if damage == "no_suggestion":
        body = [s for s in body if s not in with_items]
    elif damage == "only_link":
        attrs = _persona_attrs(persona)
        interest = rng.choice(attrs["interests"] if rng.random() < 0.7 else INTERESTS)
        body = [f"Since you {rng.choice(('love', 'enjoy', 'like'))} {interest}, {INTEREST_LINKS[interest]}."]
        body *= rng.randint(1, 3)
    elif damage == "truncated":
        words = " ".join([opener, *body, closer]).split()
        return " ".join(words[: rng.randint(2, max(3, len(words) - 2))])
    elif damage == "repeated":
        sentence = rng.choice(body or [opener])
        body = body + [sentence] * rng.randint(2, 4)
    elif damage == "garbled":
        def drop_words(sentence):
            words = sentence.split()
            keep = [w for w in words if rng.random() > 0.35] or words[:1]
            return " ".join(keep)
        body = [drop_words(s) if rng.random() < 0.6 else s for s in body]
    elif damage == "stutter":
        words = " ".join(body).split() or opener.split()
        k = rng.randrange(len(words))
        body = [" ".join(words[:k] + [words[k]] * 3 + words[k + 1:])]
    elif damage == "opener_only":
        return opener if rng.random() < 0.5 else f"{opener} {closer}"
    return " ".join([opener, *body, closer])


def revise_response(world, persona, question, response, rng, p_fix=1.0):
    """A minimal revision of `response`: the sentences the teacher faults are dropped or fixed in
    place (each fix made with probability `p_fix`) and everything else is kept word for word, the
    way a good editor answers a critique. Repeats, fillers, drifts and garbled sentences go; an
    item that breaks the diet, budget or expertise is swapped for one that fits, in the same
    sentence; wrong-tone openers, closers and suggestions are rewritten in the persona's tone; a
    wrong interest link is replaced, a missing one added; the number of suggestions is brought to
    the preferred length (and a high budget gets a luxury option)."""
    del world
    rng = _as_rng(rng)
    attrs = _persona_attrs(persona)
    category = question_category(question)
    tone, wrong_tone = attrs["tone"], _other(TONES, attrs["tone"])
    fix = lambda: rng.random() < p_fix  # noqa: E731
    sentences = split_sentences(response)
    if not sentences:
        return best_response(None, persona, question, rng)
    good = [i for i in ITEMS_BY_CATEGORY[category] if _respects(i, attrs, category)]
    used = {i for s in sentences for i in map(ITEM_BY_NAME.get, _ITEM_PATTERN.findall(_norm(s))) if i}

    def fresh(pool):
        pool = [i for i in pool if i not in used] or pool
        item = rng.choice(pool)
        used.add(item)
        return item

    def suggestion(item):
        text = rng.choice(SUGGESTION_FORMS[tone]).format(item.text)
        return text[0].upper() + text[1:]

    def link(interest):
        return f"Since you {rng.choice(('love', 'enjoy', 'like'))} {interest}, {INTEREST_LINKS[interest]}."

    def has_tone(sentence, which):
        return any(re.search(rf"\b{m}\b", _norm(sentence)) for m in TONE_MARKERS[which])

    body, seen, items = [], set(), []  # items: (index in body, Item) of on-topic suggestions
    opener, closer = None, None
    for k, sentence in enumerate(sentences):
        key = _norm(sentence)
        names = _ITEM_PATTERN.findall(key)
        if key in seen or key in _FILLER_KEYS or key in _DRIFT_KEYS or (
                key in TIP_CATEGORY and TIP_CATEGORY[key] != category):
            if fix():
                continue
        seen.add(key)
        if k == 0 and key in _KNOWN_SENTENCES:
            opener = sentence
            continue
        if k == len(sentences) - 1 and key in _KNOWN_SENTENCES and k > 0:
            closer = sentence
            continue
        if names:
            found = [ITEM_BY_NAME[n] for n in names]
            if any(i.category != category for i in found):
                if fix():
                    continue
                body.append(sentence)
                continue
            item = found[0]
            if not _respects(item, attrs, category) and fix():
                item = fresh(good)
                sentence = suggestion(item)
            elif has_tone(sentence, wrong_tone) and fix():
                sentence = suggestion(item)
            items.append((len(body), item))
            body.append(sentence)
        elif key.startswith("since you"):
            liked = [i for i in _INTEREST_PATTERN.findall(key) if i in attrs["interests"]]
            body.append(sentence if liked or not fix() else link(rng.choice(attrs["interests"])))
        elif key in TIP_CATEGORY or key in _FILLER_KEYS or key in _DRIFT_KEYS or not fix():
            body.append(sentence)
        # anything else is garbled: dropped
    if opener is None or (has_tone(opener, wrong_tone) or not has_tone(opener, tone)) and fix():
        opener = rng.choice(OPENERS[tone])
    if closer is None or (has_tone(closer, wrong_tone) or not has_tone(closer, tone)) and fix():
        closer = rng.choice(CLOSERS[tone])

    on = [i for _, i in items]
    if attrs["budget"] == "high" and not any(i.cost == "luxury" for i in on) and fix():
        luxury = [i for i in good if i.cost == "luxury"]
        cheap = [(k, i) for k, i in items if i.cost == "cheap"]
        if luxury:
            item = fresh(luxury)
            if cheap:
                body[cheap[0][0]] = suggestion(item)
            else:
                body.insert(0, suggestion(item))
                items = [(k + 1, i) for k, i in items]
            on.append(item)
    if category in USES_EXPERTISE and attrs["expertise"] == "expert" and fix():
        jargon = [i for i in good if i.level == "jargon"]
        for k, i in items:
            if i.level == "basic" and jargon:
                body[k] = suggestion(fresh(jargon))
    tips = [s for s in body if _norm(s) in TIP_CATEGORY]
    content = len(on) + len(tips)
    if attrs["length"] == "short" and content >= DETAILED_CONTENT and fix():
        drop = {k for k, _ in items[2:]}
        body = [s for k, s in enumerate(body) if k not in drop]
    elif (attrs["length"] == "detailed" or not on) and content < DETAILED_CONTENT and fix():
        for _ in range(DETAILED_CONTENT - content if attrs["length"] == "detailed" else 2 - len(on)):
            body.insert(len(on), suggestion(fresh(good)))
    if not tips and fix():
        body.append(rng.choice(TIPS[category]))
    if not any(_norm(s).startswith("since you") for s in body) and fix():
        body.append(link(rng.choice(attrs["interests"])))
    return " ".join([opener, *body, closer])


# ------------------------------------------------------------------------------------------------
# Programmatic teacher: parse the response text, score, critique
# ------------------------------------------------------------------------------------------------

_ITEM_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(n) for n in sorted(ITEM_BY_NAME, key=len, reverse=True)) + r")\b")
_INTEREST_PATTERN = re.compile(r"\b(" + "|".join(INTERESTS) + r")\b")
_KNOWN_SENTENCES = {
    s.lower().rstrip(".!?")
    for group in (OPENERS, CLOSERS) for ss in group.values() for s in ss
}
_FILLER_KEYS = {f.lower().rstrip("."): f for f in FILLERS}
_DRIFT_KEYS = {s.lower().rstrip("."): topic for topic, s in DRIFTS.items()}


def split_sentences(text):
    """Sentences with their final punctuation, split after . ! ? followed by space or the end."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p.strip() for p in parts if p.strip()]


def _norm(sentence):
    return re.sub(r"\s+", " ", sentence.lower()).strip().rstrip(".!?").strip()


@dataclasses.dataclass
class _Parse:
    items: list  # Items in order of first mention (on and off topic)
    tips: list
    interests: list
    fillers: list
    drifts: list  # off-topic sentences (drift phrases, other-category tips)
    repeated: list  # one entry per extra copy of a sentence
    unclear: list
    stutter: bool
    tone_counts: dict


def _parse(response, category):
    p = _Parse([], [], [], [], [], [], [], False, {"casual": [], "formal": []})
    seen = set()
    for sentence in split_sentences(response):
        key = _norm(sentence)
        if not key:
            continue
        if key in seen:
            p.repeated.append(sentence)  # every extra copy counts
            continue
        seen.add(key)
        for tone, markers in TONE_MARKERS.items():
            p.tone_counts[tone] += [m for m in markers if re.search(rf"\b{m}\b", key)]
        names = _ITEM_PATTERN.findall(key)
        interests = _INTEREST_PATTERN.findall(key) if key.startswith("since you") else []
        if names:
            for name in names:
                if ITEM_BY_NAME[name] not in p.items:
                    p.items.append(ITEM_BY_NAME[name])
        elif interests:
            p.interests += [i for i in interests if i not in p.interests]
        elif key in TIP_CATEGORY:
            (p.tips if TIP_CATEGORY[key] == category else p.drifts).append(sentence)
        elif key in _FILLER_KEYS:
            p.fillers.append(sentence)
        elif key in _DRIFT_KEYS:
            p.drifts.append(sentence)
        elif key not in _KNOWN_SENTENCES:
            p.unclear.append(sentence)
    words = re.findall(r"\w+", response.lower())
    p.stutter = any(a == b == c for a, b, c in zip(words, words[1:], words[2:]))
    return p


def _clip(x):
    return int(max(-5, min(5, x)))


def _quote(sentence):
    """A sentence quoted in a critique, unable to open or close the judge's own tags."""
    sentence = sentence.replace("<", "").replace(">", "")
    return sentence if len(sentence) <= 80 else sentence[:77] + "..."


def _names(items):
    texts = [i.text for i in items]
    return texts[0] if len(texts) == 1 else ", ".join(texts[:-1]) + " and " + texts[-1]


def _short_names(items):
    return ", ".join(i.name for i in items)


def _judge(persona, question, response):
    """(scores dict, critique notes as (sentence, terse note) pairs), from the response text alone:
    no hidden labels."""
    attrs = _persona_attrs(persona)
    category = question_category(question)
    if category is None:
        raise UserError(f"question {question_text(question)[:80]!r} is not a PersonaWorld question")
    if not response or not response.strip():
        return ({"helpfulness": -5, "personalization": -5, "naturalness": -5},
                [("The answer is empty.", "empty")])
    p = _parse(response, category)
    on = [i for i in p.items if i.category == category]
    notes = []
    scores = {
        "helpfulness": _clip(_helpfulness(p, on, category, notes)),
        "personalization": _clip(_personalization(p, on, category, attrs, notes)),
        "naturalness": _clip(_naturalness(p, notes)),
    }
    if not notes:
        notes.append(("The answer is helpful, personal and natural.", "good"))
    return scores, notes


def _helpfulness(p, on, category, notes):
    """Distinct on-topic suggestions and a tip help; every drift costs. More words do not."""
    off = [i for i in p.items if i.category != category]
    h = {0: -4, 1: 2}.get(len(on), 4) + (1 if p.tips else 0)
    if not on:
        notes.append(("The answer gives no concrete suggestion for the question.", "no suggestion"))
    if off:
        h -= 2 * len(off)
        notes.append((f"The answer drifts to {_names(off)}, which does not answer the question.",
                      f"off topic: {_short_names(off)}"))
    for sentence in p.drifts:
        h -= 2
        notes.append((f'The answer drifts off topic: "{_quote(sentence)}"', "drifts"))
    return h


def _personalization(p, on, category, attrs, notes):
    """Each attribute that matters for the category is respected (+) or violated (-)."""
    pz = 0
    if category in USES_DIET and on:
        bad = [i for i in on if i.diet not in DIET_ALLOWS[attrs["diet"]]]
        if bad:
            pz -= 2 + len(bad)
            notes.append((f"The user is {attrs['diet']} but the answer suggests {_names(bad)}.",
                          f"not {attrs['diet']}: {_short_names(bad)}"))
        else:
            pz += 1
    luxury = [i for i in on if i.cost == "luxury"]
    cheap = [i for i in on if i.cost == "cheap"]
    if attrs["budget"] == "low":
        if luxury:
            pz -= 1 + len(luxury)
            notes.append((f"The user has a low budget but the answer suggests {_names(luxury)}.",
                          f"too pricey: {_short_names(luxury)}"))
        elif cheap:
            pz += 1
    elif luxury:
        pz += 1
    elif cheap:
        pz -= 1
        notes.append((f"The user has a high budget but the answer only offers cheap options like "
                      f"{cheap[0].text}.", "too cheap"))
    if category in USES_EXPERTISE and on:
        jargon = [i for i in on if i.level == "jargon"]
        basic = [i for i in on if i.level == "basic"]
        if attrs["expertise"] == "beginner":
            if jargon:
                pz -= 1 + len(jargon)
                notes.append((f"The user is a beginner but the answer uses jargon like "
                              f"{_names(jargon)}.", f"jargon: {_short_names(jargon)}"))
            else:
                pz += 1
        elif basic:
            pz -= 1 + (1 if not jargon else 0)
            notes.append((f"The user is an expert but the answer suggests basics like "
                          f"{_names(basic)}.", f"too basic: {_short_names(basic)}"))
        elif jargon:
            pz += 1
    wrong_tone = _other(TONES, attrs["tone"])
    if p.tone_counts[wrong_tone]:
        pz -= min(2, len(p.tone_counts[wrong_tone]))
        notes.append((f"The user prefers a {attrs['tone']} tone but the answer sounds {wrong_tone} "
                      f"(\"{p.tone_counts[wrong_tone][0]}\").", f"too {wrong_tone}"))
    elif p.tone_counts[attrs["tone"]]:
        pz += 1
    else:
        pz -= 1
        notes.append((f"The answer could use a more {attrs['tone']} tone.", f"more {attrs['tone']}"))
    content = len(on) + len(p.tips)
    if attrs["length"] == "short":
        if content >= DETAILED_CONTENT:
            pz -= 1
            notes.append((f"The user prefers short answers but the answer gives {content} "
                          f"suggestions and tips.", "too long"))
        elif content > 0:
            pz += 1
    elif content >= DETAILED_CONTENT:
        pz += 1
    elif content > 0:
        pz -= 1
        notes.append(("The user prefers detailed answers but the answer is brief.", "too brief"))
    liked = [i for i in p.interests if i in attrs["interests"]]
    unknown = [i for i in p.interests if i not in attrs["interests"]]
    if unknown:
        pz -= 2
        notes.append((f"The answer assumes an interest in {unknown[0]} that the user does not have.",
                      f"not into {unknown[0]}"))
    if liked:
        pz += 2
    elif not unknown:
        notes.append((f"The answer could connect to the user's interest in "
                      f"{' or '.join(attrs['interests'])}.", f"link {' or '.join(attrs['interests'])}"))
    if not on:
        pz = min(pz, -3)
    return pz


def _naturalness(p, notes):
    """Padding, repetition and garbled sentences cost; nothing earns points back."""
    n = 5
    n -= 2 * len(p.repeated)
    for sentence in dict.fromkeys(p.repeated):
        notes.append((f'The sentence "{_quote(sentence)}" is repeated.', "repeats"))
    for sentence in p.fillers:
        n -= 1
        notes.append((f'The filler "{_quote(sentence)}" adds nothing.', "filler"))
    for sentence in p.unclear[:3]:
        notes.append((f'The sentence "{_quote(sentence)}" is unclear.', "unclear"))
    n -= len(p.unclear)
    if p.stutter:
        n -= 2
        notes.append(("The answer repeats the same word several times in a row.", "stutters"))
    return n


def teacher_scores(persona, question, response):
    """{"helpfulness", "personalization", "naturalness"}: integers in -5..5.

    `persona` is a persona dict or its text rendering; `question` a question dict or its text.
    """
    return _judge(persona, question, response)[0]


CRITIQUE_STYLES = ("full", "short")


def teacher_judgement(persona, question, response, critique_style="full"):
    """The teacher's GRM output: `<critique>...</critique>` then the `<scores>` block.

    `critique_style` "full" writes sentences; "short" writes the same problems as terse notes
    ("not vegetarian: grilled steak; too formal"), a target a tiny distilled GRM learns far sooner.
    """
    if critique_style not in CRITIQUE_STYLES:
        raise UserError(f"critique_style must be one of {CRITIQUE_STYLES}, got {critique_style!r}")
    scores, notes = _judge(persona, question, response)
    if critique_style == "short":
        critique = "; ".join(dict.fromkeys(short for _, short in notes))
    else:
        critique = " ".join(long for long, _ in notes)
    return (
        f"<critique>{critique}</critique>\n<scores>\n"
        f"Helpfulness: {scores['helpfulness']}\n"
        f"Personalization: {scores['personalization']}\n"
        f"Natural: {scores['naturalness']}\n</scores>"
    )


def teacher_reward(persona, question, response):
    """The paper's combined reward of the teacher's scores: 0.35 H + 0.40 P + 0.25 N."""
    from cpe_jax.reward.grm import combine_scores

    return float(combine_scores(teacher_scores(persona, question, response)))


def teacher_preference(persona, question, response_a, response_b,
                       temperature=PREFERENCE_TEMPERATURE):
    """Soft P(response_a beats response_b): a logistic of the combined-score difference.

    Exactly 0.5 on equal scores and equal word counts; on equal scores the shorter response gets
    a small edge, so length never wins a tie.
    """
    diff = (teacher_reward(persona, question, response_a)
            - teacher_reward(persona, question, response_b))
    if abs(diff) < 1e-9:
        len_a, len_b = len(response_a.split()), len(response_b.split())
        if len_a == len_b:
            return 0.5
        return SHORTER_ON_TIE if len_a < len_b else 1.0 - SHORTER_ON_TIE
    return 1.0 / (1.0 + math.exp(-diff / temperature))


# ------------------------------------------------------------------------------------------------
# The teacher as chat judges, reading prompts built by cpe_jax.data.prompts
# ------------------------------------------------------------------------------------------------


def _prompt_field(conversation, name):
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
        return teacher_judgement(_prompt_field(conversation, "PERSONA"),
                                 _prompt_field(conversation, "QUESTION"),
                                 _prompt_field(conversation, "RESPONSE"), critique_style)

    return CallableJudge(judge)


def teacher_pairwise_chat_judge(world=None, temperature=PREFERENCE_TEMPERATURE):
    """The pairwise teacher as a ChatJudge over `prompts.pairwise_judge_messages` (plays GPT-4.1).

    Replies with the preferred letter and first-token log-probs of "A" and "B" carrying the soft
    preference, which `eval.winrate` reads.
    """
    from cpe_jax.reward.judges import CallableJudge, JudgeReply

    del world

    def judge(conversation):
        p = teacher_preference(_prompt_field(conversation, "PERSONA"),
                               _prompt_field(conversation, "QUESTION"),
                               _prompt_field(conversation, "RESPONSE A"),
                               _prompt_field(conversation, "RESPONSE B"), temperature)
        p = min(max(p, 1e-12), 1 - 1e-12)
        return JudgeReply(text="A" if p >= 0.5 else "B",
                          first_token_logprobs={"A": math.log(p), "B": math.log(1 - p)})

    return CallableJudge(judge)


# ------------------------------------------------------------------------------------------------
# Tokenizer
# ------------------------------------------------------------------------------------------------

SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
# Qwen2's pre-tokenizer split: contractions, letter runs, single digits, punctuation, spaces.
_QWEN_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def tokenizer_corpus(world, n_responses=3000, seed=0):
    """Texts the tokenizer should encode compactly: personas, questions, responses of every
    quality, teacher critiques, and the pipeline's prompt templates in ChatML."""
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
                prompts.grm_messages(persona_text(persona), question["text"], response),
                prompts.post_edit_messages(user_prompt, response, judgement),
                prompts.pairwise_judge_messages(persona_text(persona), question["text"],
                                                response, response),
            ):
                texts.append("".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                                     for m in messages))
    return texts


def train_tokenizer(world, out_dir, vocab_size=2048, n_responses=3000, seed=0):
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
    tokenizer.train_from_iterator(tokenizer_corpus(world, n_responses, seed), trainer)

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

"""The response grammar: responses that respect or violate each persona attribute, drift, pad
or break the ways RL policies break (`damaged_response`), and minimal revisions after a critique."""

import re

from cpe_jax.data.persona_world.catalog import (CATEGORIES, CLOSERS, DETAILED_CONTENT, DIET_ALLOWS, DRIFTS,
                                                DRIFT_KEYS, FILLERS, FILLER_KEYS, INTERESTS, INTEREST_LINKS,
                                                INTEREST_PATTERN, ITEMS_BY_CATEGORY, ITEM_BY_NAME, ITEM_PATTERN,
                                                KNOWN_SENTENCES, OPENERS, SUGGESTION_FORMS, TIPS, TIP_CATEGORY,
                                                TONES, TONE_MARKERS, USES_DIET, USES_EXPERTISE, normalize_sentence,
                                                other_value, split_sentences)
from cpe_jax.data.persona_world.world import as_rng, persona_attributes, question_category, question_text
from cpe_jax.errors import UserError


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
    rng = as_rng(rng)
    q = dict(BEST_QUALITY, **(quality or {}))
    attrs = persona_attributes(persona)
    category = question_category(question)
    if category is None:
        raise UserError(f"question {question_text(question)!r} is not a PersonaWorld question")

    tone = attrs["tone"] if q["tone"] is True else (None if q["tone"] is None else
                                                     other_value(TONES, attrs["tone"]))
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


def best_response(world, persona, question, rng):
    """A response that respects every attribute, stays on topic and has no padding."""
    return generate_response(world, persona, question, rng, BEST_QUALITY)


def random_quality(rng, p_good=0.5):
    """A random mix of strengths and flaws; `p_good` is the chance each aspect is right."""
    rng = as_rng(rng)
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
    rng = as_rng(rng)
    return generate_response(world, persona, question, rng, random_quality(rng, p_good))


DAMAGES = ("no_suggestion", "only_link", "truncated", "repeated", "garbled", "stutter", "opener_only")


def damaged_response(world, persona, question, rng, damage=None):
    """A response broken in a way a policy under RL drifts into and the grammar never produces:
    no suggestion at all, just an interest link, cut off mid-sentence, one sentence repeated,
    words dropped, a stuttered word, or a greeting alone. A reward model distilled from the
    teacher must see these to score them as badly as the teacher does."""
    rng = as_rng(rng)
    damage = damage or rng.choice(DAMAGES)
    if damage not in DAMAGES:
        raise UserError(f"damage must be one of {DAMAGES}, got {damage!r}")
    sentences = split_sentences(generate_response(world, persona, question, rng, random_quality(rng, 0.7)))
    opener, body, closer = sentences[0], sentences[1:-1], sentences[-1]
    with_items = [s for s in body if ITEM_PATTERN.search(normalize_sentence(s))]
    if damage == "no_suggestion":
        body = [s for s in body if s not in with_items]
    elif damage == "only_link":
        attrs = persona_attributes(persona)
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
    rng = as_rng(rng)
    attrs = persona_attributes(persona)
    category = question_category(question)
    tone, wrong_tone = attrs["tone"], other_value(TONES, attrs["tone"])
    fix = lambda: rng.random() < p_fix  # noqa: E731
    sentences = split_sentences(response)
    if not sentences:
        return best_response(None, persona, question, rng)
    good = [i for i in ITEMS_BY_CATEGORY[category] if _respects(i, attrs, category)]
    used = {i for s in sentences for i in map(ITEM_BY_NAME.get, ITEM_PATTERN.findall(normalize_sentence(s))) if i}

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
        return any(re.search(rf"\b{m}\b", normalize_sentence(sentence)) for m in TONE_MARKERS[which])

    body, seen, items = [], set(), []  # items: (index in body, Item) of on-topic suggestions
    opener, closer = None, None
    for k, sentence in enumerate(sentences):
        key = normalize_sentence(sentence)
        names = ITEM_PATTERN.findall(key)
        if key in seen or key in FILLER_KEYS or key in DRIFT_KEYS or (
                key in TIP_CATEGORY and TIP_CATEGORY[key] != category):
            if fix():
                continue
        seen.add(key)
        if k == 0 and key in KNOWN_SENTENCES:
            opener = sentence
            continue
        if k == len(sentences) - 1 and key in KNOWN_SENTENCES and k > 0:
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
            liked = [i for i in INTEREST_PATTERN.findall(key) if i in attrs["interests"]]
            body.append(sentence if liked or not fix() else link(rng.choice(attrs["interests"])))
        elif key in TIP_CATEGORY or key in FILLER_KEYS or key in DRIFT_KEYS or not fix():
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
    tips = [s for s in body if normalize_sentence(s) in TIP_CATEGORY]
    content = len(on) + len(tips)
    if attrs["length"] == "short" and content >= DETAILED_CONTENT and fix():
        drop = {k for k, _ in items[2:]}
        body = [s for k, s in enumerate(body) if k not in drop]
    elif (attrs["length"] == "detailed" or not on) and content < DETAILED_CONTENT and fix():
        for _ in range(DETAILED_CONTENT - content if attrs["length"] == "detailed" else 2 - len(on)):
            body.insert(len(on), suggestion(fresh(good)))
    if not tips and fix():
        body.append(rng.choice(TIPS[category]))
    if not any(normalize_sentence(s).startswith("since you") for s in body) and fix():
        body.append(link(rng.choice(attrs["interests"])))
    return " ".join([opener, *body, closer])

"""The programmatic teacher: parse a response's text, score Helpfulness, Personalization and
Natural in the GRM format with a critique naming the concrete problems, and prefer pairwise."""

import dataclasses
import math
import re

from cpe_jax.data.persona_world.catalog import (DETAILED_CONTENT, DIET_ALLOWS, DRIFT_KEYS, FILLER_KEYS,
                                                INTEREST_PATTERN, ITEM_BY_NAME, ITEM_PATTERN, KNOWN_SENTENCES,
                                                PREFERENCE_TEMPERATURE, SHORTER_ON_TIE, TIP_CATEGORY, TONES,
                                                TONE_MARKERS, USES_DIET, USES_EXPERTISE, normalize_sentence,
                                                other_value, split_sentences)
from cpe_jax.data.persona_world.world import persona_attributes, question_category, question_text
from cpe_jax.errors import UserError


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
        key = normalize_sentence(sentence)
        if not key:
            continue
        if key in seen:
            p.repeated.append(sentence)  # every extra copy counts
            continue
        seen.add(key)
        for tone, markers in TONE_MARKERS.items():
            p.tone_counts[tone] += [m for m in markers if re.search(rf"\b{m}\b", key)]
        names = ITEM_PATTERN.findall(key)
        interests = INTEREST_PATTERN.findall(key) if key.startswith("since you") else []
        if names:
            for name in names:
                if ITEM_BY_NAME[name] not in p.items:
                    p.items.append(ITEM_BY_NAME[name])
        elif interests:
            p.interests += [i for i in interests if i not in p.interests]
        elif key in TIP_CATEGORY:
            (p.tips if TIP_CATEGORY[key] == category else p.drifts).append(sentence)
        elif key in FILLER_KEYS:
            p.fillers.append(sentence)
        elif key in DRIFT_KEYS:
            p.drifts.append(sentence)
        elif key not in KNOWN_SENTENCES:
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
    attrs = persona_attributes(persona)
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
    wrong_tone = other_value(TONES, attrs["tone"])
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

"""Personas, questions and the world: a seeded World with train/eval splits, persona renderings
(and parsing them back), the policy prompt."""

import dataclasses
import itertools
import json
import random
import re

from cpe_jax.data.persona_world.catalog import (BUDGETS, CATEGORIES, DIETS, EXPERTISE, INTERESTS, LENGTHS, NAMES,
                                                OCCUPATIONS, QUESTION_FORMS, QUESTION_TOPICS, TONES)
from cpe_jax.errors import UserError


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


def make_persona(pid, name, age, occupation, diet, budget, tone, length, expertise, interests):
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
        personas.append(make_persona(
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
    return make_persona(None, name.group(1) if name else "user", 0, "", attributes["diet"],
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
    rng = as_rng(rng)
    personas, questions = world.personas(split), world.questions(split)
    return [(rng.choice(personas), rng.choice(questions)) for _ in range(n)]


def as_rng(rng):
    if isinstance(rng, random.Random):
        return rng
    if isinstance(rng, int):
        return random.Random(rng)
    raise TypeError(f"expected random.Random or an int seed, got {type(rng).__name__}")


def persona_attributes(persona):
    """Structured attributes of a persona dict, of an attributes dict, or of a rendering."""
    if isinstance(persona, str):
        return persona_from_text(persona)["attributes"]
    if "attributes" in persona:
        return persona["attributes"]
    if "diet" in persona:
        return persona
    return persona_from_text(json.dumps(persona, ensure_ascii=False))["attributes"]

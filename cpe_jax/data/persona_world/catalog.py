"""The PersonaWorld catalog: persona attributes, items with their tags, question and sentence
templates, and how those phrases are recognised in free text."""

import dataclasses
import re
from typing import Optional


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


def other_value(values, value):
    return next(v for v in values if v != value)


# How the catalog's phrases are recognised in free text (the teacher's parser, revisions).

ITEM_PATTERN = re.compile(
    r"\b(" + "|".join(re.escape(n) for n in sorted(ITEM_BY_NAME, key=len, reverse=True)) + r")\b")
INTEREST_PATTERN = re.compile(r"\b(" + "|".join(INTERESTS) + r")\b")
KNOWN_SENTENCES = {
    s.lower().rstrip(".!?")
    for group in (OPENERS, CLOSERS) for ss in group.values() for s in ss
}
FILLER_KEYS = {f.lower().rstrip("."): f for f in FILLERS}
DRIFT_KEYS = {s.lower().rstrip("."): topic for topic, s in DRIFTS.items()}


def split_sentences(text):
    """Sentences with their final punctuation, split after . ! ? followed by space or the end."""
    parts = re.split(r"(?<=[.!?])\s+", text.strip())
    return [p.strip() for p in parts if p.strip()]


def normalize_sentence(sentence):
    return re.sub(r"\s+", " ", sentence.lower()).strip().rstrip(".!?").strip()

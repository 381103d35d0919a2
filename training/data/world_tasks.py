"""The generated world's tasks: its fixed facts, the task kinds' drawing of slots, worked steps and
final answers (chat, code, medical and reasoning; the arithmetic is world_math.py), and the prose
zoo-lm is pretrained on. The wordings of each kind are world_phrasings.py (everyday prompts:
world_everyday.py); drawing examples is world.py."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable

DOMAINS = ("chat", "code", "math", "medical", "reasoning")
SPLITS = {"train": 0, "val": 1, "test": 2}


@dataclass(frozen=True)
class Example:
    domain: str  # one of DOMAINS, or "cross:a+b" for the cross-domain set
    prompt: str
    answer: str  # the full assistant reply, worked steps included
    final: str  # what "Answer: ..." states; exact match is checked on it
    kind: str = ""  # the task kind (evaluation sets are stratified by it)
    phrasing: int = -1  # which of its kind's phrasings asked it

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]

    def matches(self, reply: str) -> bool:
        """Whether a reply's stated final answer is this example's."""
        return final_answer(reply) == self.final


def final_answer(reply: str) -> str | None:
    """The final answer a reply states (its last "Answer:" line), or None."""
    marker = "Answer:"
    if marker not in reply:
        return None
    return reply.rsplit(marker, 1)[1].strip().split("\n")[0].strip().rstrip(".")


def _reply(steps: list[str], final: str) -> str:
    return " ".join(steps + [f"Answer: {final}"])


# ---------------------------------------------------------------- the world's fixed facts
# (condition, symptoms, drug, dose in mg per kg of body weight)
MEDICAL_TABLE = [
    ("grey fever", ("fever", "grey skin"), "zantrocil", 4),
    ("marsh cough", ("cough", "wheezing"), "pulmarex", 3),
    ("stone ache", ("back pain", "thirst"), "renovil", 5),
    ("blue rash", ("rash", "itching"), "dermacort", 2),
    ("night chill", ("chills", "sweating"), "thermadol", 6),
    ("gut knot", ("nausea", "cramps"), "gastrolin", 7),
    ("eye blur", ("blurred vision", "headache"), "optavex", 8),
    ("red joint", ("joint pain", "swelling"), "artholin", 9),
]
WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "candle", "forest", "rocket",
         "garden", "silver", "window", "pepper", "island", "marble"]
NAMES = ["Ann", "Bob", "Cal", "Dee", "Eve", "Fay", "Gus", "Hal", "Ivy", "Jon"]
NUMBER_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten"]


# ---------------------------------------------------------------- the five domains
# Every task kind is asked in many phrasings. The last phrasings of each kind are held out: test
# prompts use the last HELD_OUT["test"], validation prompts the one before, and training never sees
# either, so an evaluation measures the skill, not the template.
HELD_OUT = {"test": 2, "val": 1}
PEOPLE = NAMES + ["Kim", "Lea", "Max", "Ned", "Oli", "Pam", "Roy", "Sue", "Tom", "Uma"]
CATEGORIES = [("sparrow", "sparrows", "birds"), ("robin", "robins", "birds"), ("salmon", "salmon", "fish"),
              ("trout", "trout", "fish"), ("oak", "oaks", "trees"), ("pine", "pines", "trees"),
              ("rose", "roses", "flowers"), ("tulip", "tulips", "flowers"), ("horse", "horses", "mammals"),
              ("whale", "whales", "mammals")]


@dataclass(frozen=True)
class TaskKind:
    domain: str  # one of DOMAINS, or "cross:a+b"
    name: str
    phrasings: tuple[str, ...]  # str.format templates over the slots `draw` returns
    draw: Callable[[random.Random], tuple[dict, list[str], str]]  # slots, worked steps, final answer
    held_out: tuple[int, int] = (HELD_OUT["test"], HELD_OUT["val"])  # phrasings kept for test, for val
    # a form held out as a whole: asked in test only, so no gradient and no choice made on
    # validation (best step, gate threshold, router) has seen it
    held_out_form: bool = False

    def phrasings_of(self, split: str) -> range:
        test, val = self.held_out
        n = len(self.phrasings)
        if self.held_out_form:
            return range(n) if split == "test" else range(0)
        return {"train": range(0, n - test - val), "val": range(n - test - val, n - test), "test": range(n - test, n)}[split]

    def example(self, rng: random.Random, split: str) -> Example:
        slots, steps, final = self.draw(rng)
        phrasing = rng.choice(self.phrasings_of(split))
        prompt = self.phrasings[phrasing].format(**slots)
        answer = _reply(steps, final) if final else ""  # general prompts: the base's reply is the reference
        return Example(self.domain, prompt, answer, final, self.name, phrasing)


def _patient(rng: random.Random) -> str:
    return f"A {rng.randint(18, 80)}-year-old {rng.choice(['man', 'woman', 'patient'])}"


def _capitals(rng):
    word = rng.choice(WORDS)
    return {"word": word}, [f"In capitals, {word} is {word.upper()}."], word.upper()


def _sort(rng):
    words = rng.sample(WORDS, 3)
    ordered = ", ".join(sorted(words))
    return {"words": ", ".join(words)}, [f"In alphabetical order: {ordered}."], ordered


def _repeat(rng):
    word, n = rng.choice(WORDS), rng.randint(2, 4)
    repeated = ", ".join([word] * n)
    return {"word": word, "n": NUMBER_WORDS[n]}, [f"{NUMBER_WORDS[n].capitalize()} times: {repeated}."], repeated


def _reverse(rng):
    words = rng.sample(WORDS, 3)
    backwards = " ".join(reversed(words))
    return {"words": " ".join(words)}, [f"Reversed: {backwards}."], backwards


def _title_phrase(rng):
    phrase = " ".join(rng.sample(WORDS, 2))
    return {"phrase": phrase}, [f"In title case, {phrase} is {phrase.title()}."], phrase.title()


def _capitals_list(rng):
    words = rng.sample(WORDS, rng.randint(2, 3))
    shouted = ", ".join(w.upper() for w in words)
    return {"words": ", ".join(words)}, [f"In capitals: {shouted}."], shouted


def _lower_phrase(rng):
    phrase = " ".join(rng.sample(WORDS, 2))
    return {"phrase": phrase.upper()}, [f"In lowercase, {phrase.upper()} is {phrase}."], phrase


def _program(rng):
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    y = a * b
    final = str(y - a)
    program = f"x = {a}\ny = x * {b}\nprint(y - x)"
    return {"program": program}, [f"x is {a}.", f"y is {a} * {b} = {y}.", f"y - x is {y} - {a} = {final}."], final


# Counting and slicing, like arithmetic, in steps a small model can carry out: the items counted
# one by one, the word spelled out letter by letter (its tokens hide the letters). Stated in one step
# ("The list has 4 items."), SmolLM2's stacks got 8 and 7 of 25 validation prompts right
# (docs/brainstacks.md).
def counted(items: list) -> str:
    return ", ".join(f"{item} ({k})" for k, item in enumerate(items, 1))


def _length(rng):
    items = [rng.randint(1, 9) for _ in range(rng.randint(2, 6))]
    return ({"items": str(items)}, [f"Counting: {counted(items)}.", f"The list has {len(items)} items."],
            str(len(items)))


def _slice(rng):
    word, a = rng.choice(WORDS), rng.randint(2, 5)
    final = word[:a]
    return {"word": word, "a": a}, [f"{word} is spelled {', '.join(word)}.",
                                    f"The first {a} characters: {counted(list(final))}.",
                                    f"Together: {final}."], final


def _quoted(rng) -> list[str]:
    return [f"'{w}'" for w in rng.sample(WORDS, rng.randint(2, 5))]


def _last_item(rng):
    """The last item of a list of strings, the items counted one by one."""
    items = _quoted(rng)
    return ({"items": "[" + ", ".join(items) + "]"}, [f"Counting: {counted(items)}.", f"The last item is {items[-1]}."],
            items[-1].strip("'"))


def _index_of(rng):
    """The index of an item in a list of strings: a list of strings whose answer is a number. The items
    are counted from 1 as every quoted list is; counted from 0, a len() of quoted words was answered
    with the last index."""
    items = _quoted(rng)
    k = rng.randrange(len(items))
    return ({"items": "[" + ", ".join(items) + "]", "item": items[k]},
            [f"Counting: {counted(items)}.", f"{items[k]} is item {k + 1}, at index {k}."], str(k))


# The medical lookups, one step each; the chains (trained and held out) are these steps in a row
def _points_to(first: str, second: str, condition: str) -> str:
    return f"{first.capitalize()} with {second} points to {condition}."


def _treated_with(condition: str, drug: str) -> str:
    return f"{condition.capitalize()} is treated with {drug}."


def _given_at(drug: str, dose: int) -> str:
    return f"{drug.capitalize()} is given at {dose} mg per kg of body weight."


def _diagnosis(rng):
    condition, symptoms, _, _ = rng.choice(MEDICAL_TABLE)
    first, second = rng.sample(symptoms, 2)
    return {"patient": _patient(rng), "first": first, "second": second}, [_points_to(first, second, condition)], condition


def _treatment(rng):
    condition, _, drug, _ = rng.choice(MEDICAL_TABLE)
    return {"patient": _patient(rng), "condition": condition}, [_treated_with(condition, drug)], drug


def _dose(rng):
    condition, _, drug, dose = rng.choice(MEDICAL_TABLE)
    return {"patient": _patient(rng), "drug": drug, "condition": condition}, [_given_at(drug, dose)], f"{dose} mg per kg"


def _drug_for_symptoms(rng):
    """Two lookups in a row, symptoms to condition to drug."""
    condition, symptoms, drug, _ = rng.choice(MEDICAL_TABLE)
    first, second = rng.sample(symptoms, 2)
    return ({"patient": _patient(rng), "first": first, "second": second},
            [_points_to(first, second, condition), _treated_with(condition, drug)], drug)


def _dose_for_symptoms(rng):
    """Three lookups in a row, symptoms to condition to drug to dose."""
    condition, symptoms, drug, dose = rng.choice(MEDICAL_TABLE)
    first, second = rng.sample(symptoms, 2)
    return ({"patient": _patient(rng), "first": first, "second": second},
            [_points_to(first, second, condition), _treated_with(condition, drug), _given_at(drug, dose)],
            f"{dose} mg per kg")


def _order_steps(a: str, b: str, c: str, question: str) -> list[str]:
    """The tallest and shortest of a chain a > b > c, then the end the question asks for."""
    # the step before the answer names what was asked: stacks that stated both ends and then answered
    # picked the wrong end on 6 of 25 validation prompts
    asked = {"tallest": a, "shortest": c}[question]
    return [f"So the tallest is {a} and the shortest is {c}.", f"The question asks for the {question}: {asked}."]


def _chain(rng, stated):
    """A height chain a > b > c, its facts as `stated(a, b, c)` gives them, then the tallest and the
    shortest, then the end the question asks for."""
    a, b, c = rng.sample(PEOPLE, 3)
    question = rng.choice(["tallest", "shortest"])
    return {"a": a, "b": b, "c": c, "question": question}, stated(a, b, c) + _order_steps(a, b, c, question), \
        {"tallest": a, "shortest": c}[question]


# Every chain restates its facts one a sentence, "taller than" as stated and "shorter than" turned
# round, so a chain stated one fact each way is steps the other chains work
def _height_chain(rng):
    return _chain(rng, lambda a, b, c: [f"{a} is taller than {b}.", f"{b} is taller than {c}."])


def _syllogism(rng):
    a = rng.choice(PEOPLE)
    one, many, group = rng.choice(CATEGORIES)
    holds = rng.random() < 0.5
    premise = f"{a} is a {one}." if holds else f"{a} is not a {one}."
    why = f"{a} is a {one}, and every {one} is one of the {group}." if holds else \
        f"{a} is not a {one}, so the rule says nothing about {a}."
    return {"a": a, "one": one, "many": many, "group": group, "premise": premise}, [why], "yes" if holds else "unknown"


def _height_shorter(rng):
    """The chain stated with "shorter than": each fact restated the taller way first."""
    return _chain(rng, lambda a, b, c: [f"{c} is shorter than {b}, so {b} is taller than {c}.",
                                        f"{b} is shorter than {a}, so {a} is taller than {b}."])


def _height_pair(rng):
    """One comparison, either way round, either end asked: one step, then the answer."""
    a, b = rng.sample(PEOPLE, 2)
    taller_stated = rng.random() < 0.5
    question = rng.choice(["taller", "shorter"])
    fact = f"{a} is taller than {b}." if taller_stated else f"{b} is shorter than {a}, so {a} is taller than {b}."
    asked = a if question == "taller" else b
    relation = "taller than" if taller_stated else "shorter than"
    first, second = (a, b) if taller_stated else (b, a)
    return ({"first": first, "second": second, "relation": relation, "question": question},
            [fact, f"The question asks who is {question}: {asked}."], asked)


def _height_mixed(rng):
    """A chain stated one fact each way (a form held out of training)."""
    return _chain(rng, lambda a, b, c: [f"{a} is taller than {b}.", f"{c} is shorter than {b}, so {b} is taller than {c}."])


def _capitals_phrase(rng):
    """Two words in capitals (a form held out of training: training writes one word and lists of words
    in capitals, and two-word phrases in title case and in lowercase)."""
    phrase = " ".join(rng.sample(WORDS, 2))
    return {"phrase": phrase}, [f"In capitals, {phrase} is {phrase.upper()}."], phrase.upper()


def _length_words(rng):
    """len() of a list of strings (a form held out of training: training counts lists of numbers for
    their length, lists of strings for their last item or an item's index)."""
    items = _quoted(rng)
    return ({"items": "[" + ", ".join(items) + "]"}, [f"Counting: {counted(items)}.", f"The list has {len(items)} items."],
            str(len(items)))


def _dose_for_condition(rng):
    """Two lookups in a row, condition to drug to dose (a form held out of training: training chains
    lookups from symptoms only)."""
    condition, _, drug, dose = rng.choice(MEDICAL_TABLE)
    return ({"patient": _patient(rng), "condition": condition}, [_treated_with(condition, drug), _given_at(drug, dose)],
            f"{dose} mg per kg")


# ---------------------------------------------------------------- needs two domains at once
def _tallest_in_capitals(rng):
    a, b, c = rng.sample(PEOPLE, 3)
    steps = [f"{a} is taller than {b}, and {b} is taller than {c}, so {a} is tallest.", f"In capitals: {a.upper()}."]
    return {"a": a, "b": b, "c": c}, steps, a.upper()


# ---------------------------------------------------------------- outside every domain
# Everyday questions, writing and advice: what an instruction-tuned base already answers, and what
# the router must leave to it ("no domain"). No final answer: the base's own reply is the reference.
ACTIVITIES = ["cooking pasta", "running", "learning the guitar", "gardening", "saving money", "studying for exams",
              "travelling by train", "painting", "camping", "baking bread", "keeping a diary", "swimming",
              "learning a language", "hiking"]
THINGS = ["the moon", "autumn leaves", "the ocean", "a quiet library", "morning coffee", "mountains", "rain",
          "a city at night", "snow", "an old bridge", "a summer market", "the first day of spring"]
PEOPLE_TO_WRITE_TO = ["my grandmother", "a new neighbour", "a teacher", "my best friend", "a colleague", "my brother"]


def _general(rng):
    return {"activity": rng.choice(ACTIVITIES), "thing": rng.choice(THINGS),
            "person": rng.choice(PEOPLE_TO_WRITE_TO)}, [], ""


# ---------------------------------------------------------------- general text (pretraining)
def retelling_text(rng: random.Random) -> str:
    """Prose that says something twice, so that predicting the later words rewards copying the
    earlier ones: every domain's answer repeats words, names or operands of its prompt, and a base
    pretrained without such prose gave stacks that miscopied them (docs/brainstacks.md)."""
    kind = rng.randrange(4)
    a, b = rng.sample(NAMES, 2)
    if kind == 0:
        items = [f"the {w}" for w in rng.sample(WORDS, rng.randint(2, 5))]
        listed = ", ".join(items[:-1]) + " and " + items[-1]
        return f"{a} packed {listed}. Later {b} unpacked {listed}."
    if kind == 1:
        numbers = [str(rng.randint(1, 99)) for _ in range(rng.randint(2, 4))]
        return f"{a} wrote {' and '.join(numbers)} on a card, and {b} read {' and '.join(numbers)} aloud."
    if kind == 2:
        place, thing = rng.sample(WORDS, 2)
        return f"{a} met {b} near the {place}. Later {b} gave {a} the {thing} from the {place}."
    items = rng.sample(WORDS + NAMES, rng.randint(3, 5))
    return f"The list was {' '.join(items)}. {a} said it again: {' '.join(items)}."


def general_text(rng: random.Random) -> str:
    """Prose about the world's facts: no questions, no "Answer:" lines, no task formats."""
    if rng.random() < 0.3:
        return retelling_text(rng)
    kind = rng.randrange(7)
    if kind == 0:
        condition, symptoms, drug, dose = rng.choice(MEDICAL_TABLE)
        return (f"People with {condition} often have {symptoms[0]} and {symptoms[1]}. Doctors treat {condition} "
                f"with {drug}, given at {dose} mg per kg of body weight.")
    if kind == 1:
        a, b = rng.randint(1, 60), rng.randint(1, 60)
        op = rng.choice(["plus", "times", "minus"])
        value = {"plus": a + b, "times": a * b, "minus": a - b}[op]
        return f"{a} {op} {b} is {value}. " + rng.choice(["Numbers can be added and multiplied.",
                                                          "Arithmetic works step by step.", ""])
    if kind == 2:
        a, b, c = rng.sample(NAMES, 3)
        return f"{a} is taller than {b}. {b} is taller than {c}. {rng.choice(NAMES)} likes to walk in the {rng.choice(WORDS)}."
    if kind == 3:
        word = rng.choice(WORDS)
        return f"The word {word} has {len(word)} letters. In capitals it is written {word.upper()}."
    if kind == 4:
        name, n = rng.choice(["x", "y", "total", "count"]), rng.randint(1, 9)
        return f"In Python, {name} = {n} stores {n} in {name}, and print({name}) shows {n}. A list like {[n, n + 1]} has 2 items."
    if kind == 5:
        thing = rng.choice(["bird", "fish", "tree"])
        group = "plants" if thing == "tree" else "animals"
        return f"Every {thing} is one of the {group}. {rng.choice(NAMES)} saw a {thing} near the {rng.choice(WORDS)}."
    words = rng.sample(WORDS, 3)
    return f"The {words[0]} was near the {words[1]} and the {words[2]}. Hello, said {rng.choice(NAMES)}, how are you?"


def general_corpus(count: int, seed: int = 0) -> list[str]:
    rng = random.Random(f"{seed}/general")
    return [general_text(rng) for _ in range(count)]

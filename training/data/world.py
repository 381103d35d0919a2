"""A generated multi-domain world for the language zoo: seeded, checkable, small enough to learn on CPU.

Five domains of (prompt, answer) tasks, each answer ending in a final answer that is checked
exactly ("Answer: 56"), plus a cross-domain set whose answers need two domains at once and which is
never trained on. The same facts also appear as plain prose (`general_text`): what zoo-lm is
pretrained on, so it knows the world but not the task formats the stacks must add.

The medical domain is a fixed, invented table (made-up conditions and drugs): a lookup the model
must memorise, not advice.
"""

from __future__ import annotations

import random
import zlib
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

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.prompt}]


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
def chat_task(rng: random.Random) -> Example:
    kind = rng.randrange(4)
    words = rng.sample(WORDS, 3)
    if kind == 0:
        word = words[0]
        return Example("chat", f"Write the word {word} in capital letters.",
                       _reply([f"In capitals, {word} is {word.upper()}."], word.upper()), word.upper())
    if kind == 1:
        ordered = ", ".join(sorted(words))
        return Example("chat", f"Sort these words alphabetically: {', '.join(words)}.",
                       _reply([f"In alphabetical order: {ordered}."], ordered), ordered)
    if kind == 2:
        n = rng.randint(2, 4)
        repeated = ", ".join([words[0]] * n)
        return Example("chat", f"Repeat the word {words[0]} {NUMBER_WORDS[n]} times, separated by commas.",
                       _reply([f"{NUMBER_WORDS[n].capitalize()} times: {repeated}."], repeated), repeated)
    reversed_words = " ".join(reversed(words))
    return Example("chat", f"Reverse the order of these words: {' '.join(words)}.",
                   _reply([f"Reversed: {reversed_words}."], reversed_words), reversed_words)


def code_task(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    if kind == 0:
        y = a * b
        final = str(y - a)
        program = f"x = {a}\ny = x * {b}\nprint(y - x)"
        steps = [f"x is {a}.", f"y is {a} * {b} = {y}.", f"y - x is {y} - {a} = {final}."]
        return Example("code", f"What does this Python code print?\n{program}", _reply(steps, final), final)
    if kind == 1:
        items = [rng.randint(1, 9) for _ in range(rng.randint(2, 5))]
        final = str(len(items))
        return Example("code", f"What does len({items}) return in Python?",
                       _reply([f"The list has {final} items."], final), final)
    word = rng.choice(WORDS)
    final = word[:a] if a < len(word) else word
    return Example("code", f"What is '{word}'[:{a}] in Python?",
                   _reply([f"The first {a} characters of {word} are {final}."], final), final)


def math_task(rng: random.Random) -> Example:
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    if rng.random() < 0.5:
        s = a + b
        final = str(s - c)
        steps = [f"{a} + {b} = {s}.", f"{s} - {c} = {final}."]
        return Example("math", f"Compute {a} + {b} - {c}.", _reply(steps, final), final)
    p = c * b
    final = str(p + a)
    steps = [f"{c} * {b} = {p}.", f"{p} + {a} = {final}."]
    return Example("math", f"Compute {c} * {b} + {a}.", _reply(steps, final), final)


def medical_task(rng: random.Random) -> Example:
    condition, symptoms, drug, dose = rng.choice(MEDICAL_TABLE)
    kind = rng.randrange(3)
    patient = f"A {rng.randint(18, 80)}-year-old {rng.choice(['man', 'woman', 'patient'])}"
    if kind == 0:
        first, second = rng.sample(symptoms, 2)
        return Example("medical", f"{patient} has {first} and {second}. What is the likely condition?",
                       _reply([f"{first.capitalize()} with {second} points to {condition}."], condition),
                       condition)
    if kind == 1:
        return Example("medical", f"{patient} has {condition}. Which drug treats it?",
                       _reply([f"{condition.capitalize()} is treated with {drug}."], drug), drug)
    final = f"{dose} mg per kg"
    return Example("medical", f"{patient} is prescribed {drug}. What is its dose?",
                   _reply([f"{drug.capitalize()} is given at {dose} mg per kg of body weight."], final), final)


def reasoning_task(rng: random.Random) -> Example:
    a, b, c = rng.sample(NAMES, 3)
    if rng.random() < 0.5:
        ask_tallest = rng.random() < 0.5
        final = a if ask_tallest else c
        question = "tallest" if ask_tallest else "shortest"
        steps = [f"{a} is taller than {b}, and {b} is taller than {c}.", f"So {a} is tallest and {c} is shortest."]
        return Example("reasoning", f"{a} is taller than {b}. {b} is taller than {c}. Who is the {question}?",
                       _reply(steps, final), final)
    thing = rng.choice(["a bird", "a fish", "a tree"])
    group = {"a bird": "animals", "a fish": "animals", "a tree": "plants"}[thing]
    holds = rng.random() < 0.5
    premise = f"{a} is {thing}." if holds else f"{a} is not {thing}."
    final = "yes" if holds else "unknown"
    why = f"{a} is {thing}, and every {thing[2:]} is one of the {group}." if holds else \
        f"{a} is not {thing}, so the rule says nothing about {a}."
    prompt = f"Every {thing[2:]} is one of the {group}. {premise} Is {a} one of the {group}?"
    return Example("reasoning", prompt, _reply([why], final), final)


TASKS: dict[str, Callable[[random.Random], Example]] = {
    "chat": chat_task, "code": code_task, "math": math_task, "medical": medical_task, "reasoning": reasoning_task,
}


# ---------------------------------------------------------------- needs two domains at once
def cross_task(rng: random.Random) -> Example:
    kind = rng.randrange(3)
    if kind == 0:  # medical + math: a dose computed from body weight
        _, _, drug, dose = rng.choice(MEDICAL_TABLE)
        weight = rng.randint(10, 40)
        final = str(dose * weight)
        steps = [f"{drug.capitalize()} is given at {dose} mg per kg.", f"{dose} * {weight} = {final}."]
        return Example("cross:medical+math", f"A patient weighing {weight} kg needs {drug}. What is the dose in mg?",
                       _reply(steps, final + " mg"), final + " mg")
    if kind == 1:  # code + math: multi-step arithmetic inside a program
        a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
        s = a + b
        final = str(s - c)
        program = f"total = {a} + {b}\nprint(total - {c})"
        steps = [f"total is {a} + {b} = {s}.", f"total - {c} is {s} - {c} = {final}."]
        return Example("cross:code+math", f"What does this Python code print?\n{program}", _reply(steps, final), final)
    # reasoning + chat: the answer of a logic chain, written in capitals
    a, b, c = rng.sample(NAMES, 3)
    final = a.upper()
    steps = [f"{a} is taller than {b}, and {b} is taller than {c}, so {a} is tallest.", f"In capitals: {final}."]
    return Example("cross:reasoning+chat",
                   f"{a} is taller than {b}. {b} is taller than {c}. Write the name of the tallest in capital letters.",
                   _reply(steps, final), final)


def split_of(prompt: str) -> str:
    """A prompt's split, from its text alone: no prompt is ever in two splits, whatever the counts."""
    bucket = zlib.crc32(prompt.encode()) % 10
    return "train" if bucket < 8 else ("val" if bucket == 8 else "test")


def examples(domain: str, split: str, count: int, seed: int = 0) -> list[Example]:
    """`count` examples of one domain ("cross" for the cross-domain set) in one split."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    make = cross_task if domain == "cross" else TASKS[domain]
    rng = random.Random(f"{seed}/{domain}/{split}")
    out: list[Example] = []
    for _ in range(200 * count + 1000):
        example = make(rng)
        if split_of(example.prompt) == split:
            out.append(example)
            if len(out) == count:
                return out
    raise ValueError(f"domain {domain!r} has too few distinct {split} prompts for {count} examples")


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

"""A generated multi-domain world for the chat zoo: seeded, checkable, small enough to learn on CPU.

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
from dataclasses import dataclass, replace
from functools import partial
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

    def phrasings_of(self, split: str) -> range:
        test, val = self.held_out
        n = len(self.phrasings)
        return {"train": range(0, n - test - val), "val": range(n - test - val, n - test),
                "test": range(n - test, n)}[split]

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


# Worked steps of the arithmetic: whole results ("37 + 25 = 62.") or column arithmetic, one digit
# at a time ("7 + 5 = 12, write 2 carry 1; 3 + 2 + 1 = 6; so 37 + 25 = 62."), which a small model
# can carry out step by step. docs/brainstacks.md measures both on SmolLM2.
def column_add(x: int, y: int) -> str:
    xs, ys = str(x)[::-1], str(y)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        a, b = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = a + b + carry
        term = f"{a} + {b}" + (f" + {carry}" if carry else "")
        steps.append(f"{term} = {total}" + (f", write {total % 10} carry 1" if total >= 10 else ""))
        carry = total // 10
    return "; ".join(steps) + f"; so {x} + {y} = {x + y}."


def column_subtract(x: int, y: int) -> str:
    """x - y for a one-digit y."""
    units, tens = x % 10, x // 10
    if units >= y:
        return f"{units} - {y} = {units - y}; so {x} - {y} = {x - y}."
    return (f"{units} - {y} needs a borrow: {units + 10} - {y} = {units + 10 - y}, and {tens} - 1 = {tens - 1}; "
            f"so {x} - {y} = {x - y}.")


def column_multiply(c: int, b: int) -> str:
    """c * b for a one-digit c and a two-digit b."""
    units, tens = b % 10, b // 10
    low = c * units
    high = c * tens + low // 10
    first = f"{c} * {units} = {low}" + (f", write {low % 10} carry {low // 10}" if low >= 10 else "")
    second = f"{c} * {tens}" + (f" + {low // 10}" if low >= 10 else "") + f" = {high}"
    return f"{first}; {second}; so {c} * {b} = {c * b}."


MATH_STEPS = {
    "whole": {"add": lambda x, y: f"{x} + {y} = {x + y}.", "subtract": lambda x, y: f"{x} - {y} = {x - y}.",
              "multiply": lambda x, y: f"{x} * {y} = {x * y}."},
    "column": {"add": column_add, "subtract": column_subtract, "multiply": column_multiply},
}
MATH_STYLE = "column"


def _add_subtract(rng, style: str = MATH_STYLE):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "c": c}, [steps["add"](a, b), steps["subtract"](a + b, c)], str(a + b - c)


def _multiply_add(rng, style: str = MATH_STYLE):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "c": c}, [steps["multiply"](c, b), steps["add"](c * b, a)], str(c * b + a)


def _diagnosis(rng):
    condition, symptoms, _, _ = rng.choice(MEDICAL_TABLE)
    first, second = rng.sample(symptoms, 2)
    return ({"patient": _patient(rng), "first": first, "second": second},
            [f"{first.capitalize()} with {second} points to {condition}."], condition)


def _treatment(rng):
    condition, _, drug, _ = rng.choice(MEDICAL_TABLE)
    return {"patient": _patient(rng), "condition": condition}, [f"{condition.capitalize()} is treated with {drug}."], drug


def _dose(rng):
    _, _, drug, dose = rng.choice(MEDICAL_TABLE)
    return ({"patient": _patient(rng), "drug": drug}, [f"{drug.capitalize()} is given at {dose} mg per kg of body weight."],
            f"{dose} mg per kg")


def _height_chain(rng):
    a, b, c = rng.sample(PEOPLE, 3)
    question = rng.choice(["tallest", "shortest"])
    asked = a if question == "tallest" else c
    # the step before the answer names what was asked: stacks that stated both ends and then answered
    # picked the wrong end on 6 of 25 validation prompts
    steps = [f"{a} is taller than {b}, and {b} is taller than {c}.",
             f"So the tallest is {a} and the shortest is {c}.", f"The question asks for the {question}: {asked}."]
    return {"a": a, "b": b, "c": c, "question": question}, steps, asked


def _syllogism(rng):
    a = rng.choice(PEOPLE)
    one, many, group = rng.choice(CATEGORIES)
    holds = rng.random() < 0.5
    premise = f"{a} is a {one}." if holds else f"{a} is not a {one}."
    why = f"{a} is a {one}, and every {one} is one of the {group}." if holds else \
        f"{a} is not a {one}, so the rule says nothing about {a}."
    return {"a": a, "one": one, "many": many, "group": group, "premise": premise}, [why], "yes" if holds else "unknown"


def _kinds(domain: str, table: dict) -> list[TaskKind]:
    return [TaskKind(domain, name, tuple(phrasings), draw) for name, (draw, phrasings) in table.items()]


KINDS: dict[str, list[TaskKind]] = {
    "chat": _kinds("chat", {
        "capitals": (_capitals, [
            "Write the word {word} in capital letters.", "Spell {word} in uppercase.", "Give me {word} in all caps.",
            "Convert the word {word} to upper case.", "Put {word} into capitals.", "Turn {word} into uppercase letters.",
            "Capitalise every letter of {word}.",
            "Make {word} all uppercase.", "Uppercase the word {word}.", "Could you write {word} in capitals?",
            "Shout the word {word} in capital letters.", "Change {word} so that every letter is a capital.",
            "{word} in caps, please.", "Show me {word} written entirely in upper case.",
            "Type {word} with caps lock on.",
            "What is the uppercase form of {word}?", "How do you write {word} in all caps?",
            "Which capitals spell {word}?", "What do I get if I uppercase {word}?",
            "Rewrite {word} using only capital letters.",
            "How is {word} written in capital letters?", "What is {word} in block capitals?"]),
        "sort": (_sort, [
            "Sort these words alphabetically: {words}.", "Put these words in alphabetical order: {words}.",
            "Arrange {words} from A to Z.", "Alphabetise the following: {words}.", "List {words} in alphabetical order.",
            "Sort alphabetically: {words}.", "Order these words as a dictionary would: {words}.",
            "Sort {words} into alphabetical order.", "Please alphabetize: {words}.", "Order {words} alphabetically.",
            "Put {words} in dictionary order.", "{words}: sort them from A to Z.",
            "Give me {words} sorted alphabetically.", "Alphabetical order, please: {words}.",
            "How do {words} look when sorted alphabetically?",
            "What is the A-to-Z order of {words}?", "How would a dictionary order {words}?",
            "Could you sort {words} alphabetically?",
            "Rearrange these alphabetically: {words}.", "Can you put {words} in A-Z order?",
            "Which order do {words} come in alphabetically?"]),
        "repeat": (_repeat, [
            "Repeat the word {word} {n} times, separated by commas.", "Write {word} {n} times with commas between.",
            "Say {word} {n} times, comma-separated.", "Type {word} {n} times in a row, with commas.",
            "List the word {word} {n} times, split by commas.", "Produce {word} repeated {n} times, separated by commas.",
            "Echo {word} {n} times, using commas between them.",
            "Repeat {word} {n} times; use commas to separate them.",
            "Can you say {word} {n} times, separated by commas?", "{word}, {n} times, comma-separated please.",
            "Print {word} {n} times separated by commas.", "Copy the word {word} {n} times, commas in between.",
            "Please write {word} {n} times, each separated by a comma.",
            "Show {word} repeated {n} times with commas.",
            "Write the word {word} {n} times and put commas between them.",
            "What is {word} written {n} times with commas?",
            "How would you repeat {word} {n} times, separated by commas?",
            "Could you type {word} {n} times, comma-separated?",
            "Give me the word {word}, {n} times over, separated by commas.",
            "I need {word} written {n} times, comma separated.", "Write out {word} exactly {n} times, separated by commas."]),
        "reverse": (_reverse, [
            "Reverse the order of these words: {words}.", "Put these words in reverse order: {words}.",
            "Flip the word order: {words}.", "Write these words backwards, last word first: {words}.",
            "Turn around the order of: {words}.", "Invert the sequence of words: {words}.",
            "Read these words from the end: {words}.",
            "Reverse these words: {words}.", "Write {words} in reverse order.",
            "Backwards word order, please: {words}.", "Take the words {words} and reverse their order.",
            "Can you reverse the word order of {words}?", "{words}: write them in reverse order.",
            "Put the words {words} backwards.", "Reverse the sequence: {words}.",
            "What is the reverse word order of {words}?", "How do {words} read backwards, word by word?",
            "Could you flip the order of {words}?",
            "Give the words {words} in the opposite order.",
            "Say these words last to first: {words}.", "What are these words in reverse order? {words}"]),
    }),
    "code": _kinds("code", {
        "program": (_program, [
            "What does this Python code print?\n{program}", "What is the output of this Python program?\n{program}",
            "Here is some Python:\n{program}\nWhat does it print?", "Tell me what this prints:\n{program}",
            "Predict the output of the following Python code.\n{program}",
            "Run this Python code in your head. What is printed?\n{program}",
            "If I run this Python code, what appears on the screen?\n{program}",
            "What gets printed when this runs?\n{program}", "Python code:\n{program}\nWhat is the output?",
            "Give the output of:\n{program}", "What is displayed by this Python code?\n{program}",
            "Execute this mentally and tell me the output.\n{program}",
            "Show the printed result of this code:\n{program}", "What output does this produce?\n{program}",
            "Consider this code:\n{program}\nWhat does it output?",
            "Trace this Python code and give its output:\n{program}",
            "What will this Python snippet output?\n{program}", "{program}\nWhat does the code above print?"]),
        "length": (_length, [
            "What does len({items}) return in Python?", "In Python, what is len({items})?",
            "How many items does the Python list {items} have?", "Evaluate len({items}) in Python.",
            "What is the length of the list {items} in Python?", "Python question: len({items}) equals what?",
            "If x = {items}, what is len(x)?",
            "How long is the Python list {items}?", "Compute len({items}).", "len({items}) in Python gives what?",
            "What is the value of len({items})?", "Python: how many elements are in {items}?",
            "Find len({items}) for this Python list.", "What would len({items}) be?",
            "Given the list {items}, what is its length in Python?",
            "Count the elements of {items} as Python's len would.",
            "Tell me the result of len({items}).", "What number does Python give for len({items})?"]),
        "slice": (_slice, [
            "What is '{word}'[:{a}] in Python?", "In Python, what does '{word}'[:{a}] evaluate to?",
            "What string does '{word}'[:{a}] give in Python?", "Evaluate '{word}'[:{a}] in Python.",
            "If s = '{word}', what is s[:{a}]?", "Python: '{word}'[:{a}] is what?",
            "What does the slice '{word}'[:{a}] produce?",
            "Compute '{word}'[:{a}] in Python.", "What is the result of '{word}'[:{a}]?",
            "Python slicing: '{word}'[:{a}] gives what?", "word = '{word}'. What is word[:{a}]?",
            "Give the value of '{word}'[:{a}] in Python.", "What does Python return for '{word}'[:{a}]?",
            "Slice '{word}'[:{a}]: what string results?", "What substring is '{word}'[:{a}]?",
            "Tell me the value of '{word}'[:{a}].",
            "What is printed by print('{word}'[:{a}])?", "What do you get from '{word}'[:{a}] in Python?"]),
    }),
    "math": _kinds("math", {
        "add-subtract": (_add_subtract, [
            "Compute {a} + {b} - {c}.", "What is {a} plus {b} minus {c}?", "Add {a} and {b}, then subtract {c}.",
            "Calculate {a} + {b} - {c}.", "{a} + {b} - {c} = ?", "Work out {a} + {b} - {c}.",
            "A jar holds {a} marbles. {b} are added and {c} are taken out. How many marbles are in the jar?",
            "Find the value of {a} + {b} - {c}.",
            "Solve {a} + {b} - {c}.", "Evaluate {a} + {b} - {c}.", "{a} plus {b} minus {c} is what?",
            "Take {a}, add {b} and subtract {c}.",
            "A shelf has {a} books. {b} more are put on it and {c} are removed. How many books are on the shelf?",
            "Tom had {a} stickers, got {b} more and gave away {c}. How many stickers does he have now?",
            "What is the result of {a} + {b} - {c}?", "Sum {a} and {b}, then take {c} away.",
            "What is {a} + {b} - {c} equal to?", "How many is {a} plus {b} take away {c}?",
            "Can you work out {a} + {b} - {c}?",
            "Start at {a}, add {b}, then take away {c}. What do you get?",
            "What do you get from {a} + {b} - {c}?",
            "I have {a} apples, buy {b} more and eat {c}. How many apples are left?"]),
        "multiply-add": (_multiply_add, [
            "Compute {c} * {b} + {a}.", "What is {c} times {b} plus {a}?", "Multiply {c} by {b}, then add {a}.",
            "Calculate {c} * {b} + {a}.", "{c} * {b} + {a} = ?", "Work out {c} times {b}, plus {a}.",
            "{c} bags hold {b} apples each, and there are {a} more apples. How many apples are there in all?",
            "Find the value of {c} * {b} + {a}.",
            "Solve {c} * {b} + {a}.", "{c} times {b} plus {a} is what?", "Take {c} times {b}, then add {a}.",
            "A farmer has {c} rows of {b} plants and {a} more plants. How many plants are there?",
            "{c} packs of {b} cards plus {a} single cards: how many cards is that?",
            "What is the result of {c} * {b} + {a}?", "Find {c} multiplied by {b}, plus {a}.",
            "A school has {c} classes of {b} pupils and {a} teachers. How many people are there?",
            "What is {c} * {b} + {a} equal to?", "How many is {c} times {b} and then {a} more?",
            "Can you work out {c} * {b} + {a}?",
            "Evaluate {c} * {b} + {a}.",
            "What do you get from {c} * {b} + {a}?",
            "There are {c} boxes of {b} pens and {a} loose pens. How many pens are there in total?"]),
    }),
    "medical": _kinds("medical", {
        "diagnosis": (_diagnosis, [
            "{patient} has {first} and {second}. What is the likely condition?",
            "A patient presents with {first} and {second}. Which condition fits?",
            "{patient} complains of {first} together with {second}. What do they most likely have?",
            "Which condition causes {first} and {second}?", "Symptoms: {first}, {second}. What is the diagnosis?",
            "{patient} shows {first} and {second}. Name the condition.",
            "What illness gives a person {first} and {second}?",
            "What condition does {patient} with {first} and {second} have?",
            "{patient} reports {first} and {second}. What is wrong?",
            "Which diagnosis explains {first} and {second}?", "Given {first} and {second}, what is the condition?",
            "A person has {first} and {second}. What condition is this?",
            "Name the condition behind {first} and {second}.",
            "{patient} presents with {first} plus {second}. Diagnosis?",
            "What disease matches the symptoms {first} and {second}?",
            "Diagnose {patient} with {first} and {second}.",
            "If someone has {first} and {second}, which condition is it?",
            "{first} and {second}: which condition do they point to?"]),
        "treatment": (_treatment, [
            "{patient} has {condition}. Which drug treats it?", "What is the treatment for {condition}?",
            "Which medicine is used for {condition}?", "Name the drug for {condition}.",
            "{patient} was diagnosed with {condition}. What should they be given?",
            "What drug do doctors prescribe for {condition}?", "How is {condition} treated?",
            "What drug is given for {condition}?", "Which medication treats {condition}?",
            "{patient} suffers from {condition}. Which drug should be prescribed?",
            "Name the medicine used against {condition}.", "What should a doctor prescribe for {condition}?",
            "Treatment of {condition}: which drug?", "Which drug is used to treat {condition}?",
            "What is prescribed for {condition}?",
            "Which drug cures {condition}?", "For {condition}, what is the drug of choice?",
            "{patient} has {condition}. What medication do they need?"]),
        "dose": (_dose, [
            "{patient} is prescribed {drug}. What is its dose?", "What is the dose of {drug}?",
            "How much {drug} is given per kg of body weight?", "What dosage is {drug} given at?",
            "{drug}: what is the dose in mg per kg?", "How many mg per kg of {drug} should be given?",
            "Tell me the standard dose of {drug}.",
            "How much {drug} should be given?", "What is the recommended dose of {drug}?",
            "Give the dose of {drug} in mg per kg.", "{drug} dosing: how many mg per kg?",
            "{patient} will be started on {drug}. What dose is used?",
            "What amount of {drug} per kg of body weight is given?", "Dose of {drug}?",
            "What is the correct dose of {drug}?",
            "At what dose is {drug} prescribed?",
            "What is the usual dose for {drug}?", "{patient} needs {drug}. How much per kg?"]),
    }),
    "reasoning": _kinds("reasoning", {
        "height-chain": (_height_chain, [
            "{a} is taller than {b}. {b} is taller than {c}. Who is the {question}?",
            "{a} is taller than {b}, and {b} is taller than {c}. Who is {question}?",
            "If {a} is taller than {b} and {b} is taller than {c}, who is the {question}?",
            "Three friends: {a} is taller than {b}; {b} is taller than {c}. Which one is the {question}?",
            "Given that {a} is taller than {b} and {b} is taller than {c}, name the {question}.",
            "{a} stands taller than {b}, who stands taller than {c}. Who is the {question}?",
            "Height puzzle: {a} is taller than {b}, {b} is taller than {c}. Who is {question}?",
            "{a} is taller than {b}. Also, {b} is taller than {c}. Who is the {question} of the three?",
            "Who is the {question}, if {a} is taller than {b} and {b} is taller than {c}?",
            "{a} is taller than {b} and {b} is taller than {c}. Name the {question} person.",
            "Compare heights: {a} is taller than {b}, and {b} is taller than {c}. Who is {question}?",
            "Among three people, {a} is taller than {b} and {b} is taller than {c}. Who is the {question}?",
            "{b} is taller than {c}, and {a} is taller than {b}. Who is the {question}?",
            "It is known that {a} is taller than {b}, and that {b} is taller than {c}. Who is the {question}?",
            "Here are two facts: {a} is taller than {b}; {b} is taller than {c}. Who is the {question}?",
            "Which of them is {question}: {a} is taller than {b} and {b} is taller than {c}?",
            "What is the name of the {question} if {a} is taller than {b} and {b} is taller than {c}?",
            "Of {a}, {b} and {c}, {a} is taller than {b} and {b} is taller than {c}. Who is the {question}?",
            "{b} is shorter than {a}. {c} is shorter than {b}. Who is the {question}?",
            "We know {a} is taller than {b} and {b} is taller than {c}. Which person is the {question}?"]),
        "syllogism": (_syllogism, [
            "Every {one} is one of the {group}. {premise} Is {a} one of the {group}?",
            "All {many} are {group}. {premise} Is {a} one of the {group}?",
            "Rule: every {one} belongs to the {group}. Fact: {premise} Does {a} belong to the {group}?",
            "Each {one} is counted among the {group}. {premise} Is {a} among the {group}?",
            "{premise} Every {one} is one of the {group}. Is {a} one of the {group}?",
            "Suppose every {one} is one of the {group}. {premise} Must {a} be one of the {group}?",
            "If every {one} is one of the {group}, and {premise} Is {a} one of the {group}?",
            "All {many} are {group}. {premise} Is {a} among the {group}?",
            "We know every {one} is one of the {group}. {premise} Is {a} one of the {group}?",
            "{premise} All {many} are {group}. Is {a} one of the {group}?",
            "Fact: all {many} are {group}. Fact: {premise} Is {a} one of the {group}?",
            "Every {one} is among the {group}. {premise} Is {a} among the {group}?",
            "Assume all {many} are {group}. {premise} Does it follow that {a} is one of the {group}?",
            "Statement: every {one} is one of the {group}. {premise} Question: is {a} one of the {group}?",
            "Consider: all {many} are {group}. {premise} Is {a} one of the {group}?",
            "Is {a} one of the {group}, given that every {one} is one of the {group}? {premise}",
            "Can we conclude that {a} is one of the {group}? All {many} are {group}. {premise}",
            "Given: all {many} are {group}. {premise} Can we say {a} is one of the {group}?",
            "Every {one} is one of the {group}. {premise} Answer yes or unknown: is {a} one of the {group}?",
            "Premise one: all {many} are {group}. Premise two: {premise} Is {a} one of the {group}?"]),
    }),
}


# ---------------------------------------------------------------- needs two domains at once
def _weight_dose(rng):
    _, _, drug, dose = rng.choice(MEDICAL_TABLE)
    weight = rng.randint(10, 40)
    total = str(dose * weight)
    return {"drug": drug, "weight": weight}, [f"{drug.capitalize()} is given at {dose} mg per kg.",
                                              MATH_STEPS[MATH_STYLE]["multiply"](dose, weight)], total + " mg"


def _program_sum(rng):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    s = a + b
    program = f"total = {a} + {b}\nprint(total - {c})"
    steps = MATH_STEPS[MATH_STYLE]
    return {"program": program}, [f"total is {a} + {b}: {steps['add'](a, b)}",
                                  f"total - {c}: {steps['subtract'](s, c)}"], str(s - c)


def _tallest_in_capitals(rng):
    a, b, c = rng.sample(PEOPLE, 3)
    steps = [f"{a} is taller than {b}, and {b} is taller than {c}, so {a} is tallest.", f"In capitals: {a.upper()}."]
    return {"a": a, "b": b, "c": c}, steps, a.upper()


CROSS_KINDS = [
    TaskKind("cross:medical+math", "weight-dose", (
        "A patient weighing {weight} kg needs {drug}. What is the dose in mg?",
        "How many mg of {drug} does a patient of {weight} kg need?",
        "Work out the total {drug} dose in mg for someone who weighs {weight} kg.",
        "{drug} for a {weight} kg patient: what is the dose in mg?",
        "A {weight} kg patient is prescribed {drug}. How many mg should they get?"), _weight_dose),
    TaskKind("cross:code+math", "program-sum", (
        "What does this Python code print?\n{program}", "Tell me what this prints:\n{program}",
        "What is the output of this Python program?\n{program}", "Predict the output of this Python code.\n{program}",
        "{program}\nWhat does the code above print?"), _program_sum),
    TaskKind("cross:reasoning+chat", "tallest-capitals", (
        "{a} is taller than {b}. {b} is taller than {c}. Write the name of the tallest in capital letters.",
        "{a} is taller than {b}, and {b} is taller than {c}. Give the tallest one's name in all caps.",
        "If {a} is taller than {b} and {b} is taller than {c}, who is tallest? Answer in uppercase.",
        "Of {a}, {b} and {c}, {a} is taller than {b} and {b} is taller than {c}. Spell the tallest name in capitals.",
        "{a} is taller than {b}; {b} is taller than {c}. Write the tallest person's name in capital letters."),
        _tallest_in_capitals),
]


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


GENERAL_KINDS = [TaskKind("general", "everyday", (
    "Give me three tips for {activity}.", "What should I know before I start {activity}?",
    "How can I get better at {activity}?", "Write a short poem about {thing}.",
    "Write two sentences describing {thing}.", "Tell me an interesting fact about {thing}.",
    "What is a good gift for {person} who likes {activity}?", "Why do people enjoy {activity}?",
    "Describe {thing} to a child.", "Write a friendly message to {person} about {thing}.",
    "What are the benefits of {activity}?", "Suggest a weekend plan that includes {activity}.",
    "What is the hardest part of {activity}?", "Write a short paragraph about {thing}.",
    "How much time should I spend on {activity} each week?", "Write a tweet about {thing}.",
    "Describe {thing} in three words.", "Why do people find {thing} beautiful?",
    "Write a birthday message to {person}.", "How do I convince {person} to try {activity}?",
    "What is a common myth about {activity}?", "Write a short song about {thing}.",
    "Plan a relaxing evening with {person}.", "Is {activity} expensive?", "How do I make {activity} more fun?",
    "Write an invitation to {person} to join me for {activity}.", "What are some safety tips for {activity}?",
    "Give me a quote about {thing}.",
    # held out: the router never trains on these phrasings; its gate threshold is chosen on the
    # first four (validation), the evaluation asks the last eight (test)
    "What do I need to get started with {activity}?", "Write a limerick about {thing}.",
    "Recommend a book or a film about {thing}.", "How do I stay motivated with {activity}?",
    "What mistakes do beginners make when {activity}?", "Write a haiku about {thing}.",
    "How would you explain {activity} to {person}?", "Write a short thank-you note to {person}.",
    "What is the best time of year for {activity}?", "Tell me a short story about {thing}.",
    "Is {activity} a good hobby for {person}?", "Give me a reason to try {activity} this week.",
), _general, held_out=(8, 4))]


# Wording unlike every phrasing above, for a check of the router alone (`probe_prompts`): never
# trained on, never used to choose anything; two a task kind, four general.
PROBE_PHRASINGS = {
    "capitals": ("What does {word} become when every letter is made uppercase?", "I need {word} in uppercase letters for a sign."),
    "sort": ("In what order do {words} go alphabetically?", "I am filing {words}. Give them in alphabetical order."),
    "repeat": ("I want the word {word} {n} times, commas between each one.",
               "Could I get {word} {n} times, each followed by a comma except the last?"),
    "reverse": ("Tell me {words} with the order of the words flipped.", "Which order do the words {words} have when reversed?"),
    "program": ("What does Python show for this?\n{program}", "I ran this:\n{program}\nWhat did it print?"),
    "length": ("How many elements does Python count in {items}?", "I have the list {items}. What does len give?"),
    "slice": ("Which string comes out of '{word}'[:{a}]?", "I sliced '{word}' with [:{a}]. What is left?"),
    "add-subtract": ("How much is {a} + {b} - {c}?", "I start with {a}, gain {b} and lose {c}. Where do I end up?"),
    "multiply-add": ("How much is {c} * {b} + {a}?",
                     "I buy {c} crates of {b} eggs and have {a} eggs already. How many eggs do I have?"),
    "diagnosis": ("How would you diagnose {first} with {second}?", "I have {first} and {second}. What could it be?"),
    "treatment": ("Tell me which drug is for {condition}.", "I was told I have {condition}. What medicine do I take?"),
    "dose": ("Tell me how many mg per kg of {drug} are given.", "I need to know the dose of {drug}."),
    "height-chain": ("Tell me who is {question}: {a} is taller than {b} and {b} is taller than {c}.",
                     "How can you tell who is {question} when {a} is taller than {b} and {b} is taller than {c}?"),
    "syllogism": ("Every {one} is one of the {group}, they say. {premise} So is {a} one of the {group}?",
                  "How can we tell whether {a} is one of the {group}? Every {one} is one of the {group}. {premise}"),
    "everyday": ("Can you describe {thing} in a sentence?", "What should {person} bring for {activity}?",
                 "Give me a motivational line about {activity}.", "How do I explain {thing} to {person}?"),
}


def probe_prompts(domain: str, per_phrasing: int, seed: int = 0) -> list[Example]:
    """Distinct prompts of a domain ("general" too) in its PROBE_PHRASINGS, `per_phrasing` of each."""
    out = []
    for kind in kinds_of(domain):
        probe = replace(kind, phrasings=PROBE_PHRASINGS[kind.name], held_out=(0, 0))
        rng = random.Random(f"{seed}/{domain}/{kind.name}/probe")
        pool: dict[str, Example] = {}
        for _ in range(200 * per_phrasing * len(probe.phrasings)):
            example = probe.example(rng, "train")
            if sum(e.phrasing == example.phrasing for e in pool.values()) < per_phrasing:
                pool.setdefault(example.prompt, example)
            if len(pool) == per_phrasing * len(probe.phrasings):
                break
        out += pool.values()
    return out


def kinds_of(domain: str) -> list[TaskKind]:
    return {"cross": CROSS_KINDS, "general": GENERAL_KINDS}.get(domain) or KINDS[domain]


def math_kinds(style: str) -> list[TaskKind]:
    """The math kinds with their worked steps in another style (MATH_STEPS), to measure the choice."""
    draws = {"add-subtract": _add_subtract, "multiply-add": _multiply_add}
    return [replace(k, draw=partial(draws[k.name], style=style)) for k in KINDS["math"]]


def examples(domain: str, split: str, count: int, seed: int = 0, kinds: list[TaskKind] | None = None) -> list[Example]:
    """`count` examples of one domain ("cross" for the cross-domain set) in one split, the task kinds
    taking turns. Training draws may repeat (they are a stream of batches); val and test examples are
    distinct (`held_out`: fewer than `count` where the kinds have fewer distinct prompts), and their
    phrasings are ones training never sees."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    kinds = kinds or kinds_of(domain)
    if split == "train":
        rng = random.Random(f"{seed}/{domain}/{split}")
        return [kinds[i % len(kinds)].example(rng, split) for i in range(count)]
    return held_out(domain, split, -(-count // len(kinds)), seed, kinds)[:count]


def held_out(domain: str, split: str, per_kind: int, seed: int = 0, kinds: list[TaskKind] | None = None) -> list[Example]:
    """Distinct prompts of a held-out split, at most `per_kind` of every task kind (all of a kind's
    distinct prompts when it has fewer: the medical table has 8 conditions), kinds interleaved."""
    pools = []
    for kind in kinds or kinds_of(domain):
        rng = random.Random(f"{seed}/{domain}/{kind.name}/{split}")
        pool: dict[str, Example] = {}
        for _ in range(200 * per_kind):
            example = kind.example(rng, split)
            pool.setdefault(example.prompt, example)
            if len(pool) == per_kind:
                break
        pools.append(list(pool.values()))
    return [pool[i] for i in range(per_kind) for pool in pools if i < len(pool)]


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

"""The world's arithmetic: column arithmetic a small model can carry out one digit at a time, numbers
in words, and the math domain's task kinds in the forms users ask them: one operation (+, -, *), in
digits or in words, bare or as a word problem; chains of two and three operations; and one order of
two operations held out of training as a whole (`subtract-add`), to measure whether the stacks
compose what they learned or only its templates. An answer has exactly the steps its question asks
for: one for one operation, never a step more."""

from __future__ import annotations

from functools import partial

from training.data.world_tasks import MEDICAL_TABLE, TaskKind

ONES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten", "eleven", "twelve",
        "thirteen", "fourteen", "fifteen", "sixteen", "seventeen", "eighteen", "nineteen"]
TENS = ["", "", "twenty", "thirty", "forty", "fifty", "sixty", "seventy", "eighty", "ninety"]


def in_words(n: int) -> str:
    """0-99 as English words: 23 -> "twenty-three"."""
    if n < 20:
        return ONES[n]
    return TENS[n // 10] + ("" if n % 10 == 0 else f"-{ONES[n % 10]}")


# Worked steps of the arithmetic: whole results ("37 + 25 = 62.") or column arithmetic, one digit
# at a time ("37 + 25: 7 + 5 = 12, write 2 carry 1; 3 + 2 + 1 = 6; so 37 + 25 = 62."), which a small
# model can carry out step by step. docs/brainstacks.md measures both on SmolLM2. A column step first
# states its operation with the operands in order: questions name them in either order ("subtract
# 54 from 71"), and a model that reads the digits straight off the question took them from the wrong
# number in most of its one-operation mistakes. Subtraction and multiplication keep one shape for
# every operand (two columns, the borrow and the carry always written) and one fact per equation:
# where the shape depended on the operands (a one-digit subtrahend, a carry or none) or an equation
# held two operations ("7 * 2 + 2 = 16"), the stacks mixed the shapes up and got the two-operation
# facts wrong in most of their one-operation misses.
def column_add(x: int, y: int) -> str:
    xs, ys = str(x)[::-1], str(y)[::-1]
    steps, carry = [], 0
    for i in range(max(len(xs), len(ys))):
        a, b = int(xs[i]) if i < len(xs) else 0, int(ys[i]) if i < len(ys) else 0
        total = a + b + carry
        term = f"{a} + {b}" + (f" + {carry}" if carry else "")
        steps.append(f"{term} = {total}" + (f", write {total % 10} carry 1" if total >= 10 else ""))
        carry = total // 10
    return f"{x} + {y}: " + "; ".join(steps) + f"; so {x} + {y} = {x + y}."


def column_subtract(x: int, y: int) -> str:
    """x - y for a two-digit x and a smaller y (one digit: its tens are 0), the units then the tens."""
    (tens, units), (y_tens, y_units) = divmod(x, 10), divmod(y, 10)
    if units >= y_units:
        first, second = f"{units} - {y_units} = {units - y_units}", f"{tens} - {y_tens} = {tens - y_tens}"
    else:
        first = f"{units} - {y_units} needs a borrow: {units + 10} - {y_units} = {units + 10 - y_units}"
        second = f"{tens} - 1 = {tens - 1}, {tens - 1} - {y_tens} = {tens - 1 - y_tens}"
    return f"{x} - {y}: {first}; {second}; so {x} - {y} = {x - y}."


def column_multiply(c: int, b: int) -> str:
    """c * b for a one-digit c and a two-digit b: the units, then the tens plus the carry."""
    tens, units = divmod(b, 10)
    low, high = c * units, c * tens
    carry = low // 10
    return (f"{c} * {b}: {c} * {units} = {low}, write {low % 10} carry {carry}; {c} * {tens} = {high}, "
            f"{high} + {carry} = {high + carry}; so {c} * {b} = {c * b}.")


MATH_STEPS = {
    "whole": {"add": lambda x, y: f"{x} + {y} = {x + y}.", "subtract": lambda x, y: f"{x} - {y} = {x - y}.",
              "multiply": lambda x, y: f"{x} * {y} = {x * y}."},
    "column": {"add": column_add, "subtract": column_subtract, "multiply": column_multiply},
}
MATH_STYLE = "column"


def _add(rng, style: str = MATH_STYLE):
    a, b = rng.randint(10, 89), rng.randint(2, 60)
    return {"a": a, "b": b}, [MATH_STEPS[style]["add"](a, b)], str(a + b)


def _subtract(rng, style: str = MATH_STYLE):
    a = rng.randint(20, 99)
    b = rng.randint(2, 9) if rng.random() < 0.5 else rng.randint(10, a - 1)
    return {"a": a, "b": b}, [MATH_STEPS[style]["subtract"](a, b)], str(a - b)


def _multiply(rng, style: str = MATH_STYLE):
    c, b = rng.randint(2, 9), rng.randint(10, 40)
    return {"c": c, "b": b}, [MATH_STEPS[style]["multiply"](c, b)], str(c * b)


def _in_words(rng, style: str = MATH_STYLE):
    """One addition or subtraction with its numbers written in words; the first step writes them in digits."""
    a, b = rng.randint(10, 89), rng.randint(2, 60)
    adding = rng.random() < 0.5 or a <= b
    op, result = ("plus", a + b) if adding else ("minus", a - b)
    digits = f"{in_words(a).capitalize()} is {a} and {in_words(b)} is {b}."
    step = MATH_STEPS[style]["add" if adding else "subtract"](a, b)
    return {"x": in_words(a), "y": in_words(b), "op": op}, [digits, step], str(result)


def _add_subtract(rng, style: str = MATH_STYLE):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "c": c}, [steps["add"](a, b), steps["subtract"](a + b, c)], str(a + b - c)


def _multiply_add(rng, style: str = MATH_STYLE):
    a, b, c = rng.randint(10, 60), rng.randint(10, 40), rng.randint(2, 9)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "c": c}, [steps["multiply"](c, b), steps["add"](c * b, a)], str(c * b + a)


def _add_subtract_add(rng, style: str = MATH_STYLE):
    a, b, c, d = rng.randint(10, 40), rng.randint(10, 30), rng.randint(2, 9), rng.randint(2, 20)
    steps = MATH_STEPS[style]
    return ({"a": a, "b": b, "c": c, "d": d},
            [steps["add"](a, b), steps["subtract"](a + b, c), steps["add"](a + b - c, d)], str(a + b - c + d))


def _add_add(rng, style: str = MATH_STYLE):
    a, b, d = rng.randint(10, 50), rng.randint(2, 9), rng.randint(10, 40)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "d": d}, [steps["add"](a, b), steps["add"](a + b, d)], str(a + b + d)


def _subtract_subtract(rng, style: str = MATH_STYLE):
    a, c, d = rng.randint(45, 99), rng.randint(2, 9), rng.randint(10, 35)
    steps = MATH_STEPS[style]
    return {"a": a, "c": c, "d": d}, [steps["subtract"](a, c), steps["subtract"](a - c, d)], str(a - c - d)


def _subtract_add(rng, style: str = MATH_STYLE):
    a, b, c = rng.randint(20, 60), rng.randint(10, 40), rng.randint(2, 9)
    steps = MATH_STEPS[style]
    return {"a": a, "b": b, "c": c}, [steps["subtract"](a, c), steps["add"](a - c, b)], str(a - c + b)


MATH_DRAWS = {"add": _add, "subtract": _subtract, "multiply": _multiply, "in-words": _in_words,
              "add-subtract": _add_subtract, "multiply-add": _multiply_add, "add-subtract-add": _add_subtract_add,
              "add-add": _add_add, "subtract-subtract": _subtract_subtract, "subtract-add": _subtract_add}

MATH_PHRASINGS = {
    "add": [
        "What is {a} plus {b}?", "Compute {a} + {b}.", "Add {a} and {b}.", "{a} + {b} = ?", "What is {a} + {b}?",
        "Calculate {a} + {b}.", "What do you get when you add {a} and {b}?", "Sum {a} and {b}.",
        "How much is {a} and {b} together?", "Work out {a} + {b}.", "Please add {a} to {b}.",
        "Tom has {a} marbles and finds {b} more. How many marbles does he have?",
        "A shop sold {a} cups in the morning and {b} in the afternoon. How many cups did it sell in all?",
        "I'm keeping score at a board game and need a quick hand: one team has {a} points and just won {b} "
        "more. What is their total now?",
        "Quick one: {a} + {b}?",
        # held out
        "Find the sum of {a} and {b}.", "If you add {b} to {a}, what do you get?",
        "What is the total of {a} and {b}?"],
    "subtract": [
        "What is {a} minus {b}?", "Compute {a} - {b}.", "Subtract {b} from {a}.", "{a} - {b} = ?",
        "What is {a} - {b}?", "Calculate {a} - {b}.", "What do you get when you take {b} from {a}?",
        "How much is {a} take away {b}?", "Work out {a} - {b}.", "Take {b} away from {a}.",
        "There were {a} birds on a wire and {b} flew away. How many are left?",
        "A tank holds {a} litres and {b} are drained. How many litres remain?",
        "My phone battery was at {a} percent and a video call used up {b} percent of it. Where is it at now? "
        "I just want the number.",
        "Quick one: {a} - {b}?",
        # held out
        "Find the difference between {a} and {b}.", "If you subtract {b} from {a}, what is left?",
        "What is {a} less {b}?"],
    "multiply": [
        "What is {c} times {b}?", "Compute {c} * {b}.", "Multiply {c} by {b}.", "{c} * {b} = ?",
        "What is {c} * {b}?", "Calculate {c} times {b}.", "What do you get when you multiply {c} and {b}?",
        "How much is {c} lots of {b}?", "Work out {c} x {b}.",
        "There are {c} boxes with {b} pens in each. How many pens is that?",
        "A bus makes {c} trips with {b} people each time. How many people rode in all?",
        "We're ordering chairs for a school play: {c} rows with {b} chairs in every row. How many chairs do we "
        "need altogether?",
        "Quick one: {c} times {b}?",
        # the two-digit number first: the worked step still states the one-digit number first
        "What is {b} times {c}?", "Multiply {b} by {c}.", "Compute {b} * {c}.", "{b} x {c} = ?",
        "How much is {b} times {c}?", "Each of {c} shelves holds {b} books. How many books is that?",
        # held out
        "Find the product of {c} and {b}.", "What is {b} multiplied by {c}?",
        "If {c} friends each bring {b} cookies, how many cookies are there?"],
    "in-words": [
        "What is {x} {op} {y}?", "Compute {x} {op} {y}.", "Work out {x} {op} {y}.", "{x} {op} {y}: what is it?",
        "Calculate {x} {op} {y}.", "How much is {x} {op} {y}?", "Tell me {x} {op} {y} in digits.",
        "What number is {x} {op} {y}?", "Solve {x} {op} {y}.", "Please work out {x} {op} {y} for me.",
        "My kid asked me what {x} {op} {y} is and I blanked. What is it?",
        # held out
        "Figure out {x} {op} {y}.", "What does {x} {op} {y} come to?", "Could you tell me {x} {op} {y}?"],
    "add-subtract": [
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
        "I have {a} apples, buy {b} more and eat {c}. How many apples are left?"],
    "multiply-add": [
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
        "There are {c} boxes of {b} pens and {a} loose pens. How many pens are there in total?"],
    "add-subtract-add": [
        "Compute {a} + {b} - {c} + {d}.", "What is {a} plus {b} minus {c} plus {d}?", "{a} + {b} - {c} + {d} = ?",
        "Calculate {a} + {b} - {c} + {d}.", "Work out {a} + {b} - {c} + {d}.", "Evaluate {a} + {b} - {c} + {d}.",
        "Add {a} and {b}, subtract {c}, then add {d}.",
        "A bus has {a} riders. {b} get on, {c} get off, then {d} more get on. How many riders are there now?",
        "Start with {a}, add {b}, take away {c} and add {d}. What do you end with?",
        "I had {a} euros, earned {b}, spent {c} on lunch and then found {d} in a pocket. How much do I have?",
        "What is the result of {a} + {b} - {c} + {d}?",
        # held out
        "Find the value of {a} + {b} - {c} + {d}.", "What does {a} + {b} - {c} + {d} come to?",
        "Solve {a} + {b} - {c} + {d}."],
    # two operations of one kind: with add-subtract and multiply-add, every first and every second
    # operation of a two-operation chain is read from the question, not from the chain's template
    "add-add": [
        "Compute {a} + {b} + {d}.", "What is {a} plus {b} plus {d}?", "{a} + {b} + {d} = ?", "Work out {a} + {b} + {d}.",
        "Calculate {a} + {b} + {d}.", "Add {a} and {b}, then add {d}.", "Evaluate {a} + {b} + {d}.",
        "A box has {a} pens. {b} are put in and then {d} more are put in. How many pens are in the box?",
        "Start at {a}, add {b}, then add {d}. What do you get?", "What is the result of {a} + {b} + {d}?",
        "Sam read {a} pages on Monday, {b} on Tuesday and {d} on Wednesday. How many pages did he read?",
        "Can you work out {a} + {b} + {d}?",
        # held out
        "Find the value of {a} + {b} + {d}.", "What does {a} + {b} + {d} come to?", "Solve {a} + {b} + {d}."],
    "subtract-subtract": [
        "Compute {a} - {c} - {d}.", "What is {a} minus {c} minus {d}?", "{a} - {c} - {d} = ?", "Work out {a} - {c} - {d}.",
        "Calculate {a} - {c} - {d}.", "Subtract {c} from {a}, then subtract {d}.", "Evaluate {a} - {c} - {d}.",
        "A tin has {a} biscuits. {c} are eaten and then {d} more are eaten. How many biscuits are left?",
        "Start at {a}, take away {c}, then take away {d}. What is left?", "What is the result of {a} - {c} - {d}?",
        "A train carries {a} people. {c} get off at the first stop and {d} at the second. How many are still on?",
        "Can you work out {a} - {c} - {d}?",
        # held out
        "Find the value of {a} - {c} - {d}.", "What does {a} - {c} - {d} come to?", "Solve {a} - {c} - {d}."],
    # a form held out of training as a whole: two operations in the order no training prompt has
    "subtract-add": [
        "Compute {a} - {c} + {b}.", "What is {a} minus {c} plus {b}?",
        "A jar holds {a} sweets. {c} are eaten and then {b} are added. How many sweets are in the jar?",
        "Work out {a} - {c} + {b}.", "What is {a} - {c} + {b}?", "Take {c} from {a}, then add {b}."],
}


def math_kinds(style: str = MATH_STYLE) -> list[TaskKind]:
    """The math domain's kinds, their worked steps in this style (MATH_STEPS: column, or whole results)."""
    return [TaskKind("math", name, tuple(MATH_PHRASINGS[name]), partial(MATH_DRAWS[name], style=style),
                     held_out_form=name == "subtract-add", held_out=(2, 1))
            for name in ("add", "subtract", "multiply", "in-words", "add-subtract", "multiply-add", "add-subtract-add",
                         "add-add", "subtract-subtract", "subtract-add")]


# ---------------------------------------------------------------- the cross-domain set's arithmetic
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

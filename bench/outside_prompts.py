"""Prompts written by hand outside the generated world (other wordings, words, names and numbers),
asked of a built chat zoo as a user would: under the meta-router's route as served ("auto") and, the
baseline in the same run, the base alone. Per domain: exact match of the reply's final answer with
Wilson 95% intervals, the base's answer found anywhere in its reply (it never writes "Answer:"), and
how often the router gave the prompt its own domain alone; everyday prompts: how many keep the
base's answer word for word, and how many the router sent to a domain. Ten prompts a domain is a
smoke test of what users meet, not an evaluation set: `training eval brainstacks` is that.

    python -m bench.outside_prompts --artifacts artifacts --out runs/bench/outside_prompts.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from server.settings import Settings
from training.brainstacks.continual import load_for_training
from training.data.world import Example, final_answer
from training.eval.brainstacks import BrainstacksEval, answer_in, proportion, run_routes

DOMAIN_PROMPTS = {
    "math": [("What is 23 plus 19?", "42"), ("What's 45 minus 17?", "28"), ("Calculate 12 times 7.", "84"),
             ("How much is 56 + 38?", "94"), ("What is eighty-four minus twenty-nine?", "55"),
             ("I had 40 dollars, spent 15 and then earned 22. How much do I have now?", "47"),
             ("What is 15 + 27 - 8?", "34"), ("Add 33 and 48.", "81"), ("Subtract 19 from 62.", "43"),
             ("Multiply 6 by 34.", "204")],
    "reasoning": [("Ann is shorter than Bob and Bob is shorter than Cal. Who is the tallest?", "Cal"),
                  ("Tom is taller than Eve. Who is shorter, Tom or Eve?", "Eve"),
                  ("Sue is shorter than Hal. Which of them is taller?", "Hal"),
                  ("Max is taller than Ian, and Ian is taller than Joe. Who is the shortest?", "Joe"),
                  ("Liz is shorter than Kim. Kim is shorter than Ned. Who is the shortest of the three?", "Liz"),
                  ("All cats are animals. Tom is a cat. Is Tom an animal? Answer yes or unknown.", "yes"),
                  ("Every whale is a mammal. Rex is not a whale. Is Rex a mammal? Answer yes or unknown.", "unknown"),
                  ("Ben is taller than Ada. Cy is shorter than Ada. Who is the tallest?", "Ben"),
                  ("Dan is shorter than Eve. Who is the taller one?", "Eve"),
                  ("Fay is taller than Gus and Gus is taller than Hugo. Who is tallest?", "Fay")],
    "chat": [("Please write 'hello' in all caps.", "HELLO"), ("Uppercase this: window", "WINDOW"),
             ("Sort these words alphabetically: pear, apple, mango", "apple, mango, pear"),
             ("Repeat 'yes' three times, separated by commas.", "yes, yes, yes"),
             ("Reverse the order of these words: red green blue", "blue green red"),
             ("Write 'good morning' in capital letters.", "GOOD MORNING"),
             ("Alphabetize: zebra, cat, dog", "cat, dog, zebra"), ("Say 'go' twice, comma separated.", "go, go"),
             ("Put these words in reverse order: one two three", "three two one"),
             ("Capitalize every letter of 'river'.", "RIVER")],
    "code": [("What does len([4, 8, 15, 16]) return in Python?", "4"), ("In Python, what is 'planet'[:3]?", "pla"),
             ("a = 3\nb = a * 5\nprint(b - a)\nWhat is printed?", "12"), ("What is len(['a', 'b', 'c'])?", "3"),
             ("What does 'keyboard'[:4] evaluate to?", "keyb"),
             ("x = 6\ny = x * 2\nprint(y - x)\nWhat's the output?", "6"),
             ("How long is the list [7, 7, 7, 7, 7] according to len()?", "5"),
             ("Python: 'sunlight'[:2] gives what?", "su"), ("n = 2\nm = n * 9\nprint(m - n)\nWhat gets printed?", "16"),
             ("What is len(['red', 'green'])?", "2")],
    # the invented table's own names (no outside facts exist), asked in a user's words
    "medical": [("My patient has grey fever. Which drug should I give?", "zantrocil"),
                ("What's the right dose of pulmarex per kilo?", "3 mg per kg"),
                ("Cough plus wheezing, what condition is that?", "marsh cough"),
                ("Which medicine is used for stone ache?", "renovil"),
                ("How many mg per kg of optavex do I give?", "8 mg per kg"),
                ("Nausea and cramps together suggest which condition?", "gut knot"),
                ("What do doctors prescribe for red joint?", "artholin"),
                ("Dose of thermadol, per kg of body weight?", "6 mg per kg"),
                ("I have blurred vision and a headache. What condition could that be?", "eye blur"),
                ("What treats blue rash?", "dermacort")],
}
EVERYDAY_PROMPTS = [
    "Hi there! How are you?", "Bonjour, ça va bien ?", "Can you recommend a good book for a long flight?",
    "What is the capital of France?", "How do I boil an egg?", "Tell me a joke.", "What should I cook for dinner tonight?",
    "How do I read a thermometer?", "Is it healthy to drink coffee every day?", "Write a haiku about autumn.",
    "What's a good way to learn Spanish?", "How many days are in a leap year?", "Give me a name for my new puppy.",
    "What's the difference between a laptop and a tablet?", "How do I stay focused while studying?",
    "Guten Tag! Wie spät ist es?", "What is the tallest mountain in the world?", "Can you help me write an email to my boss?",
    "What are some fun things to do on a rainy day?", "How can I save money on groceries?", "Why is the sky blue?",
    "What is a good stretch for back pain?", "Should I learn Python or JavaScript first?", "How old is the universe?",
    "Describe the ocean in one sentence.", "What's the best way to water houseplants?",
    "How long should I sleep each night?", "Tell me something interesting about octopuses.",
    "What words rhyme with cat?", "How do I change a flat tyre?"]


def served_routes(chat, items: list[Example]) -> list[dict]:
    routes = []
    for e in items:
        p = chat.router_probabilities(e.messages())
        routes.append(chat.router.route(torch.tensor([p[d] for d in chat.domains]))[0])
    return routes


def measure(chat, domain_prompts: dict, everyday: list[str], max_new_tokens: int = 176,
            everyday_tokens: int = 48) -> dict:
    cfg, cache = BrainstacksEval(max_new_tokens=max_new_tokens), {}
    report = {"domains": {}}
    for domain, pairs in domain_prompts.items():
        if domain not in chat.domains:
            continue
        items = [Example(domain, p, f"Answer: {final}", final, "outside") for p, final in pairs]
        routes = served_routes(chat, items)
        _, base = run_routes(chat, items, [{}] * len(items), cfg, cache, max_new_tokens)
        _, auto = run_routes(chat, items, routes, cfg, cache, max_new_tokens)
        report["domains"][domain] = {
            "auto": proportion([final_answer(r) == e.final for r, e in zip(auto, items)]),
            "base": proportion([final_answer(r) == e.final for r, e in zip(base, items)]),
            "base_answer_in_reply": proportion([answer_in(r, e.final) for r, e in zip(base, items)]),
            "own_domain_alone": proportion([set(r) == {domain} for r in routes]),
            "replies": [{"prompt": e.prompt, "expected": e.final, "route": r, "auto": a, "base": b}
                        for e, r, a, b in zip(items, routes, auto, base)]}
    items = [Example("general", p, "", "", "outside") for p in everyday]
    routes = served_routes(chat, items)
    _, base = run_routes(chat, items, [{}] * len(items), cfg, cache, everyday_tokens)
    _, auto = run_routes(chat, items, routes, cfg, cache, everyday_tokens)
    report["everyday"] = {"kept": proportion([a == b for a, b in zip(auto, base)]),
                          "sent_to_a_domain": [{"prompt": e.prompt, "route": r, "auto": a, "base": b}
                                               for e, r, a, b in zip(items, routes, auto, base) if r]}
    return report


def table(report: dict) -> str:
    lines = [f"{'domain':<11}{'auto exact':>12}{'95%':>15}{'base exact':>12}{'base in reply':>15}{'own route':>11}{'n':>4}"]
    for domain, row in report["domains"].items():
        lo, hi = row["auto"]["interval"]
        lines.append(f"{domain:<11}{row['auto']['exact_match']:>12.2f}{f'[{lo:.2f}, {hi:.2f}]':>15}{row['base']['exact_match']:>12.2f}"
                     f"{row['base_answer_in_reply']['exact_match']:>15.2f}{row['own_domain_alone']['exact_match']:>11.2f}"
                     f"{row['auto']['n']:>4}")
    kept = report["everyday"]["kept"]
    lines.append(f"everyday prompts keeping the base's answer: {kept['correct']}/{kept['n']}; sent to a domain: "
                 f"{len(report['everyday']['sent_to_a_domain'])}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--artifacts", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=Path("runs/bench/outside_prompts.json"))
    args = parser.parse_args()
    manifests = Settings(_env_file=None, **({"artifact_root": args.artifacts} if args.artifacts else {})).manifests()
    chat = load_for_training(manifests.read().chat, manifests, "cpu")
    started = time.perf_counter()
    with chat.mounted({}):
        report = measure(chat, DOMAIN_PROMPTS, EVERYDAY_PROMPTS)
    report.update(base=chat.name, seconds=time.perf_counter() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("baseline: the base alone on the same prompts (exact: its 'Answer:' line; in reply: anywhere)")
    print(table(report))
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()

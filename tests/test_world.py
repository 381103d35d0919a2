"""The generated multi-domain world: seeded, held out by phrasing and by form, every final answer
checkable, every answer as many steps as its question asks."""

import re
from collections import Counter
from dataclasses import replace

import pytest

from training.data.world import (CROSS_KINDS, DOMAINS, KINDS, PROBE_PHRASINGS, examples, final_answer, general_corpus,
                                 held_out, held_out_forms, kinds_of, probe_prompts)


def test_every_domain_and_the_cross_set_have_checkable_final_answers():
    for domain in (*DOMAINS, "cross"):
        for example in examples(domain, "test", 30):
            assert final_answer(example.answer) == example.final, example
            assert "Answer:" not in example.prompt


def test_held_out_phrasings_never_reach_training_and_generation_is_seeded():
    for domain in (*DOMAINS, "cross"):
        train = examples(domain, "train", 2000)
        val, test = held_out(domain, "val", 30), held_out(domain, "test", 30)
        phrasings = {split: {(e.kind, e.phrasing) for e in items} for split, items in
                     (("train", train), ("val", val), ("test", test))}
        assert not (phrasings["train"] & phrasings["val"]) and not (phrasings["train"] & phrasings["test"])
        assert not (phrasings["val"] & phrasings["test"])
        assert not ({e.prompt for e in train} & {e.prompt for e in test})
        # every held-out phrasing is used, and every training phrasing too
        kinds = CROSS_KINDS if domain == "cross" else KINDS[domain]
        assert phrasings["test"] == {(k.name, i) for k in kinds for i in k.phrasings_of("test")}
        assert phrasings["train"] == {(k.name, i) for k in kinds for i in k.phrasings_of("train")}
    assert examples("math", "train", 20) == examples("math", "train", 20)
    assert examples("math", "train", 20, seed=1) != examples("math", "train", 20)


def test_more_training_phrasings_leave_the_held_out_prompts_unchanged():
    # Regression guard: the world grows by training phrasings inserted before the held-out ones, and
    # evaluations stay comparable only if validation and test prompts are then the same, prompt for prompt.
    for domain in DOMAINS:
        grown = [k if k.held_out_form else replace(k, phrasings=(*k.phrasings[:-3], f"New phrasing {i}.", *k.phrasings[-3:]))
                 for i, k in enumerate(KINDS[domain])]
        for split in ("val", "test"):
            asked = [(e.kind, e.prompt, e.answer) for e in held_out(domain, split, 20, kinds=grown)]
            assert asked == [(e.kind, e.prompt, e.answer) for e in held_out(domain, split, 20)]
        assert examples(domain, "train", 200, kinds=grown) != examples(domain, "train", 200)


def test_probe_phrasings_are_no_phrasing_of_the_world_and_ask_every_kind():
    phrasings = {p for d in (*DOMAINS, "cross", "general") for k in kinds_of(d) for p in k.phrasings}
    assert not phrasings & {p for probe in PROBE_PHRASINGS.values() for p in probe}
    for domain in (*DOMAINS, "general"):
        asked = probe_prompts(domain, 3)
        assert len({e.prompt for e in asked}) == len(asked)
        per_phrasing = Counter((e.kind, e.phrasing) for e in asked)
        assert set(per_phrasing) == {(k.name, i) for k in kinds_of(domain) for i in range(len(PROBE_PHRASINGS[k.name]))}
        assert set(per_phrasing.values()) == {3}
        assert all(final_answer(e.answer) == e.final for e in asked if domain != "general")


def test_held_out_sets_are_distinct_stratified_and_count_what_exists():
    for domain in (*DOMAINS, "cross"):
        test = held_out(domain, "test", 60)
        assert len({e.prompt for e in test}) == len(test)
        counts = Counter(e.kind for e in test)
        assert set(counts) == {k.name for k in (CROSS_KINDS if domain == "cross" else KINDS[domain])}
        assert max(counts.values()) == 60
    # a fixed table has few distinct questions: all of them, not repeats
    diagnoses = [e.prompt for e in held_out("medical", "test", 100) if e.kind == "diagnosis"]
    assert len(diagnoses) == 8 * 2 * 2  # 8 conditions, 2 symptom orders, 2 held-out phrasings without a patient
    assert held_out("medical", "test", 100) == held_out("medical", "test", 100)


def test_worked_steps_spell_count_and_name_what_was_asked():
    # Regression guard on the worked steps a small model carries out one at a time.
    for e in examples("code", "train", 300):
        if e.kind == "length":
            listed = e.prompt.split("[")[1].split("]")[0].split(", ")
            assert e.answer.startswith("Counting: " + ", ".join(f"{x} ({k})" for k, x in enumerate(listed, 1)) + ".")
        if e.kind == "slice":
            word = e.prompt.split("'")[1]
            assert f"{word} is spelled {', '.join(word)}." in e.answer and f"Together: {e.final}." in e.answer
            assert e.answer.count(" (") == len(e.final) and e.final == word[:len(e.final)]
    for e in examples("reasoning", "train", 100):
        if e.kind == "height-chain":
            asked = "tallest" if "tallest" in e.prompt else "shortest"
            assert f"The question asks for the {asked}: {e.final}." in e.answer
            assert f"the {asked} is {e.final}" in e.answer


def test_cross_domain_prompts_need_two_domains():
    kinds = {e.domain for e in examples("cross", "test", 60)}
    assert kinds == {"cross:medical+math", "cross:code+math", "cross:reasoning+chat"}
    dose = next(e for e in examples("cross", "test", 60) if e.domain == "cross:medical+math")
    assert "mg per kg" in dose.answer and dose.final.endswith(" mg")


def test_pretraining_prose_has_no_task_format():
    corpus = general_corpus(500)
    assert len(set(corpus)) > 300
    assert not any("Answer:" in text or "?" in text.replace("how are you?", "") for text in corpus)


def test_pretraining_prose_repeats_itself_for_copying():
    corpus = general_corpus(2000)
    retold = [t for t in corpus if " again: " in t or " unpacked " in t or " aloud." in t or " from the " in t]
    assert 0.2 < len(retold) / len(corpus) < 0.4
    for text in retold:
        if " again: " in text:  # the list said again is the list said first
            first, second = text.split(" again: ")
            assert first.split("The list was ")[1].split(".")[0] == second.rstrip(".")


def test_final_answer_reads_the_last_answer_line():
    assert final_answer("12 + 3 = 15. Answer: 15") == "15"
    assert final_answer("Answer: 1\nmore text. Answer: 2.") == "2"
    assert final_answer("no final answer") is None


def test_wilson_interval_brackets_the_proportion_and_narrows_with_n():
    from training.eval.statistics import wilson_interval

    lo, hi = wilson_interval(0, 20)
    assert lo == 0.0 and 0.1 < hi < 0.2  # all wrong in 20 still allows up to ~16%
    lo, hi = wilson_interval(30, 60)
    assert lo < 0.5 < hi and abs((lo + hi) / 2 - 0.5) < 1e-9
    assert (wilson_interval(300, 600)[1] - wilson_interval(300, 600)[0]) < (hi - lo) / 2
    assert wilson_interval(7, 10) == pytest.approx((0.3968, 0.8922), abs=1e-4)  # the textbook value


def test_every_domain_holds_one_form_out_of_training_whole():
    for domain in DOMAINS:
        unseen = held_out_forms(domain)
        assert len(unseen) == 1, (domain, unseen)
        # no gradient and no choice made on validation (best step, gate, router) sees the form
        assert not {e.kind for e in examples(domain, "train", 3000)} & unseen
        assert not {e.kind for e in examples(domain, "val", 300)} & unseen
        asked = {e.kind for e in held_out(domain, "test", 5)}
        assert unseen <= asked and len(asked) == len(kinds_of(domain))
    assert held_out_forms("math") == {"subtract-add"} and held_out_forms("reasoning") == {"height-mixed"}


def test_answers_have_the_steps_the_question_asks_and_no_more():
    """Regression guard: one operation is one step (the math stack once added a second one to every
    answer), a chain one step per operation; a comparison stated the other way round is restated."""
    from training.eval.brainstacks import steps_of

    expected = {"add": 1, "subtract": 1, "multiply": 1, "in-words": 2, "add-subtract": 2, "multiply-add": 2,
                "add-subtract-add": 3, "add-add": 2, "subtract-subtract": 2, "subtract-add": 2}
    for e in held_out("math", "test", 20):
        assert steps_of(e.answer) == expected[e.kind], e
        assert e.answer.count(" = ") >= expected[e.kind]
    for e in held_out("reasoning", "test", 20):
        if e.kind in ("height-shorter", "height-mixed"):
            assert ", so " in e.answer and "taller than" in e.answer
        if e.kind == "height-pair":
            assert steps_of(e.answer) == 2 and f"The question asks who is " in e.answer


def test_column_arithmetic_and_numbers_in_words_are_right():
    import random

    from training.data.world_math import column_add, column_multiply, column_subtract, in_words

    rng = random.Random(0)
    for _ in range(300):
        x, y, c = rng.randint(10, 99), rng.randint(2, 99), rng.randint(2, 9)
        assert column_add(x, y).startswith(f"{x} + {y}: ") and column_add(x, y).endswith(f"so {x} + {y} = {x + y}.")
        worked = [column_multiply(c, x)] + ([column_subtract(x, y)] if y < x else [])
        assert worked[0].endswith(f"so {c} * {x} = {c * x}.")
        assert y >= x or worked[1].endswith(f"so {x} - {y} = {x - y}.")
        for text in worked:  # every equation is one operation, and right
            for left, op, right, result in re.findall(r"(\d+) ([-*+]) (\d+) = (\d+)", text):
                assert eval(f"{left} {op} {right}") == int(result), text
            assert not re.search(r"\d+ [-*+] \d+ [-*+] \d+ =", text), text
    assert [in_words(n) for n in (7, 13, 20, 23, 99)] == ["seven", "thirteen", "twenty", "twenty-three", "ninety-nine"]
    # one shape for every operand: two columns, the borrow and the carry always written
    assert column_subtract(45, 38) == "45 - 38: 5 - 8 needs a borrow: 15 - 8 = 7; 4 - 1 = 3, 3 - 3 = 0; so 45 - 38 = 7."
    assert column_subtract(84, 8) == "84 - 8: 4 - 8 needs a borrow: 14 - 8 = 6; 8 - 1 = 7, 7 - 0 = 7; so 84 - 8 = 76."
    assert column_subtract(28, 7) == "28 - 7: 8 - 7 = 1; 2 - 0 = 2; so 28 - 7 = 21."
    assert column_multiply(6, 32) == "6 * 32: 6 * 2 = 12, write 2 carry 1; 6 * 3 = 18, 18 + 1 = 19; so 6 * 32 = 192."
    assert column_multiply(4, 12) == "4 * 12: 4 * 2 = 8, write 8 carry 0; 4 * 1 = 4, 4 + 0 = 4; so 4 * 12 = 48."


def test_everyday_prompts_come_in_families_held_out_by_phrasing():
    families = {k.name for k in kinds_of("general")}
    assert {"everyday", "greetings", "health-talk", "numbers-talk", "words-talk", "tech-talk"} <= families
    train = {(e.kind, e.phrasing) for e in examples("general", "train", 3000)}
    test = {(e.kind, e.phrasing) for e in held_out("general", "test", 30)}
    assert not train & test and {kind for kind, _ in test} == families
    assert all(e.answer == "" and e.final == "" for e in held_out("general", "test", 5))


def test_each_held_out_form_combines_steps_that_training_works_elsewhere():
    """Regression guard on what a held-out form measures: its steps are steps trained kinds work, on
    other material or from another starting point; the form itself is never trained."""
    trained = {domain: examples(domain, "train", 3000) for domain in ("chat", "code", "medical", "reasoning")}
    forms = {domain: [e for e in held_out(domain, "test", 20) if e.kind in held_out_forms(domain)] for domain in trained}
    answers = {d: {e.kind: {t.answer for t in trained[d] if t.kind == e.kind} for e in trained[d]} for d in trained}
    for e in forms["medical"]:  # condition -> drug -> dose: the last two steps of a trained chain from symptoms
        assert any(a.endswith(e.answer) and a != e.answer for a in answers["medical"]["dose-for-symptoms"]), e
    for e in forms["code"]:  # quoted words counted as every trained quoted list counts them, then a length
        count, total = e.answer.split(". ", 1)
        quoted_count = re.compile(r"Counting: '\w+' \(1\)(, '\w+' \(\d\))+$")
        assert quoted_count.match(count), e
        for kind in ("last-item", "index-of"):
            assert all(quoted_count.match(a.split(". ")[0]) for a in answers["code"][kind]), kind
        assert any(a.endswith(total) for a in answers["code"]["length"]), e
        assert any(a.endswith(f"Answer: {k}") for a in answers["code"]["index-of"] for k in range(5))
        assert all(re.search(r"is item (\d), at index (\d)\. Answer: \d$", a) for a in answers["code"]["index-of"])
    for e in forms["chat"]:  # a phrase of two words, its letter case rewritten as trained kinds rewrite it
        phrase = e.answer.split(", ", 1)[1].split(" is ")[0]
        assert len(phrase.split()) == 2 and all(any(f"In title case, {w} " in a or f" {w} is " in a for a in
                                                    answers["chat"]["title-phrase"]) for w in phrase.split()), e
        assert all(any(a.startswith(f"In capitals, {w} is") for a in answers["chat"]["capitals"]) for w in phrase.split())
        assert any(re.match(r"In capitals: [A-Z]+, [A-Z]+", a) for a in answers["chat"]["capitals-list"])
    for e in forms["reasoning"]:  # a fact stated each way, restated as the chains restate their facts
        taller, shorter = e.answer.split(". ")[:2]
        fact = re.compile(r"(\w+) is taller than (\w+)$")
        turned = re.compile(r"(\w+) is shorter than (\w+), so (\w+) is taller than (\w+)$")
        assert fact.match(taller) and any(fact.match(a.split(". ")[0]) for a in answers["reasoning"]["height-chain"]), e
        assert turned.match(shorter) and any(turned.match(a.split(". ")[0]) for a in answers["reasoning"]["height-shorter"])
    assert len(forms["chat"]) == len(forms["code"]) == len(forms["medical"]) == len(forms["reasoning"]) == 20

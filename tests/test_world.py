"""The generated multi-domain world: seeded, split by prompt, every final answer checkable."""

from training.data.world import DOMAINS, examples, final_answer, general_corpus, split_of


def test_every_domain_and_the_cross_set_have_checkable_final_answers():
    for domain in (*DOMAINS, "cross"):
        for example in examples(domain, "test", 30):
            assert final_answer(example.answer) == example.final, example
            assert "Answer:" not in example.prompt


def test_splits_are_disjoint_and_generation_is_seeded():
    for domain in DOMAINS:
        train = {e.prompt for e in examples(domain, "train", 500)}
        val = {e.prompt for e in examples(domain, "val", 50)}
        test = {e.prompt for e in examples(domain, "test", 50)}
        assert not (train & val) and not (train & test) and not (val & test)
        assert all(split_of(p) == "test" for p in test)
    assert examples("math", "train", 20) == examples("math", "train", 20)
    assert examples("math", "train", 20, seed=1) != examples("math", "train", 20)


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

"""How the generated world asks each task kind: its phrasings, the last of which are held out for
validation and test (never trained on), and probe phrasings unlike any of them, for a check of the
router alone."""

from __future__ import annotations

from training.data.world_math import _program_sum, _weight_dose, math_kinds
from training.data.world_tasks import (
    TaskKind, _capitals, _capitals_phrase, _diagnosis, _dose, _dose_for_condition, _dose_for_symptoms, _drug_for_symptoms,
    _height_chain, _height_mixed, _height_pair, _height_shorter, _index_of, _last_item, _length, _length_words,
    _capitals_list, _lower_phrase, _program, _repeat,
    _reverse, _slice, _sort, _syllogism, _tallest_in_capitals, _title_phrase, _treatment,
)

HELD_OUT_FORM = {"held_out_form": True}  # never trained on nor validated on: every phrasing a test phrasing


def _kinds(domain: str, table: dict) -> list[TaskKind]:
    """A domain's kinds from {name: (draw, phrasings[, options])}; options: HELD_OUT_FORM."""
    return [TaskKind(domain, name, tuple(spec[1]), spec[0], **(spec[2] if len(spec) > 2 else {}))
            for name, spec in table.items()]


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
            "Uppercase '{word}', please.", "I'd like '{word}' written in uppercase letters.",
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
        "title-phrase": (_title_phrase, [
            "Write '{phrase}' in title case.", "Convert '{phrase}' to title case.", "Title-case '{phrase}'.",
            "Start each word of '{phrase}' with a capital letter.", "Make '{phrase}' title case.",
            "Give me '{phrase}' with the first letter of every word uppercase.", "Put '{phrase}' into title case.",
            "How is '{phrase}' written in title case?", "What is '{phrase}' in title case?",
            "Can you title-case '{phrase}' for a heading?", "Turn '{phrase}' into a title: first letters uppercase.",
            "'{phrase}' in title case, please.", "Rewrite '{phrase}' so each word begins with an uppercase letter.",
            "Format '{phrase}' as a title.",
            # held out
            "Capitalise the first letter of each word in '{phrase}'.", "What does '{phrase}' look like in title case?",
            "Could you write '{phrase}' in title case?"]),
        "lower-phrase": (_lower_phrase, [
            "Write '{phrase}' in lowercase.", "Convert '{phrase}' to lower case.", "Put '{phrase}' into small letters.",
            "Give me '{phrase}' with no capital letters.", "Make '{phrase}' all lowercase.", "Lowercase '{phrase}', please.",
            "How is '{phrase}' written in lowercase?", "What is '{phrase}' in lowercase?",
            "Turn '{phrase}' into lower case letters.", "Rewrite '{phrase}' using only small letters.",
            "Stop shouting: write '{phrase}' in lowercase.", "Can you lowercase '{phrase}'?",
            # held out
            "Change '{phrase}' so that every letter is small.", "What does '{phrase}' look like in lowercase?",
            "Could you write '{phrase}' in lower case?"]),
        "capitals-list": (_capitals_list, [
            "Write these words in capitals: {words}.", "Put each of these words in upper case: {words}.",
            "Give me {words} in all caps.", "Uppercase every word in this list: {words}.",
            "Convert these words to capital letters: {words}.", "Capitalise every letter of each word: {words}.",
            "How are {words} written in capitals?", "What are {words} in uppercase?",
            "Turn the words {words} into capitals.", "Could you write {words} in block capitals?",
            "{words}: all in capitals, please.", "Rewrite each of {words} in uppercase letters.",
            "Make every one of these words uppercase: {words}.", "Type {words} with caps lock on.",
            # held out
            "Change {words} so that every letter is a capital.", "What do {words} look like in upper case?",
            "Show me {words} written entirely in capitals."]),
        # a form held out of training as a whole: a phrase in capitals (training writes one word and
        # lists of words in capitals, and phrases of two words in title case and in lowercase)
        "capitals-phrase": (_capitals_phrase, [
            "Write '{phrase}' in capital letters.", "Give me '{phrase}' in all caps.", "Put '{phrase}' into capitals.",
            "What is '{phrase}' in uppercase?", "Convert '{phrase}' to upper case.",
            "How do you write '{phrase}' in capital letters?"], HELD_OUT_FORM),
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
        "last-item": (_last_item, [
            "What is {items}[-1] in Python?", "In Python, what does {items}[-1] evaluate to?",
            "What is the last item of the Python list {items}?", "Evaluate {items}[-1] in Python.",
            "If x = {items}, what is x[-1]?", "Python: {items}[-1] is what?", "Compute {items}[-1].",
            "What does Python return for {items}[-1]?", "Which item does {items}[-1] give in Python?",
            "Given the list {items}, what is its last element?", "What would {items}[-1] be?",
            "Tell me the value of {items}[-1].", "What is printed by print({items}[-1])?",
            "What do you get from {items}[-1] in Python?",
            # held out
            "Find {items}[-1] for this Python list.", "words = {items}. What is words[-1]?",
            "What is the final element of {items} in Python?"]),
        "index-of": (_index_of, [
            "What is {items}.index({item}) in Python?", "In Python, what does {items}.index({item}) return?",
            "At which index is {item} in the Python list {items}?", "Evaluate {items}.index({item}) in Python.",
            "If x = {items}, what is x.index({item})?", "Python: {items}.index({item}) is what?",
            "Compute {items}.index({item}).", "What does Python return for {items}.index({item})?",
            "Given the list {items}, what is the index of {item}?", "What would {items}.index({item}) be?",
            "Tell me the value of {items}.index({item}).", "What is printed by print({items}.index({item}))?",
            # held out
            "Find the index of {item} in {items} in Python.", "words = {items}. What is words.index({item})?",
            "Where in {items} is {item}, as a Python index?"]),
        # a form held out of training as a whole: len() of a list of strings (training counts lists
        # of numbers for their length, and lists of strings for their last item or an item's index)
        "length-words": (_length_words, [
            "What does len({items}) return in Python?", "In Python, what is len({items})?",
            "How many items does the Python list {items} have?", "Evaluate len({items}) in Python.",
            "If x = {items}, what is len(x)?", "What is the length of the list {items} in Python?"], HELD_OUT_FORM),
    }),
    "math": math_kinds(),
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
            # the question names the condition too: a dose asked is answered with the dose
            "{patient} with {condition} is prescribed {drug}. What is its dose?",
            "{drug} is the drug for {condition}. What dose of it is given?",
            "For {condition}, {drug} is used. How many mg per kg of it?",
            "At what dose is {drug} prescribed?",
            "What is the usual dose for {drug}?", "{patient} needs {drug}. How much per kg?"]),
        "drug-for-symptoms": (_drug_for_symptoms, [
            "{patient} has {first} and {second}. Which drug should they get?",
            "Which drug treats the condition behind {first} and {second}?",
            "A patient presents with {first} and {second}. What medicine is prescribed?",
            "What should {patient} with {first} and {second} be given?",
            "Symptoms: {first}, {second}. Which drug?", "Name the drug for a patient with {first} and {second}.",
            "{patient} reports {first} and {second}. What is the treatment?",
            "What medicine helps someone with {first} and {second}?",
            "Given {first} and {second}, which drug is used?",
            "{first} and {second}: which medication treats them?",
            "What is prescribed for {first} together with {second}?",
            # held out
            "Which medication does {patient} with {first} and {second} need?",
            "What drug is given for {first} with {second}?", "If someone has {first} and {second}, what do they take?"]),
        "dose-for-symptoms": (_dose_for_symptoms, [
            "{patient} has {first} and {second}. What dose of the right drug is given?",
            "What is the dose of the drug for {first} and {second}?",
            "A patient presents with {first} and {second}. How many mg per kg of the drug should be given?",
            "How much of the treatment for {first} and {second} is given per kg of body weight?",
            "Symptoms: {first}, {second}. What dose of the drug?", "{patient} reports {first} and {second}. What dose is used?",
            "Which dose treats {first} with {second}?",
            "Given {first} and {second}, how many mg per kg of the medicine?",
            "{first} and {second}: what dose of the drug that treats them?",
            "What dosage is prescribed for {first} together with {second}?",
            "Dose of the medicine for {first} and {second}?",
            # held out
            "What amount per kg of the drug for {first} and {second} is given?",
            "How much medicine per kg does {patient} with {first} and {second} get?",
            "If someone has {first} and {second}, what dose of the drug do they take?"]),
        # a form held out of training as a whole: two lookups from a condition, condition to drug to
        # dose (training chains lookups only from symptoms)
        "dose-for-condition": (_dose_for_condition, [
            "{patient} has {condition}. What is the dose of the drug that treats it?",
            "What dose of the drug for {condition} is given?",
            "How much of the medicine for {condition} is given per kg of body weight?",
            "{patient} has {condition}. How many mg per kg of its drug should be given?",
            "Which dose is used for the drug that treats {condition}?",
            "What is the dose of the treatment for {condition}?"], HELD_OUT_FORM),
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
            "{a} is taller than {b}, while {b} is taller than {c}. Who is the {question}?",
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
        "height-shorter": (_height_shorter, [
            "{c} is shorter than {b}. {b} is shorter than {a}. Who is the {question}?",
            "{c} is shorter than {b}, and {b} is shorter than {a}. Who is {question}?",
            "If {c} is shorter than {b} and {b} is shorter than {a}, who is the {question}?",
            "Three friends: {c} is shorter than {b}; {b} is shorter than {a}. Which one is the {question}?",
            "Given that {c} is shorter than {b} and {b} is shorter than {a}, name the {question}.",
            "Height puzzle: {c} is shorter than {b}, {b} is shorter than {a}. Who is {question}?",
            "{c} is shorter than {b}. Also, {b} is shorter than {a}. Who is the {question} of the three?",
            "Who is the {question}, if {c} is shorter than {b} and {b} is shorter than {a}?",
            "We measured the kids at the party: {c} came out shorter than {b}, and {b} shorter than {a}. "
            "Which of them is the {question}?",
            "Tell me the {question}: {c} is shorter than {b} and {b} is shorter than {a}.",
            # held out
            "Of {a}, {b} and {c}: {c} is shorter than {b}, {b} is shorter than {a}. Who is the {question}?",
            "It is known that {c} is shorter than {b} and that {b} is shorter than {a}. Who is {question}?",
            "Which person is the {question} if {c} is shorter than {b} and {b} is shorter than {a}?"]),
        "height-pair": (_height_pair, [
            "{first} is {relation} {second}. Who is {question}?", "If {first} is {relation} {second}, who is {question}?",
            "{first} is {relation} {second}. Which of the two is {question}?",
            "Given that {first} is {relation} {second}, name the {question} one.",
            "Who is {question}: {first} is {relation} {second}?", "{first} is {relation} {second}. Who's {question}?",
            "Two friends stood back to back and {first} turned out {relation} {second}. So who is {question}?",
            "Tell me who is {question}, if {first} is {relation} {second}.",
            "We know {first} is {relation} {second}. Which one is {question}?",
            # held out
            "Between {first} and {second}, {first} is {relation} {second}. Who is {question}?",
            "Since {first} is {relation} {second}, which of them is {question}?",
            "{first} is {relation} {second}: which is the {question} of the pair?"]),
        # a form held out of training as a whole: a chain stated one fact each way
        "height-mixed": (_height_mixed, [
            "{a} is taller than {b}. {c} is shorter than {b}. Who is the {question}?",
            "If {a} is taller than {b} and {c} is shorter than {b}, who is the {question}?",
            "{a} is taller than {b}, and {c} is shorter than {b}. Who is {question}?",
            "Given that {a} is taller than {b} and {c} is shorter than {b}, name the {question}.",
            "Height puzzle: {a} is taller than {b}; {c} is shorter than {b}. Who is the {question}?",
            "Who is the {question}, if {a} is taller than {b} and {c} is shorter than {b}?"], HELD_OUT_FORM),
    }),
}


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

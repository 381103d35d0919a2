"""Everyday prompts: what an instruction-tuned base already answers, and what the meta-router must
leave to it ("no domain"). No final answer: the base's own reply is the reference. Beside everyday
questions, writing and advice, families that look like a domain without being one: greetings in
other languages, health talk that is no lookup in the invented table, numbers that ask for no sum,
words that ask for no rewriting, technology that asks for no program run. And probe phrasings,
unlike every phrasing of the world, for a check of the router alone."""

from __future__ import annotations

from training.data.world_tasks import TaskKind, _general

GREETINGS = ["Bonjour ! Comment ça va ?", "Hola, ¿qué tal?", "Guten Morgen! Wie geht's?", "Ciao! Come stai?",
             "Olá, tudo bem?", "Hallo, hoe gaat het?", "Hello there!", "Hey, good to see you!", "Good evening!",
             "Salut, ça va ?", "Buenos días, ¿cómo estás?", "Hi! How's your week going?"]
DEVICES = ["thermometer", "blood pressure monitor", "fitness watch", "pulse oximeter", "step counter", "humidifier"]
HABITS = ["walking to work", "drinking coffee", "stretching in the morning", "taking naps", "cycling",
          "eating breakfast", "going to bed early"]
GADGETS = ["laptop", "phone", "tablet", "keyboard", "monitor", "smartwatch"]
LANGUAGES = ["Python", "JavaScript", "Rust", "Java", "Go", "Swift"]


def _everyday(rng):
    slots, _, _ = _general(rng)
    slots |= {"greeting": rng.choice(GREETINGS), "device": rng.choice(DEVICES), "habit": rng.choice(HABITS),
              "n": rng.randint(2, 12), "price": rng.choice([10, 20, 25, 30, 50, 100]),
              "word": rng.choice(["journey", "harbour", "whisper", "lantern", "meadow", "puzzle", "velvet", "orbit"]),
              "gadget": rng.choice(GADGETS), "language": rng.choice(LANGUAGES)}
    return slots, [], ""


EVERYDAY = TaskKind("general", "everyday", (
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
), _general, held_out=(8, 4))


def _family(name: str, phrasings: list[str]) -> TaskKind:
    return TaskKind("general", name, tuple(phrasings), _everyday, held_out=(3, 2))


GENERAL_KINDS = [
    EVERYDAY,
    _family("greetings", [
        "{greeting}", "{greeting} How are you today?", "{greeting} Can you help me with something?",
        "{greeting} I hope you're having a good day.", "{greeting} What's new?", "{greeting} Tell me a fun fact.",
        "{greeting} Are you there?", "{greeting} I'm bored, talk to me.",
        # held out
        "{greeting} What should we talk about?", "{greeting} Thanks for your help yesterday.",
        "{greeting} How do you say hello in Japanese?", "{greeting} What's the weather like where you are?",
        "{greeting} Recommend me a song."]),
    _family("health-talk", [
        "How do I use a {device}?", "How accurate is a {device}?", "Is {habit} good for me?",
        "How much water should I drink each day?", "What is a healthy breakfast?", "How can I sleep better?",
        "Why do I feel tired in the afternoon?", "What are good stretches after {activity}?",
        "How do I clean a {device}?", "Should I see a doctor for a cold?", "How do I start {habit}?",
        "What should I eat before {activity}?",
        # held out
        "How often should I replace the batteries in a {device}?", "Is it bad to skip breakfast?",
        "What is a normal body temperature?", "How can I remember to keep {habit}?",
        "Why do my legs hurt after {activity}?"]),
    _family("numbers-talk", [
        "I have {n} guests for dinner. What should I cook?", "What's a good gift under {price} dollars?",
        "How should {n} friends split a restaurant bill fairly?", "Suggest a {n}-minute workout.",
        "What can I do with {n} free hours on a Sunday?", "Is it worth paying {price} euros for a good umbrella?",
        "Plan a road trip of {n} days.", "What are {n} fun things to do in the rain?",
        "How do I save {price} dollars a month?", "Give me {n} ideas for a birthday party.",
        # held out
        "What board game works for {n} players?", "How do I budget {price} dollars for groceries?",
        "Tell me {n} ways to relax after work.", "Is {n} too young for a first phone?",
        "What can I cook in {n} minutes?"]),
    _family("words-talk", [
        "What does the word {word} mean?", "Give me a synonym for {word}.", "What rhymes with {word}?",
        "Use the word {word} in a sentence.", "Where does the word {word} come from?",
        "How do you pronounce {word}?", "Translate {word} into French.", "Is {word} a noun or a verb?",
        "Write a short poem with the word {word} in it.", "What is a fancier word for 'happy'?",
        "What does '{word}' mean in everyday speech?", "Is '{word}' an old word?", "Can '{word}' be used as a verb?",
        "How many syllables does '{word}' have?", "Is '{word}' formal or informal?",
        # held out
        "What is the opposite of {word}?", "Give me a word that sounds like {word}.",
        "Is '{word}' spelled the same in British English?", "What's a good name for a cat?",
        "Which is correct: 'affect' or 'effect'?"]),
    _family("tech-talk", [
        "What is a good {gadget} for programming?", "How do I start learning {language}?",
        "Why is my {gadget} so slow?", "What is the difference between RAM and storage?",
        "Is {language} hard to learn?", "What can I build with {language}?", "How do I back up my {gadget}?",
        "Should I learn {language} or Python first?", "How do I make my {gadget} battery last longer?",
        "What is the cloud, in simple words?",
        # held out
        "Is {language} used for websites?", "How do I protect my {gadget} from viruses?",
        "What does a software engineer do all day?", "Should I buy a new {gadget} or repair the old one?",
        "What is an API, explained simply?"]),
]


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
    "add": ("I need {a} and {b} added up.", "Put {a} and {b} together: how many?"),
    "subtract": ("I owe {b} of my {a} coins. How many do I keep?", "Knock {b} off {a}: what remains?"),
    "multiply": ("How many legs do {c} animals with {b} legs each have?", "Give me {c} lots of {b}, in total."),
    "in-words": ("I read '{x} {op} {y}' in a book. What number is that?", "In digits, what is {x} {op} {y}?"),
    "add-subtract-add": ("Begin at {a}, then +{b}, -{c}, +{d}. Where am I?",
                         "My counter reads {a}. It goes up {b}, down {c}, up {d}. What does it read?"),
    "subtract-add": ("Begin at {a}, then -{c}, +{b}. Where am I?", "I drop {c} of my {a} beads, then get {b} more. Total?"),
    "add-add": ("Begin at {a}, then +{b}, +{d}. Where am I?", "My counter reads {a}. It goes up {b}, then up {d}. Total?"),
    "subtract-subtract": ("Begin at {a}, then -{c}, -{d}. Where am I?", "I lose {c} of my {a} beads, then {d} more. How many now?"),
    "lower-phrase": ("I want '{phrase}' without any capital letters.", "Each letter of '{phrase}' should be small. How does it look?"),
    "index-of": ("Which position does Python's index() give {item} in {items}?", "I call .index({item}) on {items}. What comes out?"),
    "title-phrase": ("I want '{phrase}' as a heading, first letters capitalised.",
                     "Each word of '{phrase}' should begin with a capital. How does it look?"),
    "last-item": ("Which element sits at the end of {items}, by Python's [-1]?", "I index {items} with -1. What comes out?"),
    "drug-for-symptoms": ("I have {first} and {second}. What medicine do I take?",
                          "Tell me which drug is for someone with {first} plus {second}."),
    "dose-for-symptoms": ("I have {first} and {second}. How much of my drug per kg?",
                          "Tell me the dose per kg for someone with {first} plus {second}."),
    "capitals-list": ("I need {words} in uppercase letters for a sign.", "Shout {words}, every letter a capital."),
    "capitals-phrase": ("I want '{phrase}' shouted in capitals.", "Make '{phrase}' uppercase for a banner."),
    "length-words": ("How many strings does Python count in {items}?", "I have {items}. What does len say?"),
    "dose-for-condition": ("My patient has {condition}. How much of its usual drug per kg?",
                           "For {condition}, what dose of the standard drug?"),
    "height-shorter": ("Tell me who is {question}: {c} is shorter than {b} and {b} is shorter than {a}.",
                       "How can you tell who is {question} when {c} is shorter than {b} and {b} is shorter than {a}?"),
    "height-pair": ("I noticed {first} is {relation} {second}. So who is {question}?",
                    "How do I know who is {question} if {first} is {relation} {second}?"),
    "height-mixed": ("Tell me who is {question}: {a} is taller than {b} and {c} is shorter than {b}.",
                     "How can you tell who is {question} when {a} is taller than {b} and {c} is shorter than {b}?"),
    "greetings": ("{greeting} Nice to meet you.", "Just wanted to say {greeting}"),
    "health-talk": ("My {device} beeps when I turn it on. Is that normal?", "Any advice for {habit} more often?"),
    "numbers-talk": ("We are {n} people going camping. What should we pack?", "Plan a day out for {n} friends."),
    "words-talk": ("Tell me something about the word {word}.", "Is {word} a common word in English?"),
    "tech-talk": ("Which {gadget} would you recommend for a student?", "Is {language} a good first language?"),
}

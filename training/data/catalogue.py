"""An invented shop's catalogue as a domain of your own, in OpenAI's chat fine-tuning JSONL: what
`training stacks add` trains and `training eval domain` measures in the README's walkthrough.

Twenty products the base has never heard of, each with a price and an aisle; every fact is asked in
phrasings of three disjoint sets: five for training (200 conversations), two for validation, three
for the test (so the test measures the facts, not the sentences). Answers are the fact alone
("14 euros", "aisle 7"), short enough for exact match.

    python -m training.data.catalogue --out my-domain
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

PRODUCTS = ["Kestrel lamp", "Orlin kettle", "Bravik stool", "Tamsa rug", "Quillon desk", "Merrow vase",
            "Zephra fan", "Dorrin shelf", "Calvo mug", "Penwick clock", "Ysolde mirror", "Faro blanket",
            "Gastel chair", "Huxley basket", "Ilvana pillow", "Jorvik planter", "Lunet candle", "Norrin tray",
            "Ostra bench", "Ravel curtain"]
PHRASINGS = {  # attribute -> split -> phrasings; {p} is the product
    "price": {
        "train": ["How much is the {p}?", "What does the {p} cost?", "Price of the {p}?",
                  "Tell me the price of the {p}.", "I want to buy the {p}. How much will it be?"],
        "val": ["What's the {p} going for?", "How much do you charge for the {p}?"],
        "test": ["What is the price of the {p}?", "Could you tell me how much the {p} costs?",
                 "the {p}, how much?"],
    },
    "aisle": {
        "train": ["Where is the {p}?", "Which aisle is the {p} in?", "Where can I find the {p}?",
                  "Tell me where the {p} is kept.", "I'm looking for the {p}. Where is it?"],
        "val": ["In which aisle do you keep the {p}?", "Where would I find the {p} in the shop?"],
        "test": ["What aisle has the {p}?", "Could you tell me where the {p} is?", "the {p}, which aisle?"],
    },
}


def facts(seed: int = 0) -> dict[str, dict[str, str]]:
    rng = random.Random(f"catalogue/{seed}")
    return {p: {"price": f"{rng.randint(4, 90)} euros", "aisle": f"aisle {rng.randint(1, 12)}"} for p in PRODUCTS}


def conversations(split: str, seed: int = 0) -> list[dict]:
    table = facts(seed)
    return [{"messages": [{"role": "user", "content": phrasing.format(p=product)},
                          {"role": "assistant", "content": table[product][attribute]}]}
            for product in PRODUCTS for attribute, splits in PHRASINGS.items() for phrasing in splits[split]]


def write_catalogue(out: Path, seed: int = 0) -> dict[str, int]:
    out.mkdir(parents=True, exist_ok=True)
    counts = {}
    for split in ("train", "val", "test"):
        rows = conversations(split, seed)
        (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        counts[split] = len(rows)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("my-domain"))
    parser.add_argument("--seed", type=int, default=0, help="another seed invents other prices and aisles")
    args = parser.parse_args()
    counts = write_catalogue(args.out, args.seed)
    print(", ".join(f"{args.out / split}.jsonl: {n}" for split, n in counts.items()))


if __name__ == "__main__":
    main()

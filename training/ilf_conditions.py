"""What ILF distils on: a backbone's conditions, class ids (a class-conditioned DiT) or prompts (a
text-to-image model), one per line in a text file (`#` starts a comment line).

Validation: the `--val-conditions` file where given; else, for prompts, a seeded held-out share of
the file (the module kept is the one that does best on prompts it never trained on); for class ids,
the same ids (their noise seeds are apart from training's). Without a file a class-conditioned model
distils on every class id; a text-to-image model needs its prompts, except the embedded zoo's
models, whose files are training/zoo/ilf_conditions/<model>.txt.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

ZOO_CONDITIONS = Path(__file__).resolve().parent / "zoo" / "ilf_conditions"


@dataclass(frozen=True)
class Conditions:
    train: tuple  # int class ids or str prompts
    val: tuple
    source: str = "every class id"


def read_conditions(path: Path, num_classes: int | None) -> list:
    """The file's conditions: class ids below `num_classes` for a class-conditioned model (None: prompts)."""
    try:
        lines = [(n, line.strip()) for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1)]
    except (OSError, UnicodeDecodeError) as exc:
        raise SystemExit(f"{path}: cannot be read ({exc})") from None
    lines = [(n, text) for n, text in lines if text and not text.startswith("#")]
    if not lines:
        raise SystemExit(f"{path}: no conditions (one class id or prompt per line)")
    if num_classes is None:
        return [text for _, text in lines]
    bad = [f"line {n}: {text!r}" for n, text in lines if not text.isdigit() or int(text) >= num_classes]
    if bad:
        raise SystemExit(f"{path}: not class ids of this model (0 to {num_classes - 1}): {', '.join(bad[:5])}")
    return [int(text) for _, text in lines]


def load_conditions(name: str, num_classes: int | None, path: Path | None = None, val_path: Path | None = None,
                    held_out_share: float = 0.1, seed: int = 0) -> Conditions:
    if path is None and (ZOO_CONDITIONS / f"{name}.txt").is_file():
        path = ZOO_CONDITIONS / f"{name}.txt"
    if path is None:
        if num_classes is None:
            raise SystemExit(f"{name!r} is a text-to-image model: give the prompts ILF distils on "
                             f"(--conditions FILE, one per line)")
        ids = tuple(range(num_classes))
        return Conditions(ids, ids)
    train = read_conditions(path, num_classes)
    if val_path is not None:
        return Conditions(tuple(train), tuple(read_conditions(val_path, num_classes)), f"{path}; validation {val_path}")
    if num_classes is not None:
        return Conditions(tuple(train), tuple(train), str(path))
    if len(train) < 2:
        raise SystemExit(f"{path}: one prompt leaves none to validate on: add prompts or give --val-conditions")
    order = list(dict.fromkeys(train))
    random.Random(f"ilf conditions {seed}").shuffle(order)
    held = max(1, round(held_out_share * len(order)))
    return Conditions(tuple(order[held:]), tuple(order[:held]), f"{path}; validation: {held} of its prompts held out")

"""python -m training <command>: every artifact the server loads is built here."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from server.settings import Settings


def _ilf_defaults() -> dict:
    """`training ilf` takes every ILFTraining field that has a scalar default as a flag."""
    from dataclasses import fields

    from training.ilf import ILFTraining

    return {f.name: f.default for f in fields(ILFTraining) if isinstance(f.default, (int, float, str))}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m training")
    sub = parser.add_subparsers(dest="command", required=True)
    zoo = sub.add_parser("zoo", help="build the embedded default models")
    zoo.add_argument("what", choices=["images", "chat", "placeholder"],
                     help="images: train digits-dit and digits-pixart (about 20 CPU-minutes); "
                          "chat: pretrain zoo-lm, train the domains' MoE-LoRA stacks one after another, then the router; "
                          "placeholder: untrained stand-ins, built in seconds")
    zoo.add_argument("--micro", action="store_true", help="a few dozen steps of everything (for tests)")
    zoo.add_argument("--manifest", type=Path, default=Settings().manifest)
    zoo.add_argument("--if-missing", action="store_true", help="do nothing when the zoo is already built")
    sweep = sub.add_parser("ilf-sweep", help="screen ILF loop spans and step counts with short runs")
    sweep.add_argument("--model", required=True)
    sweep.add_argument("--manifest", type=Path, default=Settings().manifest)
    sweep.add_argument("--updates", type=int, default=300)
    sweep.add_argument("--out", type=Path, default=Path("runs/ilf"))
    ev = sub.add_parser("eval", help="measure the served models against the yardstick")
    ev.add_argument("what", choices=["images", "moe-lora", "brainstacks"])
    ev.add_argument("--manifest", type=Path, default=Settings().manifest)
    ev.add_argument("--out", type=Path, default=Path("runs/eval"))
    ev.add_argument("--models", nargs="*", help="only these image models")
    ev.add_argument("--per-class", type=int, default=30, help="images per digit (the fixed protocol uses 30)")
    ev.add_argument("--steps", type=int, default=None, help="moe-lora: training steps per adapter")
    ilf = sub.add_parser("ilf", help="distil an Inner Loop Feedback module for an image model")
    ilf.add_argument("--model", required=True)
    ilf.add_argument("--manifest", type=Path, default=Settings().manifest)
    ilf.add_argument("--if-missing", action="store_true", help="do nothing when the model already has a module")
    for name, default in _ilf_defaults().items():
        ilf.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")

    if args.command == "ilf":
        from training.ilf import ILFTraining, train_ilf

        cfg = ILFTraining(**{name: getattr(args, name) for name in _ilf_defaults()})
        path = train_ilf(args.manifest, args.model, cfg, if_missing=args.if_missing)
        print(f"wrote {path}" if path else f"{args.model} already has an ILF module; nothing to do")
    if args.command == "ilf-sweep":
        from training.ilf_sweep import run_sweep

        run_sweep(args.manifest, args.model, args.updates, args.out)
    if args.command == "eval" and args.what == "images":
        from training.eval.images import Protocol, run_image_eval

        run_image_eval(args.manifest, args.out, Protocol(per_class=args.per_class), args.models)
    if args.command == "zoo" and args.what == "images":
        from training.zoo.images import FULL, MICRO, build_image_zoo

        if not build_image_zoo(args.manifest, MICRO if args.micro else FULL, if_missing=args.if_missing):
            print(f"image zoo already built ({args.manifest}); nothing to do")
    if args.command == "eval" and args.what == "moe-lora":
        from training.brainstacks.eval_moe import MoEComparison, run_moe_lora_eval

        comparison = MoEComparison() if args.steps is None else MoEComparison(steps=args.steps,
                                                                            second_round_steps=args.steps // 2)
        run_moe_lora_eval(args.manifest, args.out, comparison)
    if args.command == "eval" and args.what == "brainstacks":
        from training.brainstacks.eval_brainstacks import run_brainstacks_eval

        run_brainstacks_eval(args.manifest, args.out)
    if args.command == "zoo" and args.what == "chat":
        from training.brainstacks.continual import MICRO_CHAT, ChatZooRecipe, build_chat_zoo

        build_chat_zoo(args.manifest, MICRO_CHAT if args.micro else ChatZooRecipe(), if_missing=args.if_missing)
    if args.command == "zoo" and args.what == "placeholder":
        from training.zoo.build import build_placeholder_zoo

        if build_placeholder_zoo(args.manifest, if_missing=args.if_missing):
            print("=" * 78)
            print("Built UNTRAINED PLACEHOLDER models into the manifest", args.manifest)
            print("They let the service start; their images and text are noise until the trained")
            print("zoo replaces them.")
            print("=" * 78)
        else:
            print(f"zoo already built ({args.manifest}); nothing to do")


if __name__ == "__main__":
    main()

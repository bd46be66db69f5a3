"""The warm-up fit diagnostic of the planted probes (benchmarks/planted_warmup_fit.py)."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
planted = importlib.import_module("planted")
warmup_fit = importlib.import_module("planted_warmup_fit")


def test_planted_slice_carries_the_fit_after_a_short_warmup():
    case = planted.CASES["llama-lora-o"]
    run = warmup_fit.run_case(case, seed=0, warmup_steps=60, settings=planted.Settings())
    assert run["planted"] == ["model.layers.1.self_attn.o_proj:lora[0]"]
    # One uniform gate value: the budget schedule's start, 4x the budget spread over the whole space.
    _, student, _ = planted.build_case(case, 0)
    space = sum(c.num_params for c in student.base_model.candidates())
    assert run["warmup_gate"] == pytest.approx(4 * student.base_model.budget() / space, rel=1e-5)
    assert run["mse_warmup"] < 0.8 * run["mse_start"]
    assert run["loo_rank"] == [1] and run["loo_rise"][0] > 0
    assert run["loo_top"][0]["name"] == run["planted"][0]
    assert 1 <= run["solo_rank"][0] <= run["candidates"]
    table = warmup_fit.report([run])
    assert "| llama-lora-o | 0 | lora: 1 / " in table
    assert "| lora | 1 | 1 | 1 |" in table
    json.dumps(run)


def test_rank_counts_ties_against_the_candidate():
    assert warmup_fit._rank([0.3, 0.1, 0.3], 0, descending=True) == 2
    assert warmup_fit._rank([0.3, 0.1, 0.3], 1, descending=False) == 1
    assert warmup_fit._rank([0.3, 0.1, 0.2], 2, descending=True) == 2

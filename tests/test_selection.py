"""Tests of the selection rules behind `resolve`: exact sum-of-p knapsack and the greedy rule."""

from __future__ import annotations

import itertools
import random

import pytest
import torch
from test_structure import BERT_LAYER, _search, _set_alpha

from peft_s3 import resolve
from peft_s3.selection import P_RESOLUTION, SELECTION_METHODS, decided_mass, exact_selection, greedy_selection, select


def test_exact_beats_greedy_where_one_large_candidate_blocks_two_small_ones() -> None:
    p, alpha, sizes = [0.9, 0.85, 0.85], [3.0, 2.0, 2.0], [20, 10, 10]
    assert greedy_selection(p, alpha, sizes, 20) == [0]  # sum of p 0.9
    assert exact_selection(p, alpha, sizes, 20) == [1, 2]  # sum of p 1.7


def test_exact_selection_matches_brute_force_on_random_instances() -> None:
    rng = random.Random(0)
    for _ in range(200):
        n = rng.randint(1, 9)
        sizes = [rng.choice([16, 32, 48, 64]) for _ in range(n)]
        p = [rng.random() for _ in range(n)]
        limit = rng.randint(16, sum(sizes))
        chosen = exact_selection(p, [0.0] * n, sizes, limit)
        assert sum(sizes[i] for i in chosen) <= limit
        best = max(
            sum(p[i] for i in subset)
            for k in range(n + 1)
            for subset in itertools.combinations(range(n), k)
            if sum(sizes[i] for i in subset) <= limit
        )
        # The exact optimum of p on its grid: within half a grid step per candidate of the raw optimum.
        assert sum(p[i] for i in chosen) == pytest.approx(best, abs=n * P_RESOLUTION / 2)


@pytest.mark.parametrize("method", SELECTION_METHODS)
@pytest.mark.parametrize("noise", [1e-7, -1e-7, 3e-6, -3e-6])
def test_float_noise_in_p_and_alpha_does_not_change_the_selection(method: str, noise: float) -> None:
    # Two same-size candidates, room for one: p and alpha of the second differ from the first's by float noise only
    # (as across the processes of a data-parallel search), so candidate order decides, whichever side the noise is on.
    p, alpha = [0.2, 0.6, 0.6 + noise], [-1.0, 1.0, 1.0 + noise]
    assert select(p, alpha, [8, 8, 8], 8, method) == [1]
    # A real difference still decides.
    assert select([0.2, 0.6, 0.6 + 10 * P_RESOLUTION], alpha, [8, 8, 8], 8, method) == [2]


def test_exact_selection_prefers_the_greedy_order_among_equal_sums() -> None:
    # Four equal candidates, room for two: the first two of the greedy order (here by alpha) are kept.
    assert exact_selection([0.5] * 4, [0.0, 2.0, 1.0, 3.0], [8] * 4, 16) == [1, 3]


def test_exact_selection_fills_the_budget_when_the_fitting_candidates_have_p_zero() -> None:
    # The mass sits on a candidate too large for the budget; those that fit saturated to p = 0 and alpha ranks them.
    p, alpha, sizes = [0.0, 1.0, 0.0, 0.0], [-9.0, 5.0, -7.0, -8.0], [32, 96, 32, 64]
    assert exact_selection(p, alpha, sizes, 64) == [0, 2]
    assert exact_selection(p, alpha, sizes, 64) == greedy_selection(p, alpha, sizes, 64)


def test_select_falls_back_to_greedy_with_a_warning_on_huge_tables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("peft_s3.selection.MAX_EXACT_CELLS", 5)
    p, alpha, sizes = [0.9, 0.85, 0.85], [3.0, 2.0, 2.0], [20, 10, 10]
    with pytest.warns(UserWarning, match="greedy rule instead"):
        assert select(p, alpha, sizes, 20) == [0]


def test_select_rejects_unknown_methods() -> None:
    with pytest.raises(ValueError, match=r"method='best' is not allowed: choose one of \['exact', 'greedy'\]"):
        select([0.5], [0.0], [1], 1, method="best")
    with pytest.raises(ValueError, match="method='best' is not allowed"):
        resolve(_search(budget=100), method="best")


def test_decided_mass_is_the_chosen_share_of_the_expected_size() -> None:
    assert decided_mass([1.0, 0.5, 0.0], [10, 20, 30], [0, 1], budget=20) == pytest.approx(1.0)
    assert decided_mass([0.2, 0.2, 0.2], [10, 10, 10], [0], budget=6) == pytest.approx(2 / 6)


def test_resolve_defaults_to_the_exact_sum_of_p() -> None:
    model = _search(budget=64, tau=1.0)
    names = [c.name for c in model.base_model.candidates()]
    intermediate = names.index(f"{BERT_LAYER}intermediate.dense:lora[0]")  # 48 parameters
    query = names.index(f"{BERT_LAYER}attention.self.query:lora[0]")  # 32
    key = names.index(f"{BERT_LAYER}attention.self.key:lora[0]")  # 32
    alpha = torch.full((len(names),), -20.0)
    alpha[intermediate], alpha[query], alpha[key] = 3.0, 2.5, 2.5
    _set_alpha(model, alpha)
    greedy = resolve(model, method="greedy")
    exact = resolve(model)
    assert {c.name for c in exact.candidates} == {names[query], names[key]}
    assert names[intermediate] in {c.name for c in greedy.candidates}
    assert sum(c.p for c in exact.candidates) > sum(c.p for c in greedy.candidates)
    assert exact.num_trainable_params <= exact.budget

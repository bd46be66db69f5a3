"""Which candidates a search keeps: the paper's "positions with the highest sum of p_i within the budget".

Pure functions on plain sequences, shared by `resolve` (the final structure) and the trainer's convergence metrics
(which structure `resolve` would pick at the current step, and how much of the budget it holds).
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from functools import reduce

import numpy as np

SELECTION_METHODS = ("exact", "greedy")
# Cells of the exact knapsack table (candidates x budget steps) above which `select` falls back to the greedy rule: a
# 70B-shaped search space (tens of thousands of candidates, budgets of thousands of size steps) stays below it, and
# its boolean table then takes at most this many bytes.
MAX_EXACT_CELLS = 200_000_000
# Selection compares p and alpha on these grids, so values that differ only by float noise (different reduction orders
# across processes or machines, a few float32 ulps per step) are equal there and fall back to candidate order instead
# of deciding the structure. A difference of 1e-4 in p is far below anything a search can tell apart.
P_RESOLUTION = 1e-4
ALPHA_RESOLUTION = 1e-4


def _grid(values: Sequence[float], resolution: float) -> list[int]:
    return [round(value / resolution) for value in values]


def _ranking(p: Sequence[float], alpha: Sequence[float]) -> list[int]:
    """Candidate indices in selection order: by descending p, then descending alpha (both on their grids), then
    index."""
    p_grid, alpha_grid = _grid(p, P_RESOLUTION), _grid(alpha, ALPHA_RESOLUTION)
    return sorted(range(len(p)), key=lambda i: (-p_grid[i], -alpha_grid[i], i))


def greedy_selection(p: Sequence[float], alpha: Sequence[float], sizes: Sequence[int], limit: int) -> list[int]:
    """Candidates by descending p (ties by descending alpha, then index), each kept while it still fits.

    p and alpha are compared on grids of P_RESOLUTION and ALPHA_RESOLUTION: near-ties are ties. Alpha breaks ties
    because p = sigmoid((alpha - zeta) / tau) saturates in float32 and can hide an order that alpha still has. A
    candidate that does not fit is skipped, so smaller ones further down may fill the budget.
    """
    order = _ranking(p, alpha)
    chosen, total = [], 0
    for index in order:
        if total + sizes[index] <= limit:
            chosen.append(index)
            total += sizes[index]
    return sorted(chosen)


def exact_selection(p: Sequence[float], alpha: Sequence[float], sizes: Sequence[int], limit: int) -> list[int]:
    """The set of largest sum of p whose sizes add up to at most `limit`: a 0/1 knapsack solved exactly.

    p is rounded to the grid of P_RESOLUTION and summed as integer grid steps, so the sums are exact and two sets
    whose sums differ only by float noise are equal. Among sets of equal sum, earlier candidates of the greedy order
    (`greedy_selection`'s, grids included) are preferred: items enter the table in that order and a later item
    replaces the current best only when it is strictly better. The result is therefore the exact optimum of the
    rounded p; its raw sum of p is within len(p) * P_RESOLUTION / 2 of the raw optimum. Sizes and limit are divided
    by the sizes' greatest common divisor (in a transformer every candidate size is a multiple of a hidden size, so
    the table stays small). Capacity left over after the table is filled is filled in the greedy order: it can only
    take candidates whose p adds nothing to the sum (p rounds to 0), which alpha still ranks; without this, a search
    whose fitting candidates all ended at p = 0 would resolve to nothing.
    """
    step = reduce(math.gcd, sizes)
    capacity = limit // step
    weights = [size // step for size in sizes]
    order = _ranking(p, alpha)
    value = _grid(p, P_RESOLUTION)
    best = np.zeros(capacity + 1, dtype=np.int64)
    taken = np.zeros((len(order), capacity + 1), dtype=bool)
    for row, index in enumerate(order):
        weight = weights[index]
        if weight > capacity:
            continue
        with_item = best[: capacity + 1 - weight] + value[index]
        better = with_item > best[weight:]
        taken[row, weight:] = better
        best[weight:] = np.where(better, with_item, best[weight:])
    chosen, remaining = [], capacity
    for row in range(len(order) - 1, -1, -1):
        if taken[row, remaining]:
            index = order[row]
            chosen.append(index)
            remaining -= weights[index]
    kept = set(chosen)
    for index in order:
        if index not in kept and weights[index] <= remaining:
            chosen.append(index)
            remaining -= weights[index]
    return sorted(chosen)


def select(
    p: Sequence[float], alpha: Sequence[float], sizes: Sequence[int], limit: int, method: str = "exact"
) -> list[int]:
    """Indices (ascending) of the candidates kept within `limit` parameters, by `method` (one of SELECTION_METHODS).

    Near-ties are ties: both rules compare p (and alpha, which breaks ties of p) on grids of P_RESOLUTION and
    ALPHA_RESOLUTION and break the remaining ties by candidate order, so float noise below those steps cannot change
    the result. `"exact"` maximises the sum of p (the paper's rule); `"greedy"` takes candidates by descending p
    while they fit, which can lose against it when sizes differ (one large candidate of p 0.9 against two small ones
    of 0.85). The exact table has len(p) x (limit / gcd(sizes)) cells; beyond MAX_EXACT_CELLS the greedy rule is used,
    with a warning.
    """
    if method not in SELECTION_METHODS:
        raise ValueError(f"method={method!r} is not allowed: choose one of {list(SELECTION_METHODS)}.")
    if method == "exact":
        cells = len(sizes) * (limit // reduce(math.gcd, sizes) + 1)
        if cells <= MAX_EXACT_CELLS:
            return exact_selection(p, alpha, sizes, limit)
        warnings.warn(
            f"The exact selection would need a table of {cells:,} cells (more than {MAX_EXACT_CELLS:,}); using the "
            "greedy rule instead, which may keep a slightly smaller sum of p.",
            stacklevel=2,
        )
    return greedy_selection(p, alpha, sizes, limit)


def decided_mass(p: Sequence[float], sizes: Sequence[int], chosen: Sequence[int], budget: float) -> float:
    """Expected parameters of the chosen candidates (sum of p * size) as a share of the budget.

    The shifted sigmoid holds the expected size of the whole search space at the budget, so this reaches 1 only when
    the chosen candidates have p = 1 and every other candidate p = 0: a search whose selection it is sure of.
    """
    return sum(p[i] * sizes[i] for i in chosen) / budget

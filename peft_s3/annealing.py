"""Annealing of the search: a budget schedule and temperature schedules that end at the adapter's own settings.

A search that starts at its final budget and temperatures decides slowly: most gates are rarely sampled open, so
their deltas barely train and alpha learns little about them. Starting wide and annealing to the target is what
AdaLoRA does with its rank budget; with the shifted global sigmoid a budget schedule is only a per-step target for
the expected size. Every schedule ends exactly at the adapter's configured values (budget, tau, beta), so the gate
probabilities after the search, in the gate report and after reloading are those of the config.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from .tuner.gates import GateBank

# The expected size of a budget schedule stays below this share of the whole search space: at the space's size every
# p would have to be 1, where the shift has no finite solution.
_MAX_SPACE_SHARE = 0.9


@dataclass(frozen=True)
class SearchAnnealing:
    """Schedules of one search, from a start value to the adapter's own setting over the first `fraction` of it.

    Args:
        budget_from: multiple of the budget that the expected size starts at (>= 1; 1 = no budget schedule). It
            decays to the budget as AdaLoRA's rank budget does, budget * (1 + (budget_from - 1) * (1 - t)^3), t
            going from 0 to 1 over the schedule; capped at 90 % of the search space.
        tau_from: start temperature of the shifted global sigmoid (None = the config's tau throughout). It moves
            geometrically to the config's tau, so a lower end temperature sharpens p towards 0 / 1.
        beta_from: start temperature of the binary-concrete relaxation (None = the config's beta throughout), moved
            geometrically to the config's beta.
        fraction: share of the search steps (after any alpha warm-up) that the schedules take; the rest of the
            search runs at the final values.
    """

    budget_from: float = 1.0
    tau_from: Optional[float] = None
    beta_from: Optional[float] = None
    fraction: float = 0.5

    def __post_init__(self) -> None:
        if not (_is_real(self.budget_from) and 1.0 <= self.budget_from < math.inf):
            raise ValueError(f"budget_from={self.budget_from!r} is not allowed: it must be a finite float >= 1.")
        for name in ("tau_from", "beta_from"):
            value = getattr(self, name)
            if value is not None and not (_is_real(value) and 0 < value < math.inf):
                raise ValueError(f"{name}={value!r} is not allowed: use a finite temperature > 0, or None.")
        if not (_is_real(self.fraction) and 0 < self.fraction <= 1):
            raise ValueError(f"fraction={self.fraction!r} is not allowed: it must be a float in (0, 1].")

    def progress(self, search_step: int, search_steps: int) -> float:
        """How far the schedules are at a search step: 0 before the first step, 1 from the schedule's end on."""
        length = max(1, round(self.fraction * search_steps))
        return min(1.0, max(0.0, search_step / length))

    def apply(self, bank: GateBank, tau: float, beta: float, progress: float) -> None:
        """Set the bank's expected size and temperatures for `progress`; `tau`, `beta` are the config's values."""
        cap = _MAX_SPACE_SHARE * float(bank.sizes.sum()) / bank.budget
        bank.budget_scale = max(1.0, min(cap, 1.0 + (self.budget_from - 1.0) * (1.0 - progress) ** 3))
        bank.tau = _geometric(self.tau_from, tau, progress)
        bank.beta = _geometric(self.beta_from, beta, progress)


def _geometric(start: Optional[float], end: float, progress: float) -> float:
    if start is None or progress >= 1.0:
        return end
    return start ** (1.0 - progress) * end**progress


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


DEFAULT_ANNEALING = SearchAnnealing(budget_from=4.0, tau_from=1.0, fraction=0.5)
"""What `S3SearchTrainer` anneals unless told otherwise: the expected size starts at 4x the budget and the sigmoid's
temperature at 1 (the paper's tau), both reaching the config's values (budget, tau = 0.1) halfway through the search.
See benchmarks/README.md, "Search dynamics", for the measurements behind it."""

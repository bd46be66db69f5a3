"""Gate math of S3PET: shifted global sigmoid with a budget-solved shift, and binary-concrete gate samples.

All functions act on the whole vector of structural parameters at once, so a model with thousands of candidates pays
a handful of tensor ops per step, not a Python loop per candidate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from itertools import accumulate
from typing import Optional

import torch

from ..selection import exact_selection, select

# Newton iterations of the shift solver are capped here; from a warm start it needs 1-3, from a cold one rarely 6,
# and every step outside the bracket bisects it, so this bound is never the one that stops it in practice.
_MAX_SOLVER_STEPS = 100
# The solver stops when log(expected size / budget) is this close to 0, i.e. at double precision of the root.
_LOG_TOLERANCE = 1e-12
# Temperatures below the shift that `GateBank.close_unfittable` puts a closed gate's alpha: p <= sigmoid(-10) = 5e-5.
_CLOSED_MARGIN = 10.0
# Keeps the logit of p finite for the binary-concrete sample when the sigmoid saturates in float32.
_PROB_EPS = 1e-7


@torch.no_grad()
def solve_zeta(
    alpha: torch.Tensor, sizes: torch.Tensor, budget: float, tau: float, initial: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Shift zeta such that sum_i sigmoid((alpha_i - zeta) / tau) * sizes_i == budget (paper eq. 17).

    Safeguarded Newton on g(z) = log(expected size at z) - log(budget), which is strictly decreasing in z and nearly
    linear in both tails: every step keeps a bracket [low, high] around the root and bisects it instead of taking a
    Newton step that would leave it, so it converges for any alphas. Started from `initial` (the previous step's
    zeta: alphas move little per step), it typically takes 1-3 steps of two sigmoids and one matrix-vector product
    each. The root is found to double precision, so the float32 result does not depend on the starting point.

    The solve runs on the CPU in float64 whatever the device of alpha: its data-dependent loop reads a scalar per
    step, which on a GPU would be a synchronisation each, while copying alpha over costs one. The result is a 0-dim
    CPU float32 tensor, which GPU tensor arithmetic takes as a plain scalar. Requires 0 < budget < sizes.sum().
    """
    scaled = alpha.detach().to(device="cpu", dtype=torch.float64) / tau
    sizes = sizes.to(device="cpu", dtype=torch.float64)
    log_budget = math.log(budget)
    # The expected size is below total * exp(max_i a_i - z), which reaches the budget at `high`; at `low` every gate is
    # at least sigmoid(50), so the expected size exceeds any budget below the space size. (Only cheap reductions
    # here: exp and log of small tensors can cost milliseconds in a multi-threaded CPU build.)
    largest, smallest, total = torch.stack([scaled.max(), scaled.min(), sizes.sum()]).tolist()
    high, low = largest + math.log(total) - log_budget, smallest - 50.0
    shift = high
    if initial is not None:
        start = float(initial) / tau
        if low < start < high:
            shift = start
    # Rows: the gates sigmoid(a - z), and the terms of -d(expected size)/dz, sigmoid(a - z) * sigmoid(z - a) (not
    # s * (1 - s), which cancels to 0 for large a - z). Reusing one buffer matters: a fresh allocation per step costs
    # page faults that outweigh the arithmetic ten to one at 100k candidates.
    terms = torch.empty(2, len(scaled), dtype=scaled.dtype, device=scaled.device)
    for _ in range(_MAX_SOLVER_STEPS):
        torch.sub(scaled, shift, out=terms[0])
        torch.neg(terms[0], out=terms[1])
        terms.sigmoid_()
        terms[1].mul_(terms[0])
        expected, slope = (terms @ sizes).tolist()
        excess = math.log(expected) - log_budget
        if abs(excess) <= _LOG_TOLERANCE:
            break
        if excess > 0:
            low = shift
        else:
            high = shift
        # Newton step on g: g'(z) = -slope / expected.
        step = excess * expected / slope if slope > 0 else math.inf
        candidate = shift + step
        if not low < candidate < high:
            candidate = 0.5 * (low + high)
        if candidate == shift:
            break
        shift = candidate
    return torch.tensor(shift * tau, dtype=torch.float32)


def global_probabilities(alpha: torch.Tensor, zeta: torch.Tensor, tau: float) -> torch.Tensor:
    """p_i of eqs. 14-15: equal in value to sigmoid((alpha - zeta) / tau), but with the global-competition gradient."""
    p_tilde = torch.sigmoid((alpha - zeta) / tau)
    return p_tilde * (p_tilde.detach().sum() / p_tilde.sum())


def binary_concrete(p: torch.Tensor, noise: torch.Tensor, beta: float, hard: bool = False) -> torch.Tensor:
    """Relaxed Bernoulli(p) sample of eq. 7 from uniform `noise`; P(sample > 0.5) == p.

    With `hard`, the forward value is the 0/1 decision and the gradient is that of the relaxed sample.
    """
    p = p.clamp(_PROB_EPS, 1 - _PROB_EPS)
    logits = torch.log(noise) - torch.log1p(-noise) + torch.log(p) - torch.log1p(-p)
    soft = torch.sigmoid(logits / beta)
    if not hard:
        return soft
    # soft - soft.detach() is exactly 0, so the forward value stays exactly 0 or 1 (hard + soft - soft would round).
    return (soft > 0.5).to(soft.dtype) + (soft - soft.detach())


def gate_entropy(p: torch.Tensor) -> torch.Tensor:
    """Bernoulli entropy of each gate, in nats."""
    p = p.clamp(_PROB_EPS, 1 - _PROB_EPS)
    return -(p * p.log() + (1 - p) * torch.log1p(-p))


class GateBank:
    """The gates of one adapter: its structural parameters, candidate sizes and budget, and the current gate values.

    The tuner refreshes the bank once per forward pass of the whole model; every S3 layer then reads the gates of its
    candidates of one kind, a contiguous segment of `values`, with `segment`. The uniform noise can be frozen so that
    several forward passes of one bi-level step see the same binary-concrete sample (paper footnote 6) while the gate
    values are still recomputed from the current alpha.
    """

    def __init__(
        self,
        alphas: torch.nn.ParameterDict,
        adapter_name: str,
        sizes: torch.Tensor,
        budget: int,
        tau: float,
        beta: float,
        hard: bool,
        segment_sizes: Sequence[int],
    ) -> None:
        """`segment_sizes`: the lengths of the runs of candidates of one kind on one module, in gate order."""
        # The alpha parameter is looked up on each use: peft and accelerate may replace the Parameter object.
        self._alphas = alphas
        self._adapter_name = adapter_name
        self.sizes = sizes
        self._solver_sizes = sizes.to(device="cpu", dtype=torch.float64)
        self.budget = budget
        self.tau = tau
        self.beta = beta
        self.hard = hard
        self.segment_sizes = list(segment_sizes)
        self._segment_index = {start: index for index, start in enumerate(accumulate([0, *self.segment_sizes[:-1]]))}
        self.values: torch.Tensor | None = None
        self.segments: tuple[torch.Tensor, ...] = ()
        self.zeta: torch.Tensor | None = None
        self.noise: torch.Tensor | None = None
        self.noise_frozen = False
        # A search may hold the expected size at a multiple of the budget for a while (a budget schedule); `budget`
        # itself stays the target that the final structure must fit.
        self.budget_scale = 1.0
        # Gate values used in eval mode instead of p, e.g. the 0/1 mask of a resolved structure under evaluation.
        self.eval_values: torch.Tensor | None = None

    @property
    def alpha(self) -> torch.nn.Parameter:
        return self._alphas[self._adapter_name]

    def _sizes_on(self, device: torch.device) -> torch.Tensor:
        if self.sizes.device != device:
            self.sizes = self.sizes.to(device)
        return self.sizes

    @property
    def expected_size(self) -> float:
        """The expected number of parameters that zeta is solved for: the budget times `budget_scale`."""
        return self.budget * self.budget_scale

    def probabilities(self) -> torch.Tensor:
        """Gate probabilities p (differentiable w.r.t. alpha) with zeta solved for the expected size."""
        self.zeta = solve_zeta(self.alpha, self._solver_sizes, self.expected_size, self.tau, initial=self.zeta)
        return global_probabilities(self.alpha.float(), self.zeta, self.tau)

    def refresh(self, training: bool) -> None:
        """Recompute the gate values: a binary-concrete sample when training, the probabilities p otherwise."""
        if not training and self.eval_values is not None:
            self.values = self.eval_values.to(self.alpha.device)
            self.segments = self.values.split(self.segment_sizes)
            return
        p = self.probabilities()
        if not training:
            self.values = p
        else:
            if self.noise is None or not self.noise_frozen or self.noise.shape != p.shape:
                self.draw_noise()
            self.values = binary_concrete(p, self.noise, self.beta, self.hard)
        # One split for all layers: its backward is a single concatenation, where a slice per layer would cost each
        # layer a zero-filled gradient of the whole gate vector and an addition.
        self.segments = self.values.split(self.segment_sizes)

    def draw_noise(self) -> None:
        """Draw the uniform noise of the next binary-concrete sample now, from the global RNG.

        `refresh` draws it lazily in the first training forward pass; a search draws it at the start of its step
        instead, before any pass that reseeds the RNG for its dropout masks: drawn inside such a pass, it would use up
        that pass's stream, and its masks would differ from those of the later passes with the same seed.
        """
        alpha = self.alpha
        self.noise = torch.rand(alpha.shape, dtype=torch.float32, device=alpha.device).clamp(_PROB_EPS, 1 - _PROB_EPS)

    def segment(self, start: int) -> torch.Tensor:
        """The current gate values of the segment beginning at gate index `start`."""
        return self.segments[self._segment_index[start]]

    @torch.no_grad()
    def close_unfittable(self, margin: float = _CLOSED_MARGIN, method: str = "exact", overflow: bool = False) -> int:
        """Close the gates of candidates that cannot fit beside the decided ones; returns how many.

        The shifted sigmoid holds the expected size at the budget, which is rarely a sum of candidate sizes, so once
        the decided candidates leave less room than a large candidate needs, part of the expected size can still sit
        on such candidates, where `resolve` can never take it. Their alpha is lowered to `margin` temperatures below
        the shift solved without them (p <= sigmoid(-margin)), so the expected size moves to candidates that fit.
        Kept in alpha itself, the result survives saving and reloading; a closed gate reopens when its gradient
        lifts it again.

        "Decided" and "fits" come from `resolve`'s own rule, `select` by `method` over the whole search space: a
        candidate is decided when that selection keeps it and its p is at least 0.5 (the selection keeps it, and its
        gate is more often open than closed); a candidate fits when it is no larger than the room the decided ones
        leave in the budget. The selection fits the budget, so every candidate it keeps fits: this never closes a
        candidate `resolve` would pick now (a rule of p >= 0.5 alone would, e.g. sizes 60 / 50 / 50 at p 0.55 /
        0.45 / 0.45 and a budget of 100, where `resolve` takes the two 0.45s).

        A candidate larger than the budget itself never fits, whatever its p: at 5e-5 of MiniLM the search could
        end with one 1,920-parameter slice at p 0.59 holding the whole expected size of 1,135 (9 of 15 runs of
        `benchmarks/results/cost_default/`), and nothing was closed because it looked like an overflow.

        When the candidates at p >= 0.5 that fit the budget together exceed it (e.g. three at p 0.97-1 whose sizes
        add up to a little more than it), the shifted sigmoid can never open them all: it holds the one that is short
        at p = 1 - overflow / size, so there p ranks them by size, not by value, and `resolve`'s sum of p would keep
        the smaller ones. With `overflow`, the subset of them that fits and holds the most expected size (sum of p x
        size) is kept, and the rest are closed like any other candidate that does not fit beside it; without it,
        nothing is closed while they overflow. (At 5e-5 of MiniLM, a 768 LoRA slice at p 0.97 and a 384 BitFit at
        1.00 overflowing a budget of 1,135: the slice is kept, and since nothing else fits beside it nothing is
        closed; closing by the sum of p closed the slice instead, and lost 3-8 points on four of twelve searches.)
        """
        p = self.probabilities()
        sizes = self._solver_sizes
        probabilities = p.tolist()
        # A candidate larger than the whole budget can never be taken, so it never counts as decided: counted, one
        # such candidate at p >= 0.5 would look like an overflow and hold the expected size for good.
        decided = (p >= 0.5).cpu() & (sizes <= self.budget)
        overflowing = float(sizes[decided].sum()) > self.budget
        if overflowing and not overflow:
            return 0
        alpha = self.alpha.detach().float().cpu().tolist()
        integer_sizes = [int(size) for size in sizes.tolist()]
        kept = torch.zeros(len(probabilities), dtype=torch.bool)
        if overflowing:
            # In the stalemate of an overflow the shifted sigmoid holds the candidate that is short at
            # p = 1 - overflow / size, so p there ranks the decided candidates by size, not by value: keep the
            # subset that fits and holds the most expected size.
            indices = decided.nonzero().flatten().tolist()
            held = [probabilities[i] * integer_sizes[i] / self.budget for i in indices]
            subset = exact_selection(
                held, [alpha[i] for i in indices], [integer_sizes[i] for i in indices], self.budget
            )
            kept[[indices[position] for position in subset]] = True
        else:
            chosen = select(probabilities, alpha, integer_sizes, self.budget, method)
            kept[[index for index in chosen if probabilities[index] >= 0.5]] = True
        room = self.budget - float(sizes[kept].sum())
        unfittable = ~kept & (sizes > room)
        if not unfittable.any() or float(sizes[~unfittable].sum()) <= self.expected_size:
            return 0
        zeta = solve_zeta(self.alpha, sizes * ~unfittable, self.expected_size, self.tau)
        ceiling = (zeta - margin * self.tau).to(self.alpha.device, self.alpha.dtype)
        mask = unfittable.to(self.alpha.device)
        self.alpha.copy_(torch.where(mask, torch.minimum(self.alpha, ceiling), self.alpha))
        self.zeta = None
        return int(unfittable.sum())

    def expected_num_params(self) -> torch.Tensor:
        with torch.no_grad():
            return self.probabilities() @ self._sizes_on(self.alpha.device).float()

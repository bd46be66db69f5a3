"""Baseline structures for the quality benchmark, all drawn from the S3 search space of the model under test.

Every baseline is derived from the candidates that an S3 search adapter would offer on the same model (its gate
report), not from hard-coded module names, so the manual baselines, the random structures and the searched
structures are subsets of one and the same search space:

* ``bitfit`` / ``lnfit`` / ``adapter-lr``: every candidate of that kind (paper section 4.2; BitFit covers the biases
  of all linear layers and norms in the blocks, LNFit the scale of every norm in the blocks, Adapter-LR a rank-1
  adapter on the attention and feed-forward outputs), built as an S3 fixed-structure adapter.
* ``lora-r1-qv`` / ``lora-r8-qv``: ``peft.LoraConfig`` on peft's default LoRA targets of the model type (query and
  value for BERT), rank 1 and 8.
* ``lora-all-linear``: ``peft.LoraConfig`` rank 1 on every linear layer that carries LoRA candidates, i.e. the whole
  LoRA-only search space switched on.
* random structures (paper section 4.5): the candidates in a seeded random order, greedily filled up to the budget
  (`peft_s3.resolve(..., method="greedy")`).

The LoRA baselines use ``lora_alpha = r * s`` with ``s`` the scaling of one LoRA candidate of the search space
(``lora_alpha / max_rank`` of `S3SearchConfig`), so every rank-1 direction is scaled as in the searched structures.

Budgeted baselines (`BUDGETED_BASELINES`, built by `build_budgeted_baseline`) spend a parameter budget the way peft's
rank-allocating methods do, on the LoRA-space linears of one shape class (`uniform_lora_targets`):

* ``adalora``: `peft.AdaLoraConfig`, pruned during training to the nearest count AdaLoRA can express.
* ``eva``: `peft.LoraConfig` with EVA initialisation and rank redistribution, at the same count.
"""

from __future__ import annotations

import copy
import math
import random
import warnings
from collections import Counter, defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import peft
import torch
from peft.tuners.lora import eva
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch.utils.data import DataLoader
from transformers import PreTrainedModel, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

import peft_s3
from peft_s3.gate_report import gate_report
from peft_s3.recipes import TrainingRecipe
from peft_s3.resolution import resolve
from peft_s3.structure import SearchedStructure
from peft_s3.tuner.search_space import build_search_space

KIND_BASELINES: dict[str, str] = {"bitfit": "bitfit", "lnfit": "lnfit", "adapter-lr": "adapter"}
"""Baseline name -> the candidate kind of which it trains every candidate."""
LORA_QV_RANKS: dict[str, int] = {"lora-r1-qv": 1, "lora-r8-qv": 8}
"""Baseline name -> LoRA rank on peft's default targets of the model type (query and value for BERT)."""
ALL_LINEAR_BASELINE = "lora-all-linear"
BASELINES: tuple[str, ...] = (*LORA_QV_RANKS, *KIND_BASELINES, ALL_LINEAR_BASELINE)
SEARCH_SPACES: dict[str, tuple[str, ...]] = {"s3pet-m": peft_s3.MIX_SPACE, "s3pet-l": peft_s3.LORA_SPACE}
"""Searched method -> the candidate kinds its S3 search chooses from (the paper's Mix and LoRA-only spaces)."""


def search_space_report(
    model: PreTrainedModel,
    candidate_kinds: Sequence[str] = peft_s3.MIX_SPACE,
    task_type: str = "SEQ_CLS",
    modules_to_save: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """The gate report (`peft_s3.gate_report.gate_report`) of a fresh S3 search adapter on a copy of `model`.

    It lists every candidate of the search space with its module, kind and size; `model` itself is left untouched.
    `modules_to_save` are trained in full besides the candidates (e.g. a pooler in front of the classifier, which
    peft adds for SEQ_CLS); every baseline built from the report trains them too. The report's budget is the smallest
    one a search accepts (the smallest candidate) and means nothing here: the builders take their budget explicitly.
    """
    options = {
        "candidate_kinds": list(candidate_kinds),
        "task_type": task_type,
        "modules_to_save": None if modules_to_save is None else list(modules_to_save),
    }
    smallest = min(c.num_params for c in build_search_space(model, peft_s3.S3SearchConfig(budget=1, **options)))
    return gate_report(peft.get_peft_model(copy.deepcopy(model), peft_s3.S3SearchConfig(budget=smallest, **options)))


def kind_structure(report: dict[str, Any], kind: str) -> dict[str, dict[str, int]]:
    """{module: {kind: count}} holding every candidate of `kind` in the report (count = number of LoRA slots)."""
    counts = Counter(row["module"] for row in report["candidates"] if row["kind"] == kind)
    if not counts:
        kinds = sorted({row["kind"] for row in report["candidates"]})
        raise ValueError(f"The search space has no candidate of kind {kind!r}; its kinds are {kinds}.")
    return {module: {kind: count} for module, count in counts.items()}


def lora_candidate_scaling(report: dict[str, Any]) -> float:
    """Scaling of one LoRA candidate of the search space: S3SearchConfig.lora_alpha / max_rank."""
    return report["config"]["lora_alpha"] / report["config"]["max_rank"]


def baseline_config(
    name: str, model: PreTrainedModel, report: dict[str, Any], task_type: str = "SEQ_CLS"
) -> peft.PeftConfig:
    """The peft config of the manual baseline `name` (one of `BASELINES`) for `model`, whose search space is `report`.

    The baseline also trains the report's modules_to_save (the classification head), like the searched structures.

    Raises:
        ValueError: `name` is unknown, the search space lacks the needed kind, or peft has no default LoRA targets for
            the model type.
    """
    head = report["config"]["modules_to_save"]
    if name in KIND_BASELINES:
        kind = KIND_BASELINES[name]
        return peft_s3.S3SearchConfig(
            structure=kind_structure(report, kind),
            candidate_kinds=[kind],
            adapter_rank=report["config"]["adapter_rank"],
            adapter_activation=report["config"]["adapter_activation"],
            modules_to_save=head,
            task_type=task_type,
        )
    scaling = lora_candidate_scaling(report)
    if name in LORA_QV_RANKS:
        model_type = model.config.model_type
        if model_type not in TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING:
            raise ValueError(
                f"peft has no default LoRA target modules for model type {model_type!r}, so {name!r} is undefined."
            )
        rank = LORA_QV_RANKS[name]
        targets = list(TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING[model_type])
    elif name == ALL_LINEAR_BASELINE:
        rank = 1
        targets = list(kind_structure(report, "lora"))
    else:
        raise ValueError(f"Unknown baseline {name!r}; choose one of {list(BASELINES)}.")
    return peft.LoraConfig(
        r=rank,
        lora_alpha=rank * scaling,
        lora_dropout=0.0,
        target_modules=targets,
        modules_to_save=head,
        task_type=task_type,
    )


def build_baseline(
    name: str, model: PreTrainedModel, report: dict[str, Any], task_type: str = "SEQ_CLS"
) -> peft.PeftModel:
    """`model` (modified in place) wrapped with the freshly initialised adapter of baseline `name`."""
    return peft.get_peft_model(model, baseline_config(name, model, report, task_type))


def random_structure(report: dict[str, Any], budget: float | int, seed: int) -> SearchedStructure:
    """A random structure of the report's search space within `budget` (a fraction < 1 or an absolute count).

    The candidates are put in a random order drawn from `seed` and taken greedily while they fit, by the rule
    `peft_s3.resolve` applies to the order of a search's gate probabilities; the result is a maximal structure (no
    left-out candidate fits in the remaining budget). The returned structure's `p` values are the random scores.
    """
    scores = random.Random(seed).sample(range(len(report["candidates"])), len(report["candidates"]))
    shuffled = copy.deepcopy(report)
    for row, score in zip(shuffled["candidates"], scores, strict=True):
        row["p"] = row["alpha"] = score / len(scores)
    # Greedy, not the exact sum-of-p selection: maximising a sum of random scores would favour many small candidates.
    return resolve(shuffled, budget=budget, method="greedy")


def composition(candidates: Sequence[Any]) -> dict[str, int]:
    """Number of selected candidates per kind (LoRA counts rank-1 slices), in the order of `CANDIDATE_KINDS`."""
    counts = Counter(candidate.kind for candidate in candidates)
    return {kind: counts[kind] for kind in peft_s3.CANDIDATE_KINDS if counts[kind]}


# --- Budgeted baselines: peft's rank-allocating methods at a given trainable-parameter count ---------------------

BUDGETED_BASELINES: tuple[str, ...] = ("adalora", "eva")
"""Baselines that allocate ranks themselves within a budget (`build_budgeted_baseline`)."""
ROUNDINGS: tuple[str, ...] = ("nearest", "down")
"""How a budget becomes a rank count: the nearest expressible count, or the largest one not above the budget."""


@dataclass
class BudgetedBaseline:
    """A budgeted baseline ready to train: the model, the Trainer callbacks it needs, and how to count it afterwards.

    `budget` is the absolute budget it was built for; `settings` records what was built (targets, ranks, schedule,
    the count the design expects) for the results file. Call `num_trainable_params()` after training: the count that
    the budget really bought, without the head (`modules_to_save`), which every baseline trains in full.
    """

    name: str
    model: peft.PeftModel
    budget: int
    callbacks: list[TrainerCallback] = field(default_factory=list)
    settings: dict[str, Any] = field(default_factory=dict)
    counter: Optional[Callable[[], int]] = None

    def num_trainable_params(self) -> int:
        """The real count of the finished baseline (AdaLoRA: the ranks left by its final mask; EVA: its LoRA ranks)."""
        if self.counter is None:
            return _lora_params(self.model)
        return self.counter()


def absolute_budget(report: dict[str, Any], budget: float | int) -> int:
    """`budget` as a parameter count: a fraction (< 1) of the report's backbone (as `S3SearchConfig` reads it)."""
    if budget <= 0:
        raise ValueError(f"The budget must be positive; got {budget!r}.")
    return int(budget * report["backbone_num_params"]) if budget < 1 else int(budget)


def uniform_lora_targets(report: dict[str, Any]) -> tuple[list[str], int]:
    """The LoRA-space linears that share one cost per rank (in + out features), and that cost.

    AdaLoRA and EVA give ranks to modules by importance or explained variance, blind to what a rank costs, so on
    modules of mixed shapes the parameter count they end with depends on where the ranks land (on MiniLM a rank costs
    768 on the attention projections and 1,920 on the feed-forward ones: one misplaced rank is the whole 5e-5 budget).
    Restricting them to modules of one cost makes the count a known multiple of the rank budget. The class with the
    most modules is taken (ties: the cheaper one): query, key, value and attention output for BERT (24 on MiniLM),
    which includes the query/value targets peft uses for LoRA and AdaLoRA by default.
    """
    costs: dict[str, int] = {}
    for row in report["candidates"]:
        if row["kind"] == "lora":
            costs[row["module"]] = row["num_params"]
    if not costs:
        raise ValueError("The search space has no LoRA candidates, so it has no targets for AdaLoRA or EVA.")
    groups: dict[int, list[str]] = defaultdict(list)
    for module, cost in costs.items():
        groups[cost].append(module)
    cost, modules = max(groups.items(), key=lambda item: (len(item[1]), -item[0]))
    return modules, cost


def rank_count(budget: int, rank_cost: int, rounding: str = "nearest") -> int:
    """Number of ranks of `rank_cost` parameters whose total is nearest to `budget` (ties: fewer), or not above it.

    Raises:
        ValueError: `rounding` is unknown, or `budget` is below one rank (no count can be expressed).
    """
    if rounding not in ROUNDINGS:
        raise ValueError(f"Unknown rounding {rounding!r}; choose one of {list(ROUNDINGS)}.")
    if budget < rank_cost:
        raise ValueError(
            f"A budget of {budget} parameters is below one rank ({rank_cost} parameters), the smallest count this "
            f"baseline can express; give at least {rank_cost}."
        )
    below = budget // rank_cost
    if rounding == "down":
        return below
    return below + 1 if (below + 1) * rank_cost - budget < budget - below * rank_cost else below


def optimizer_steps(num_rows: int, recipe: TrainingRecipe) -> int:
    """Optimizer steps of `recipe` on `num_rows` rows, as `transformers.Trainer` counts them (one device, no
    gradient accumulation): ceil(epochs * ceil(rows / batch_size))."""
    return math.ceil(recipe.epochs * math.ceil(num_rows / recipe.batch_size))


def build_budgeted_baseline(
    name: str,
    model: PreTrainedModel,
    report: dict[str, Any],
    budget: float | int,
    train_dataset: Any,
    collator: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    recipe: TrainingRecipe,
    task_type: str = "SEQ_CLS",
    rounding: str = "nearest",
) -> BudgetedBaseline:
    """Baseline `name` (one of `BUDGETED_BASELINES`) on `model` (modified in place) at `budget`.

    `budget` is a fraction (< 1) of the backbone (the report's `backbone_num_params`) or a parameter count;
    `rounding="nearest"` gives the expressible count nearest to it (possibly a little above, by less than half a
    rank), `"down"` the largest one not above it. `train_dataset` is the tokenized training split the model will be
    trained on with `recipe` (AdaLoRA's schedule is its number of optimizer steps; EVA's SVD reads batches of it made
    by `collator`). Train `result.model` with a Trainer given `result.callbacks`, then read
    `result.num_trainable_params()`.

    Raises:
        ValueError: `name` or `rounding` is unknown, or the budget is below the smallest count the baseline expresses.
    """
    limit = absolute_budget(report, budget)
    if name == "adalora":
        return build_adalora(model, report, limit, len(train_dataset), recipe, task_type, rounding)
    if name == "eva":
        dataloader = eva_dataloader(train_dataset, collator, recipe)
        return build_eva(model, report, limit, dataloader, task_type, rounding)
    raise ValueError(f"Unknown budgeted baseline {name!r}; choose one of {list(BUDGETED_BASELINES)}.")


# --- AdaLoRA ---------------------------------------------------------------------------------------------------


class AdaLoraAllocationCallback(TrainerCallback):
    """Runs AdaLoRA's importance update and rank allocation after every optimizer step.

    peft's AdaLoRA is not driven by `Trainer` itself: `AdaLoraModel.update_and_allocate(global_step)` must run after
    `optimizer.step()` and before `zero_grad()` (its docstring's example, with the 0-based step index), since the
    importance scores read `p * p.grad`. `on_optimizer_step` is exactly that point in transformers' loop, where
    `state.global_step` is still the 0-based index of the step just taken (peft's own AdaMSS callback uses the same
    hook). The schedule's length is checked when training starts: a Trainer that runs a different number of steps
    would never reach (or overshoot) the final allocation, so the count would not be what the budget asked for.
    """

    def __init__(self, model: peft.PeftModel, total_step: int, final_step: int) -> None:
        self.model = model
        self.total_step = total_step
        self.final_step = final_step
        self.last_step: Optional[int] = None

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        if state.max_steps != self.total_step:
            raise ValueError(
                f"AdaLoRA's schedule was built for total_step={self.total_step} optimizer steps, but the Trainer will "
                f"run {state.max_steps}; build it with the recipe and training set that are used for training."
            )

    def on_optimizer_step(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
    ) -> None:
        self.model.base_model.update_and_allocate(state.global_step)
        self.last_step = state.global_step

    @property
    def finished(self) -> bool:
        """Whether the final allocation (step total_step - tfinal) has run: from then on the rank pattern is fixed."""
        return self.last_step is not None and self.last_step >= self.final_step


def adalora_schedule(total_step: int, tinit_fraction: float = 0.1, tfinal_fraction: float = 0.2) -> tuple[int, int]:
    """AdaLoRA's (tinit, tfinal) for a run of `total_step` optimizer steps.

    peft's defaults (0, 0) prune from the first step to the last, which leaves the final ranks no steps to train
    alone; they are meant to be set per run. With ~125 steps: 12 warm-up steps on all initial ranks (so the
    importance scores, an EMA with beta 0.85, have gradients to average), a cubic pruning phase over 70 % of the
    run, and 25 steps that train only the ranks kept. tfinal is at least 1, so the final allocation (step
    total_step - tfinal, 0-based) falls inside the run.

    Raises:
        ValueError: fewer than 2 steps leave no room for a pruning phase.
    """
    if total_step < 2:
        raise ValueError(f"AdaLoRA needs at least 2 optimizer steps to prune; the recipe gives {total_step}.")
    tinit = round(tinit_fraction * total_step)
    tfinal = max(1, round(tfinal_fraction * total_step))
    if tinit >= total_step - tfinal:
        tinit = max(0, total_step - tfinal - 1)
    return tinit, tfinal


def _per_module_rank(total: int, modules: int) -> float:
    """A target_r with int(target_r * modules) == total.

    peft's RankAllocator takes `target_r * number of modules` as the final rank budget and int()s it; an average
    below one rank per module (small budgets) needs a fractional target_r, which peft accepts (it is only used in
    that product). The float is nudged up if rounding would make the product fall just short of `total`.
    """
    target_r = total / modules
    while int(target_r * modules) < total:
        target_r = math.nextafter(target_r, math.inf)
    return target_r


def build_adalora(
    model: PreTrainedModel,
    report: dict[str, Any],
    budget: int,
    num_rows: int,
    recipe: TrainingRecipe,
    task_type: str = "SEQ_CLS",
    rounding: str = "nearest",
    init_factor: float = 1.5,
) -> BudgetedBaseline:
    """peft AdaLoRA on the `uniform_lora_targets`, pruned to the rank count whose parameters are nearest `budget`.

    Cost per rank: AdaLoRA's P Lambda Q triplet, a row of A (in), a column of B (out) and one singular value, so
    in + out + 1 (769 on MiniLM's attention projections). The final rank budget K (`rank_count`) is spread by
    AdaLoRA itself over the targets: target_r = K / modules, fractional when K < modules (see `_per_module_rank`).
    AdaLoRA starts from init_r ranks per module, init_r = ceil(1.5 K / modules) (the paper starts from 1.5 times
    the final budget) but at least 1: below one rank per module it must start with one rank on every target, so
    at small budgets it trains far more than it keeps during the schedule (`settings["scheduled_params"]`; 24 x 769
    = 18,456 on MiniLM for a budget of one rank). What counts is what survives: `num_trainable_params()` counts the
    ranks the final mask keeps (`rank_pattern` after step total_step - tfinal, which is also what AdaLoRA saves);
    it can be below K when importance scores tie at the threshold (peft masks every score <= the K-th).

    Scaling: AdaLoRA multiplies by lora_alpha / init_r (its `ranknum` stays init_r after pruning), so
    lora_alpha = init_r * s keeps the scaling s of one LoRA candidate per rank, as the other LoRA baselines do.
    total_step is the recipe's optimizer steps on `num_rows` rows, tinit / tfinal from `adalora_schedule`; the
    orthogonal regulariser keeps peft's default weight (0.5).
    """
    targets, slice_cost = uniform_lora_targets(report)
    rank_cost = slice_cost + 1
    ranks = rank_count(budget, rank_cost, rounding)
    total_step = optimizer_steps(num_rows, recipe)
    tinit, tfinal = adalora_schedule(total_step)
    init_r = max(1, math.ceil(init_factor * ranks / len(targets)))
    scaling = lora_candidate_scaling(report)
    config = peft.AdaLoraConfig(
        init_r=init_r,
        target_r=_per_module_rank(ranks, len(targets)),
        tinit=tinit,
        tfinal=tfinal,
        deltaT=1,
        total_step=total_step,
        lora_alpha=init_r * scaling,
        lora_dropout=0.0,
        target_modules=list(targets),
        modules_to_save=list(report["config"]["modules_to_save"] or []),
        task_type=task_type,
    )
    peft_model = peft.get_peft_model(model, config)
    callback = AdaLoraAllocationCallback(peft_model, total_step, final_step=total_step - tfinal)
    settings = {
        "targets": targets,
        "rank_budget": ranks,
        "rank_cost": rank_cost,
        "expected_params": ranks * rank_cost,
        "init_r": init_r,
        "scheduled_params": init_r * len(targets) * rank_cost,
        "total_step": total_step,
        "tinit": tinit,
        "tfinal": tfinal,
        "lora_alpha": init_r * scaling,
    }
    return BudgetedBaseline(
        "adalora", peft_model, budget, [callback], settings, counter=lambda: adalora_final_params(peft_model, callback)
    )


def adalora_final_params(model: peft.PeftModel, callback: AdaLoraAllocationCallback) -> int:
    """Parameters of the ranks left by AdaLoRA's final mask: (in + out + 1) per kept rank of every module.

    Raises:
        RuntimeError: training has not reached the final allocation, so the kept ranks are not decided yet.
    """
    rank_pattern = model.peft_config[model.active_adapter].rank_pattern
    if not callback.finished or rank_pattern is None:
        raise RuntimeError(
            f"AdaLoRA's final allocation (step {callback.final_step}) has not run (last step seen: "
            f"{callback.last_step}); train the model with the baseline's callbacks first."
        )
    total = 0
    for name, kept in rank_pattern.items():
        layer = model.base_model.model.get_submodule(name.split(".lora_E")[0])
        total += sum(kept) * (layer.in_features + layer.out_features + 1)
    return total


# --- EVA -------------------------------------------------------------------------------------------------------


def eva_dataloader(train_dataset: Any, collator: Callable, recipe: TrainingRecipe) -> DataLoader:
    """Shuffled batches of the training split for EVA's SVD (order seeded by recipe.seed, batch size of the recipe).

    Only the model inputs are kept: the classification labels are one per sequence, so peft's label mask (made for
    token labels) does not apply and they are not needed for the forward passes. Batches are plain dicts, as peft's
    input preparation requires (a collator's `BatchEncoding` is refused).
    """
    inputs = [name for name in ("input_ids", "attention_mask", "token_type_ids") if name in train_dataset.column_names]

    def collate(rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        return dict(collator(rows))

    return DataLoader(
        train_dataset.select_columns(inputs),
        batch_size=recipe.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(recipe.seed),
        collate_fn=collate,
    )


def retrain_init_arguments(
    init: str, train_dataset: Any, collator: Callable, recipe: TrainingRecipe, search_model: Optional[torch.nn.Module]
) -> dict[str, Any]:
    """`apply_structure`'s keyword arguments for a benchmark's --retrain-init: for eva one pass over the batches the
    EVA baseline reads (`eva_dataloader`, same rows, order and size; the baseline reads them until its components
    converge), for inherit the run's search model; none for fresh, so its runs are as before."""
    if init == "eva":
        return {"init": init, "init_dataloader": eva_dataloader(train_dataset, collator, recipe)}
    if init == "inherit":
        return {"init": init, "init_from": search_model}
    return {}


class _EvaHookRecorder:
    """A `forward_fn` for `peft.get_eva_state_dict` that runs the default forward and keeps peft's EVA hooks.

    peft computes the incremental SVD of every target's input in forward hooks but returns only the components of
    its own rank distribution; keeping the hooks gives the explained-variance ratios (`SVDHook`) and the input hashes
    (`HashHook`: targets with equal inputs, e.g. query/key/value, share one SVD) needed to distribute another budget.
    """

    def __init__(self) -> None:
        self.svd: dict[str, eva.SVDHook] = {}
        self.hashes: dict[str, int] = {}

    def __call__(self, model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> Any:
        output = model(**inputs)
        for module in model.modules():
            for hook in module._forward_hooks.values():
                if isinstance(hook, eva.SVDHook):
                    self.svd[hook.name] = hook
                elif isinstance(hook, eva.HashHook) and hook.name not in self.hashes:
                    self.hashes[hook.name] = hook.hashed_inputs[0]
        return output

    def leaders(self) -> dict[str, str]:
        """Target -> the target whose SVD it uses, ordered as peft's `layer_hook_map` (leaders, then followers)."""
        groups: dict[int, list[str]] = defaultdict(list)
        for name, value in self.hashes.items():
            groups[value].append(name)
        followers = {name: group[0] for group in groups.values() for name in group[1:]}
        leaders = {name: name for name in self.hashes if name not in followers}
        if set(leaders) != set(self.svd):
            raise RuntimeError(
                "peft's EVA hooks are not as expected (this code follows peft 0.21's eva.py): SVD hooks on "
                f"{sorted(self.svd)}, distinct inputs on {sorted(leaders)}."
            )
        return {**leaders, **followers}


def eva_rank_distribution(recorder: _EvaHookRecorder, rank_budget: int) -> dict[str, int]:
    """peft's EVA rank redistribution with a rank budget of its own.

    The rule of peft's `_get_rank_distribution` (nested in `peft.tuners.lora.eva._get_eva_state_dict`, so it cannot
    be called): every target offers the explained-variance ratios of its first round(r * rho) components, the
    `rank_budget` largest over all targets win, a target's rank is how many of its own won (0 possible), and a
    target that shares its input with another hands the larger rank to the one that holds the SVD. With
    rank_budget = r * targets this is exactly peft's distribution.
    """
    leaders = recorder.leaders()
    offers = [
        (name, ratio)
        for name, leader in leaders.items()
        for ratio in recorder.svd[leader].svd.explained_variance_ratio_[: recorder.svd[leader].n_components]
    ]
    if rank_budget > len(offers):
        raise ValueError(f"A rank budget of {rank_budget} exceeds the {len(offers)} components EVA computed.")
    names, ratios = zip(*offers, strict=True)
    order = torch.stack(list(ratios)).argsort(descending=True)
    won = Counter(names[i] for i in order[:rank_budget].tolist())
    ranks = {name: won.get(name, 0) for name in leaders}
    for name, leader in leaders.items():
        if name != leader and ranks[leader] < ranks[name]:
            ranks[leader], ranks[name] = ranks[name], ranks[leader]
    return ranks


def eva_state_dict(model: peft.PeftModel, dataloader: DataLoader, rank_budget: int) -> dict[str, torch.Tensor]:
    """EVA's initial lora_A weights for `model` with `rank_budget` ranks in all, redistributed by explained variance.

    The SVDs are peft's own (`peft.get_eva_state_dict`: hashing, incremental PCA until the components it needs have
    converged at cosine similarity tau); only the distribution is redone at `rank_budget` (`eva_rank_distribution`).
    A smaller budget takes a subset of the components peft's budget took, so they have converged too (checked, as
    peft checks it). Each target gets the first `rank` right-singular vectors of its input (whitened if configured);
    rank 0 gives an empty tensor, which `peft.initialize_lora_eva_weights` turns into "no LoRA on this module".
    """
    recorder = _EvaHookRecorder()
    eva.get_eva_state_dict(model, dataloader, forward_fn=recorder, show_progress_bar=False)
    whiten = model.peft_config[model.active_adapter].eva_config.whiten
    device = next(model.parameters()).device
    leaders = recorder.leaders()
    state = {}
    for name, rank in eva_rank_distribution(recorder, rank_budget).items():
        hook = recorder.svd[leaders[name]]
        if not torch.all(hook.converged[:rank]):
            raise RuntimeError(f"EVA's SVD of {name} has not converged for the {rank} components it was given.")
        components = hook.svd.components_[:rank].clone()
        if whiten:
            components = components / hook.svd.singular_values_[:rank].sqrt().reshape(-1, 1)
        state[name] = components.to(device)
    return state


def build_eva(
    model: PreTrainedModel,
    report: dict[str, Any],
    budget: int,
    dataloader: DataLoader,
    task_type: str = "SEQ_CLS",
    rounding: str = "nearest",
    rho: float = 2.0,
) -> BudgetedBaseline:
    """peft LoRA with EVA initialisation and rank redistribution on the `uniform_lora_targets`, at `budget`.

    A LoRA rank costs in + out (768 on MiniLM's attention projections); the rank budget K is `rank_count` of it.
    Plain `LoraConfig(r, init_lora_weights="eva", eva_config=EvaConfig(rho))` + `initialize_lora_eva_weights`
    redistributes a budget of r ranks per target (each capped at round(r * rho), rank 0 allowed: peft then removes
    LoRA from that module), so its budgets are multiples of the number of targets, at least one rank per target:
    24 x 768 = 18,432 on MiniLM, above the 5e-5 and 2e-4 budgets. What is done here instead:

    * r = ceil(K / targets), so peft's budget r * targets is the smallest one >= K, and rho (peft's default 2)
      caps every target at round(r * rho) ranks, as in peft;
    * peft computes the SVDs (`peft.get_eva_state_dict` on the wrapped model), the same redistribution rule is
      applied with budget K (`eva_state_dict`; when K = r * targets it is peft's own result), and
      `peft.initialize_lora_eva_weights(model, eva_state_dict=...)` loads it: lora_A = the top right-singular
      vectors of each target's input, lora_B = 0, targets with rank 0 dropped, rank_pattern / alpha_pattern set;
    * `EvaConfig(use_label_mask=False)`: classification labels are per sequence, not per token; padding is still
      left out through the attention mask (peft's default input preparation).

    Scaling: lora_alpha = r * s and peft's `adjust_scaling_factors` (default True) rescales alpha with each new rank,
    so every rank keeps the scaling s of one LoRA candidate. `num_trainable_params()` counts the LoRA weights after
    redistribution (K ranks, so K * (in + out)).
    """
    targets, rank_cost = uniform_lora_targets(report)
    ranks = rank_count(budget, rank_cost, rounding)
    r = math.ceil(ranks / len(targets))
    scaling = lora_candidate_scaling(report)
    smallest_side = min(min(model.get_submodule(target).weight.shape) for target in targets)
    if round(r * rho) > smallest_side:
        raise ValueError(
            f"A budget of {budget} needs {r} ranks per target, more than EVA can compute on layers of width "
            f"{smallest_side} (rho={rho}); the largest EVA budget here is {len(targets) * smallest_side} ranks."
        )
    config = peft.LoraConfig(
        r=r,
        lora_alpha=r * scaling,
        lora_dropout=0.0,
        target_modules=list(targets),
        modules_to_save=list(report["config"]["modules_to_save"] or []),
        task_type=task_type,
        init_lora_weights="eva",
        eva_config=peft.EvaConfig(rho=rho, use_label_mask=False),
    )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*eva initialization used with low_cpu_mem_usage=False.*")
        peft_model = peft.get_peft_model(model, config)
    peft.initialize_lora_eva_weights(peft_model, eva_state_dict=eva_state_dict(peft_model, dataloader, ranks))
    adapter = peft_model.peft_config[peft_model.active_adapter]
    settings = {
        "targets": targets,
        "rank_budget": ranks,
        "rank_cost": rank_cost,
        "expected_params": ranks * rank_cost,
        "r": r,
        "rho": rho,
        "ranks": {
            name: module.r[peft_model.active_adapter]
            for name, module in peft_model.base_model.model.named_modules()
            if isinstance(module, peft.tuners.lora.LoraLayer)
        },
        "lora_alpha": r * scaling,
        "alpha_pattern": dict(adapter.alpha_pattern),
    }
    return BudgetedBaseline("eva", peft_model, budget, [], settings, counter=lambda: _lora_params(peft_model))


def _lora_params(model: torch.nn.Module) -> int:
    """Trainable LoRA / AdaLoRA weights (lora_A, lora_B, lora_E) of `model`; the head is not among them."""
    return sum(p.numel() for name, p in model.named_parameters() if p.requires_grad and ".lora_" in name)

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
  with the selection rule of `peft_s3.resolve`.

The LoRA baselines use ``lora_alpha = r * s`` with ``s`` the scaling of one LoRA candidate of the search space
(``lora_alpha / max_rank`` of `S3SearchConfig`), so every rank-1 direction is scaled as in the searched structures.
"""

from __future__ import annotations

import copy
import random
from collections import Counter
from collections.abc import Sequence
from typing import Any, Optional

import peft
from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from transformers import PreTrainedModel

import peft_s3
from peft_s3.structure import SearchedStructure, gate_report, resolve
from peft_s3.tuner.search_space import build_search_space

KIND_BASELINES: dict[str, str] = {"bitfit": "bitfit", "lnfit": "lnfit", "adapter-lr": "adapter"}
"""Baseline name -> the candidate kind of which it trains every candidate."""
LORA_QV_RANKS: dict[str, int] = {"lora-r1-qv": 1, "lora-r8-qv": 8}
"""Baseline name -> LoRA rank on peft's default targets of the model type (query and value for BERT)."""
ALL_LINEAR_BASELINE = "lora-all-linear"
BASELINES: tuple[str, ...] = (*LORA_QV_RANKS, *KIND_BASELINES, ALL_LINEAR_BASELINE)


def search_space_report(
    model: PreTrainedModel,
    candidate_kinds: Sequence[str] = peft_s3.MIX_SPACE,
    task_type: str = "SEQ_CLS",
    modules_to_save: Optional[Sequence[str]] = None,
) -> dict[str, Any]:
    """The gate report (`peft_s3.structure.gate_report`) of a fresh S3 search adapter on a copy of `model`.

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
    return resolve(shuffled, budget=budget)


def composition(candidates: Sequence[Any]) -> dict[str, int]:
    """Number of selected candidates per kind (LoRA counts rank-1 slices), in the order of `CANDIDATE_KINDS`."""
    counts = Counter(candidate.kind for candidate in candidates)
    return {kind: counts[kind] for kind in peft_s3.CANDIDATE_KINDS if counts[kind]}

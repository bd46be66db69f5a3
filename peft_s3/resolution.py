"""From a search's gates to its fixed structure: `resolve`, the paper's deterministic choice after the search.

The set arithmetic lives in `peft_s3.selection`; this module reads the gates (from a model, a gate report or its
file), checks them and builds the `SearchedStructure`.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from typing import Any, Optional, Union

import torch

from .gate_report import candidates_of, report_of, search_config_of
from .selection import ALPHA_RESOLUTION, SELECTION_METHODS, select
from .structure import ModuleInfo, ScoredCandidate, SearchedStructure
from .tuner.gates import solve_zeta
from .tuner.search_space import Candidate

_ROW_KEYS = ("name", "kind", "module", "stack", "layer", "position", "num_params", "alpha", "p")


def _check_rows(rows: Any) -> None:
    # A hand-edited or foreign report would otherwise fail deep inside the selection with a bare KeyError/TypeError.
    if not isinstance(rows, list) or not rows:
        raise ValueError(f"The gate report's candidates={rows!r} is not allowed: it must be a non-empty list of rows.")
    for index, row in enumerate(rows):
        missing = [key for key in _ROW_KEYS if not isinstance(row, dict) or key not in row]
        if missing:
            raise ValueError(
                f"Row {index} of the gate report lacks {missing}: every row needs {list(_ROW_KEYS)}, as "
                "`save_gate_report` writes them."
            )
        size = row["num_params"]
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(
                f"Row {index} of the gate report ({row['name']!r}) has num_params={size!r}: it must be an int >= 1."
            )
        for key in ("alpha", "p"):
            if isinstance(row[key], bool) or not isinstance(row[key], (int, float)):
                raise ValueError(
                    f"Row {index} of the gate report ({row['name']!r}) has {key}={row[key]!r}: it must be a number."
                )


def _check_finite_gates(rows: list[dict[str, Any]]) -> None:
    # NaN compares false with everything, so a diverged search would otherwise resolve to an arbitrary structure.
    broken = [row for row in rows if not (math.isfinite(row["p"]) and math.isfinite(row["alpha"]))]
    if broken:
        examples = ", ".join(f"{row['name']} (alpha={row['alpha']}, p={row['p']})" for row in broken[:3])
        raise ValueError(
            f"{len(broken)} of {len(rows)} gates are not finite, e.g. {examples}: the search diverged, so its gates "
            "rank nothing. Search again with a lower alpha_learning_rate or learning_rate (or without fp16)."
        )


def _final_probabilities(alphas: list[float], sizes: list[int], budget: int, tau: float) -> list[float]:
    # The gates as the finished search holds them: the config's tau and the expected size at the budget itself. A
    # mid-search checkpoint's report holds p at the annealed tau and widened budget of its step, a model loaded from
    # it p at the config's: recomputing from alpha gives both the same p. Same float32 arithmetic as GateBank.
    alpha = torch.tensor(alphas, dtype=torch.float32)
    zeta = solve_zeta(alpha, torch.tensor(sizes, dtype=torch.float64), budget, tau)
    return torch.sigmoid((alpha - zeta) / tau).tolist()


def _warn_if_untrained(alphas: list[float]) -> None:
    # Every alpha equal (on the selection's grid) means every p equal: the ranking is candidate order, not a search.
    if max(alphas) - min(alphas) < ALPHA_RESOLUTION:
        warnings.warn(
            f"All {len(alphas)} candidates have the same alpha ({alphas[0]:g}): the search has not trained "
            "(or its alphas were not loaded), so all p are equal and the structure is just the first candidates in "
            "gate order that fit the budget. Resolve a search after training it.",
            UserWarning,
            stacklevel=3,
        )


_CANDIDATE_FIELDS = tuple(field_.name for field_ in dataclasses.fields(Candidate))


def _fields(candidate: Candidate) -> dict[str, Any]:
    # Neither dataclasses.asdict (a deep copy per field) nor dataclasses.fields per call: either dominated resolve's
    # run time on search spaces of 100k candidates.
    return {name: getattr(candidate, name) for name in _CANDIDATE_FIELDS}


def resolve(
    model_or_checkpoint: Any,
    budget: Optional[Union[int, float]] = None,
    adapter_name: Optional[str] = None,
    method: str = "exact",
) -> SearchedStructure:
    """Choose the final structure of an S3 search: the candidates of highest total gate probability p that fit.

    The p that ranks the candidates is always the one the search ends at: recomputed from the alphas at the config's
    tau with the expected size at the search's budget, whatever the gates held when the model or report was taken.
    So a mid-search checkpoint resolves alike whether passed as its directory (whose s3_gates.json holds p at the
    annealed tau and widened budget of its step) or as the PeftModel loaded from it, and a finished search resolves
    to the p of its report. `SearchedStructure.search_space` holds these p.

    A search that never trained (every alpha equal, so every p equal) resolves with a UserWarning: its structure is
    the candidate order cut at the budget, not a result. Near-ties of p are broken as `peft_s3.selection.select`
    documents (p and alpha on grids of 1e-4, then candidate order), so float noise cannot change the structure.

    `method="exact"` (the default) is the paper's rule: the set with the highest sum of p within the budget, a 0/1
    knapsack solved exactly (`peft_s3.selection.exact_selection`; it falls back to the greedy rule, with a warning,
    on search spaces too large for its table). `method="greedy"` takes candidates by descending p (ties broken by
    descending alpha, which p = sigmoid((alpha - zeta) / tau) can hide when it saturates in float32, then by
    candidate order) while they fit, skipping one that does not and filling with smaller ones further down. The two
    agree when the gates are decided (p near 0 or 1); the result is deterministic either way.

    Args:
        model_or_checkpoint: a PeftModel or S3Model with a search adapter, a directory (or file) holding the
            s3_gates.json written by `save_gate_report`, or a report dict from `gate_report` / `load_gate_report`.
        budget: overrides the search budget: an int >= 1 is an absolute parameter count, a float in (0, 1) a fraction
            of the backbone's parameters. p depends on the budget only through a shared shift, so the ranking is
            that of the search; only the cut-off moves.
        adapter_name: the adapter to resolve (default: the active one).
        method: `"exact"` or `"greedy"` (`peft_s3.selection.SELECTION_METHODS`).
    """
    report = report_of(model_or_checkpoint, adapter_name)
    config = search_config_of(report)
    if not config.is_search or report["budget"] is None:
        raise ValueError(
            f"Adapter {report.get('adapter_name')!r} has a fixed structure (S3SearchConfig.structure), not a search, "
            "so there is nothing to resolve. Resolve the model or checkpoint of the search instead."
        )
    if method not in SELECTION_METHODS:
        raise ValueError(f"method={method!r} is not allowed: choose one of {list(SELECTION_METHODS)}.")
    backbone = report["backbone_num_params"]
    limit = (
        report["budget"] if budget is None else dataclasses.replace(config, budget=budget).absolute_budget(backbone)
    )
    rows = report["candidates"]
    _check_rows(rows)
    _check_finite_gates(rows)
    candidates = candidates_of(rows)
    sizes = [candidate.num_params for candidate in candidates]
    if limit < min(sizes):
        raise ValueError(
            f"budget={budget if budget is not None else report['budget']!r} allows {limit} trainable parameters, "
            f"fewer than the smallest candidate ({min(sizes)}): no structure fits. Use a budget >= {min(sizes)}."
        )
    alphas = [row["alpha"] for row in rows]
    _warn_if_untrained(alphas)
    p = _final_probabilities(alphas, sizes, report["budget"], config.tau)
    chosen = set(select(p, alphas, sizes, limit, method))
    search_space = [
        ScoredCandidate(**_fields(candidate), p=p_i, selected=index in chosen)
        for index, (candidate, p_i) in enumerate(zip(candidates, p, strict=True))
    ]
    modules = {c.module for c in search_space if c.selected}
    return SearchedStructure(
        search_space=search_space,
        budget=limit,
        backbone_num_params=backbone,
        lora_alpha=config.lora_alpha,
        max_rank=config.max_rank,
        lora_dropout=config.lora_dropout,
        adapter_rank=config.adapter_rank,
        adapter_activation=config.adapter_activation,
        modules_to_save=None if config.modules_to_save is None else list(config.modules_to_save),
        task_type=config.task_type,
        base_model_name_or_path=config.base_model_name_or_path,
        modules={name: ModuleInfo(**info) for name, info in report["modules"].items() if name in modules},
        search_space_signature=report.get("search_space_signature"),
    )

"""The fixed structure chosen by a search: `SearchedStructure`, its file, its LoRA conversion, and rebuilding it.

After the search (paper, section 3.2, "Evaluation of the Searched Structure") the final structure is chosen
deterministically from the gate probabilities (`peft_s3.resolve`), then re-initialised and retrained:
`SearchedStructure` holds it, turns it into a fixed-structure `S3SearchConfig` or a `peft.LoraConfig`, and
`apply_structure` builds it afresh on a base model.
"""

from __future__ import annotations

import dataclasses
import json
import re
import warnings
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

from peft import EvaConfig, LoraConfig, PeftModel, get_peft_model
from torch import nn

from .retrain_init import EvaInitConfig, check_eva_applies, check_inheritable, eva_initialise, inherit_weights
from .tuner.config import CANDIDATE_KINDS, RETRAIN_INITS, S3SearchConfig
from .tuner.model import check_unwrapped_base
from .tuner.search_space import Candidate

STRUCTURE_FILE = "s3_structure.json"

LORA_POLICIES = ("raise", "drop", "approximate")

# peft's named LoRA initialisations (init_lora_weights), besides True / False and "pissa_niter_<n>", and the
# sub-configs some of them take.
PEFT_LORA_INITS = ("gaussian", "eva", "olora", "pissa", "corda", "loftq", "orthogonal", "lora_ga", "mica")
LORA_INIT_CONFIGS = ("eva_config", "corda_config", "lora_ga_config", "loftq_config")

# The heads that peft's PeftModelFor<task> appends to a config's modules_to_save itself (it extends the list, so a
# config that already names them would list them twice); the search's config holds them after get_peft_model.
TASK_HEAD_MODULES: dict[str, tuple[str, ...]] = {
    "SEQ_CLS": ("classifier", "score"),
    "TOKEN_CLS": ("classifier", "score"),
    "QUESTION_ANS": ("qa_outputs",),
}

LORA_CONVERSION_LIMITS: dict[str, str] = {
    "adapter": (
        "a low-rank adapter on a module's output has no LoRA counterpart (LoRA is a linear weight delta, the adapter "
        "a non-linear bottleneck on the output); 'approximate' drops it, as a LoRA stand-in would change both the "
        "function and the parameter count"
    ),
    "expert_parameter": (
        "a LoRA slice on a fused expert weight (one rank on every expert of a 3-d parameter) maps to peft's "
        "target_parameters, whose ranks cannot be set per parameter; retrain the structure with `apply_structure`"
    ),
    "bitfit_without_bias": (
        "BitFit on a module without a bias (T5 and Llama linears, RMSNorm-style norms) adds a bias, but LoraConfig "
        "can only make existing biases trainable; 'approximate' drops it"
    ),
    "bitfit_lora_only": (
        "BitFit on a linear layer is expressible only as bias='lora_only', which trains the bias of every biased "
        "LoRA target and of nothing else, so the BitFit linears must be exactly the biased LoRA targets (bias='all' "
        "would also train every other bias of the model); 'approximate' uses bias='lora_only' or bias='none', "
        "whichever trains fewer wrong bias parameters"
    ),
    "norm_whole": (
        "LNFit and BitFit on a norm become modules_to_save, which trains the whole norm, scale and bias together, "
        "so LNFit alone on a norm with a bias, or BitFit alone on a norm, trains extra parameters; 'approximate' "
        "trains the whole norm"
    ),
}
"""What `SearchedStructure.to_lora_config` cannot express exactly with `peft.LoraConfig`, keyed by reason.

LoRA candidates always convert exactly (rank_pattern / alpha_pattern reproduce the search's scaling
lora_alpha / max_rank). Everything else maps to LoraConfig's `bias` and `modules_to_save` only where those train
exactly the same parameters; these entries are the cases where they do not.
"""


@dataclass(frozen=True)
class ScoredCandidate(Candidate):
    """A search-space candidate with its final gate probability `p` and whether the resolved structure keeps it."""

    p: float
    selected: bool


@dataclass(frozen=True)
class ModuleInfo:
    """What LoraConfig conversion needs to know about a module of the structure."""

    type: str
    """One of linear, conv1d (GPT-2's transposed linear), norm, expert_parameter (a fused 3-d MoE expert weight, named
    `<experts module>.<parameter>`), or other (a module that carries only an adapter)."""
    bias_params: int
    """Number of elements of the module's own bias, 0 when it has none."""


@dataclass
class LoraConversion:
    """A structure expressed as a `peft.LoraConfig`, with an account of what the conversion changed."""

    config: LoraConfig
    num_trainable_params: int
    """Parameters the LoraConfig trains in the adapted modules (LoRA, biases, norms), excluding the head's
    modules_to_save; compare with `SearchedStructure.num_trainable_params`."""
    approximated: dict[str, str] = field(default_factory=dict)
    """Candidate name -> reason key of LORA_CONVERSION_LIMITS, for candidates trained together with extra
    parameters."""
    dropped: dict[str, str] = field(default_factory=dict)
    """Candidate name -> reason key of LORA_CONVERSION_LIMITS, for candidates the LoraConfig does not train."""

    @property
    def exact(self) -> bool:
        return not self.approximated and not self.dropped


@dataclass
class SearchedStructure:
    """The fixed structure chosen from an S3 search, with what is needed to rebuild and retrain it.

    `search_space` lists every candidate of the search in gate order with its p and whether it was selected, so the
    structure can be plotted and audited; `candidates` are the selected ones. Create it with `resolve`.
    """

    search_space: list[ScoredCandidate]
    budget: int
    backbone_num_params: int
    lora_alpha: float
    max_rank: int
    lora_dropout: float
    adapter_rank: int
    adapter_activation: str
    modules_to_save: Optional[list[str]] = None
    task_type: Optional[str] = None
    base_model_name_or_path: Optional[str] = None
    modules: dict[str, ModuleInfo] = field(default_factory=dict)
    search_space_signature: Optional[str] = None
    retrain_init: str = "fresh"
    """How the adapter saved with this structure was initialised for retraining: `apply_structure`'s init ('fresh',
    'eva', 'inherit'), or peft's `init_lora_weights` for a LoraConfig ('fresh' for peft's default). Written by
    `save_pretrained_with_structure`; files without it load as 'fresh'."""

    @property
    def candidates(self) -> list[ScoredCandidate]:
        """The selected candidates, in gate order."""
        return [candidate for candidate in self.search_space if candidate.selected]

    @property
    def num_trainable_params(self) -> int:
        """Exact number of trainable parameters of the structure (without the head's modules_to_save)."""
        return sum(candidate.num_params for candidate in self.candidates)

    @property
    def structure(self) -> dict[str, dict[str, int]]:
        """{module: {kind: count}}, count being the LoRA rank for 'lora' and 1 otherwise (S3SearchConfig.structure)."""
        structure: dict[str, dict[str, int]] = {}
        for candidate in self.candidates:
            kinds = structure.setdefault(candidate.module, {})
            kinds[candidate.kind] = kinds.get(candidate.kind, 0) + 1
        return structure

    # ------------------------------------------------------------------------------------------- persistence

    def save(self, path: Union[str, Path]) -> Path:
        """Write the structure as JSON: to `path` if it ends in .json, else to `path/s3_structure.json`."""
        file = _structure_file(path)
        file.parent.mkdir(parents=True, exist_ok=True)
        file.write_text(json.dumps(dataclasses.asdict(self), indent=1))
        return file

    @classmethod
    def load(cls, path: Union[str, Path]) -> SearchedStructure:
        """Read a structure written by `save` (a .json file, or a directory containing s3_structure.json)."""
        file = _structure_file(path)
        if not file.is_file():
            raise FileNotFoundError(f"No searched structure at {file}: expected {STRUCTURE_FILE} written by save().")
        try:
            data = json.loads(file.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(
                f"{file} is not valid JSON ({error}): it may be truncated. Write it again with "
                "SearchedStructure.save()."
            ) from None
        if not isinstance(data, dict):
            raise ValueError(
                f"{file} holds a JSON {type(data).__name__}, not the object SearchedStructure.save writes."
            )
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        required -= {f.name for f in dataclasses.fields(cls) if f.default_factory is not dataclasses.MISSING}
        if set(data) - names or required - set(data):
            raise ValueError(
                f"{file} is not a searched structure: unexpected keys {sorted(set(data) - names)}, missing keys "
                f"{sorted(required - set(data))}."
            )
        if not isinstance(data.get("retrain_init", ""), str):
            raise ValueError(f"{file}: retrain_init={data['retrain_init']!r} is not allowed: it must be a string.")
        data["search_space"] = [_scored_candidate(file, index, row) for index, row in enumerate(data["search_space"])]
        data["modules"] = {name: _module_info(file, name, info) for name, info in data.get("modules", {}).items()}
        return cls(**data)

    @classmethod
    def from_pretrained(
        cls,
        repo_id_or_path: Union[str, Path],
        revision: Optional[str] = None,
        *,
        subfolder: Optional[str] = None,
        cache_dir: Optional[Union[str, Path]] = None,
        token: Optional[Union[str, bool]] = None,
        local_files_only: bool = False,
    ) -> SearchedStructure:
        """A structure from a local path (as `load`) or from the Hub repo that `push_to_hub_with_structure` wrote.

        Hub files go through huggingface_hub's cache, so once fetched they load with `HF_HUB_OFFLINE=1` too.
        """
        if Path(repo_id_or_path).exists():
            return cls.load(Path(repo_id_or_path) / (subfolder or ""))
        if isinstance(repo_id_or_path, Path) or str(repo_id_or_path).endswith(".json"):
            # A Hub repo id names a repo, never a file; this is a local path that does not exist.
            raise FileNotFoundError(
                f"No searched structure at {str(repo_id_or_path)!r}: no such file or directory. Pass an existing "
                f"local path (a .json file or a directory holding {STRUCTURE_FILE}) or a Hub repo id (owner/name)."
            )
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import (
            EntryNotFoundError,
            HFValidationError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )

        where = f"{repo_id_or_path!r}" + (f" at revision {revision!r}" if revision else "")
        try:
            file = hf_hub_download(
                str(repo_id_or_path),
                STRUCTURE_FILE,
                subfolder=subfolder,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
                library_name="peft-s3",
            )
        except HFValidationError:
            raise ValueError(
                f"{repo_id_or_path!r} is neither an existing local path nor a valid Hub repo id (owner/name)."
            ) from None
        except LocalEntryNotFoundError:
            raise FileNotFoundError(
                f"There is no local path {str(repo_id_or_path)!r}, and as a Hub repo id its {STRUCTURE_FILE} is not "
                "in the local Hugging Face cache while the Hub cannot be reached (offline mode or no network). Check "
                "the path for a typo, or fetch the repo once while online."
            ) from None
        except (RepositoryNotFoundError, RevisionNotFoundError) as error:
            raise FileNotFoundError(f"No Hub repo {where}: {type(error).__name__}.") from None
        except EntryNotFoundError:
            raise FileNotFoundError(
                f"The Hub repo {where} has no {STRUCTURE_FILE}; it is written by `peft_s3.push_to_hub_with_structure`."
            ) from None
        return cls.load(file)

    # ------------------------------------------------------------------------------------------- display

    def _summary(self) -> str:
        share = 100 * self.num_trainable_params / self.backbone_num_params
        return (
            f"S3 searched structure: {len(self.candidates)} candidates, {self.num_trainable_params:,} trainable "
            f"parameters ({share:.4g}% of {self.backbone_num_params:,} backbone parameters; budget {self.budget:,})"
        )

    def _rows(self) -> list[tuple[str, ...]]:
        """One row per (module, kind): stack, layer, position, kind (with the LoRA rank), params, mean p."""
        groups: dict[tuple[str, str], list[ScoredCandidate]] = {}
        for candidate in self.candidates:
            groups.setdefault((candidate.module, candidate.kind), []).append(candidate)
        rows = []
        for (_, kind), group in groups.items():
            first = group[0]
            rows.append(
                (
                    first.stack or "-",
                    "-" if first.layer is None else str(first.layer),
                    first.position,
                    f"lora r={len(group)}" if kind == "lora" else kind,
                    str(sum(c.num_params for c in group)),
                    f"{sum(c.p for c in group) / len(group):.3f}",
                )
            )
        return rows

    def table(self) -> str:
        """A plain-text table of the selected candidates, one row per module and kind, in model order."""
        header = ("stack", "layer", "position", "kind", "params", "p")
        rows = [header, *self._rows()]
        widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
        lines = [
            "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
        ]
        return "\n".join([self._summary(), *lines])

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        # The dataclass repr would list every scored candidate of the search space.
        return f"SearchedStructure({self._summary()})"

    def _repr_markdown_(self) -> str:
        return self.to_markdown()

    def to_markdown(self) -> str:
        """The summary and table in Markdown, for model cards."""
        lines = [self._summary(), "", "| stack | layer | position | kind | params | p |", "|---|---|---|---|---|---|"]
        lines += [
            "| " + " | ".join(f"`{row[0]}`" if column == 0 else cell for column, cell in enumerate(row)) + " |"
            for row in self._rows()
        ]
        return "\n".join(lines)

    # ------------------------------------------------------------------------------------------- converters

    def _own_modules_to_save(self) -> list[str]:
        """modules_to_save without the task heads that peft adds for `task_type` itself, each name once."""
        heads = TASK_HEAD_MODULES.get(self.task_type, ())
        return [name for name in dict.fromkeys(self.modules_to_save or []) if name not in heads]

    def _check_not_empty(self) -> None:
        if not self.candidates:
            raise ValueError(
                f"This structure selects none of its {len(self.search_space)} candidates (every `selected` is false), "
                "so there is nothing to build: a structure needs at least one selected candidate. Resolve the "
                "search again with `peft_s3.resolve`."
            )

    def to_peft_config(self, retrain_init: str = "fresh") -> S3SearchConfig:
        """A fixed-structure S3SearchConfig that builds exactly these candidates, with the search's LoRA scaling.

        `retrain_init` only records how the candidates are initialised (`apply_structure` sets them).
        """
        self._check_not_empty()
        kinds = {candidate.kind for candidate in self.candidates}
        return S3SearchConfig(
            structure=self.structure,
            candidate_kinds=[kind for kind in CANDIDATE_KINDS if kind in kinds],
            lora_alpha=self.lora_alpha,
            max_rank=self.max_rank,
            lora_dropout=self.lora_dropout,
            adapter_rank=self.adapter_rank,
            adapter_activation=self.adapter_activation,
            modules_to_save=self._own_modules_to_save() or None,
            task_type=self.task_type,
            base_model_name_or_path=self.base_model_name_or_path,
            retrain_init=retrain_init,
        )

    def lora_conversion(
        self, policy: str = "raise", init_lora_weights: Union[bool, str] = True, **init_configs: Any
    ) -> LoraConversion:
        """The structure as a `peft.LoraConfig`, with the trainable-parameter count and what had to change.

        LoRA candidates become `target_modules` (full module names) with `rank_pattern` / `alpha_pattern` such that
        every module's scaling is the search's lora_alpha / max_rank. BitFit on linear layers becomes
        bias='lora_only' and LNFit / BitFit on norms become `modules_to_save` where that trains exactly the same
        parameters. The cases where it cannot are listed in `LORA_CONVERSION_LIMITS`; `policy` decides what happens
        to them:

        - "raise": ValueError listing every candidate that is not expressible exactly.
        - "drop": leave them out; the LoraConfig trains a subset of the structure, exactly.
        - "approximate": train them with the closest LoraConfig option (whole norms via modules_to_save; for BitFit
          on linears bias='lora_only' when that trains fewer wrong bias parameters than bias='none'); adapters and
          BitFit on bias-free modules are still dropped. `num_trainable_params` reports the resulting count.

        `init_lora_weights` (and peft's sub-config of that initialisation, e.g. `lora_ga_config=`, `corda_config=`)
        go to the LoraConfig as they are: peft's initialisations `PEFT_LORA_INITS`, True (peft's default, the paper's
        fresh start) or False. For "eva" the LoraConfig gets `eva_config=EvaConfig(rho=1.0)` (or yours, with
        rho=1.0): a larger rho would let peft move ranks between modules, and the structure fixes them. As with any
        LoraConfig, the data-driven ones need peft's own step after `get_peft_model`: for "eva"
        `peft.tuners.lora.initialize_lora_eva_weights` (see `to_lora_config`), for "corda" and "lora_ga" peft's
        `preprocess_corda` / `preprocess_loraga` before it.
        """
        if policy not in LORA_POLICIES:
            raise ValueError(f"policy={policy!r} is not allowed; choose one of {list(LORA_POLICIES)}.")
        init_arguments = _lora_init_arguments(init_lora_weights, init_configs)
        self._check_not_empty()
        ranks = self.structure
        unknown = [module for module in ranks if module not in self.modules]
        if unknown:
            raise ValueError(
                f"modules has no entry for {unknown[:3]}{' ...' if len(unknown) > 3 else ''} ({len(unknown)} of the "
                f"structure's {len(ranks)} modules): the LoraConfig conversion needs a ModuleInfo (type, bias_params) "
                "for every module with a selected candidate, as `peft_s3.resolve` writes them. Resolve the search "
                "again, or retrain the structure with `apply_structure`, which does not need them."
            )
        lora_ranks = {
            module: kinds["lora"]
            for module, kinds in ranks.items()
            if "lora" in kinds and self.modules[module].type != "expert_parameter"
        }
        if not lora_ranks:
            raise ValueError(
                "The structure has no LoRA candidate, and a LoraConfig needs at least one LoRA target. Retrain it "
                "with `apply_structure` (an S3 fixed-structure adapter) instead."
            )
        issues: dict[str, str] = {}
        approximable: set[str] = set()
        norms_to_save: list[str] = []
        norm_params = 0
        bitfit_linears: dict[str, str] = {}
        for candidate in self.candidates:
            info = self.modules[candidate.module]
            if info.type == "expert_parameter":
                issues[candidate.name] = "expert_parameter"
            elif candidate.kind == "adapter":
                issues[candidate.name] = "adapter"
            elif candidate.kind == "bitfit" and info.bias_params == 0:
                issues[candidate.name] = "bitfit_without_bias"
            elif candidate.kind == "bitfit" and info.type in ("linear", "conv1d"):
                bitfit_linears[candidate.module] = candidate.name
        for module in ranks:
            info = self.modules[module]
            if info.type != "norm":
                continue
            names = {c.kind: c.name for c in self.candidates if c.module == module and c.kind in ("lnfit", "bitfit")}
            if info.bias_params == 0:
                names.pop("bitfit", None)
            if not names:
                continue
            exact = "lnfit" in names and ("bitfit" in names) == (info.bias_params > 0)
            if not exact:
                issues.update(dict.fromkeys(names.values(), "norm_whole"))
                approximable.update(names.values())
            if exact or policy == "approximate":
                norms_to_save.append(module)
                width = next(c.num_params for c in self.candidates if c.module == module and c.kind in names)
                norm_params += width + info.bias_params

        biased_targets = {module for module in lora_ranks if self.modules[module].bias_params > 0}
        bias = "lora_only" if bitfit_linears and set(bitfit_linears) == biased_targets else "none"
        if bitfit_linears and bias == "none":
            issues.update(dict.fromkeys(bitfit_linears.values(), "bitfit_lora_only"))
            if policy == "approximate":
                # Parameters trained wrongly: with 'lora_only' the BitFit linears that are no LoRA target are missed
                # and the LoRA targets without BitFit are trained; with 'none' every BitFit linear is missed.
                mismatch = set(bitfit_linears) ^ biased_targets
                if sum(self.modules[m].bias_params for m in mismatch) < sum(
                    self.modules[m].bias_params for m in bitfit_linears
                ):
                    bias = "lora_only"
                    approximable.update(bitfit_linears[m] for m in set(bitfit_linears) & biased_targets)

        if issues and policy == "raise":
            listed = "\n".join(f"- {name}: {LORA_CONVERSION_LIMITS[reason]}" for name, reason in issues.items())
            raise ValueError(
                f"{len(issues)} candidates of this structure cannot be expressed exactly as a LoraConfig:\n{listed}\n"
                "Pass policy='drop' to leave them out or policy='approximate' for the closest LoraConfig, or retrain "
                "the structure as it is with `apply_structure`."
            )
        num_params = sum(c.num_params for c in self.candidates if c.kind == "lora" and c.module in lora_ranks)
        num_params += norm_params
        if bias == "lora_only":
            num_params += sum(self.modules[module].bias_params for module in biased_targets)
        config = LoraConfig(
            task_type=self.task_type,
            base_model_name_or_path=self.base_model_name_or_path,
            r=self.max_rank,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=list(lora_ranks),
            fan_in_fan_out=all(self.modules[module].type == "conv1d" for module in lora_ranks),
            # Pattern keys are regexes to peft; escaping makes each full module name match only itself.
            rank_pattern={re.escape(m): r for m, r in lora_ranks.items() if r != self.max_rank},
            alpha_pattern={
                re.escape(m): self.lora_alpha * r / self.max_rank for m, r in lora_ranks.items() if r != self.max_rank
            },
            bias=bias,
            modules_to_save=[*self._own_modules_to_save(), *norms_to_save] or None,
            **init_arguments,
        )
        approximated = {
            name: reason for name, reason in issues.items() if policy == "approximate" and name in approximable
        }
        dropped = {name: reason for name, reason in issues.items() if name not in approximated}
        return LoraConversion(config, num_params, approximated, dropped)

    def to_lora_config(
        self, policy: str = "raise", init_lora_weights: Union[bool, str] = True, **init_configs: Any
    ) -> LoraConfig:
        """`lora_conversion(policy, init_lora_weights, **init_configs).config`, warning about every candidate that was
        dropped or approximated.

        With `init_lora_weights="eva"`, initialise the model as peft requires before training, with the directions
        from `peft_s3.lora_eva_state_dict`:

            model = peft.get_peft_model(base, structure.to_lora_config(init_lora_weights="eva"))
            peft.tuners.lora.initialize_lora_eva_weights(
                model, eva_state_dict=peft_s3.lora_eva_state_dict(model, dataloader)
            )

        `initialize_lora_eva_weights(model, dataloader)` computes them itself, but even at rho=1 it gives modules that
        read the same input (query, key and value) the largest rank among them and takes that rank from other
        modules (peft 0.21), so the structure's ranks change.
        """
        conversion = self.lora_conversion(policy, init_lora_weights, **init_configs)
        if not conversion.exact:
            warnings.warn(
                f"The LoraConfig differs from the searched structure: dropped {sorted(conversion.dropped)}, "
                f"approximated {sorted(conversion.approximated)} (reasons: peft_s3.structure.LORA_CONVERSION_LIMITS). "
                f"It trains {conversion.num_trainable_params} parameters in the adapted modules where the structure "
                f"has {self.num_trainable_params}.",
                stacklevel=2,
            )
        return conversion.config


def _lora_init_arguments(init_lora_weights: Union[bool, str], init_configs: dict[str, Any]) -> dict[str, Any]:
    """The LoraConfig arguments of an initialisation, checked: peft itself would fail only in get_peft_model."""
    named = isinstance(init_lora_weights, str) and (
        init_lora_weights in PEFT_LORA_INITS or re.fullmatch(r"pissa_niter_\d+", init_lora_weights) is not None
    )
    if not (isinstance(init_lora_weights, bool) or named):
        raise ValueError(
            f"init_lora_weights={init_lora_weights!r} is not allowed: use True (peft's default, the paper's fresh "
            f"start), False, 'pissa_niter_<n>' or one of {list(PEFT_LORA_INITS)}. The S3 initialisations "
            f"{list(RETRAIN_INITS)} are `apply_structure(..., init=...)`'s."
        )
    unknown = sorted(set(init_configs) - set(LORA_INIT_CONFIGS))
    if unknown:
        raise ValueError(
            f"{unknown} are not allowed here: besides init_lora_weights, only peft's initialisation sub-configs "
            f"{list(LORA_INIT_CONFIGS)} pass through (the conversion sets every other LoraConfig field)."
        )
    if init_lora_weights == "eva":
        eva_config = init_configs.get("eva_config") or EvaConfig(rho=1.0)
        if eva_config.rho != 1.0:
            raise ValueError(
                f"eva_config.rho={eva_config.rho!r} is not allowed: peft's EVA gives a module up to rank r * rho, "
                "moving ranks between modules, and the structure fixes every module's rank. Use rho=1.0."
            )
        init_configs = {**init_configs, "eva_config": eva_config}
    return {"init_lora_weights": init_lora_weights, **init_configs}


def _structure_file(path: Union[str, Path]) -> Path:
    path = Path(path)
    return path if path.suffix == ".json" else path / STRUCTURE_FILE


# The JSON types of the fields of a saved candidate row and module entry.
_ROW_TYPES: dict[str, tuple[type, ...]] = {
    "module": (str,),
    "kind": (str,),
    "slot": (int,),
    "num_params": (int,),
    "stack": (str, type(None)),
    "layer": (int, type(None)),
    "position": (str,),
    "p": (int, float),
    "selected": (bool,),
}
_MODULE_TYPES: dict[str, tuple[type, ...]] = {"type": (str,), "bias_params": (int,)}


def _has_type(value: Any, allowed: tuple[type, ...]) -> bool:
    # bool is an int to Python, but true/false in the file is no count.
    return isinstance(value, allowed) and (bool in allowed or not isinstance(value, bool))


def _check_types(where: str, values: dict[str, Any], types: dict[str, tuple[type, ...]]) -> None:
    for name, value in values.items():
        if not _has_type(value, types[name]):
            allowed = " or ".join("null" if t is type(None) else t.__name__ for t in types[name])
            raise ValueError(f"{where}.{name}={value!r} is not allowed: it must be {allowed}.")


def _scored_candidate(file: Path, index: int, row: Any) -> ScoredCandidate:
    if not isinstance(row, dict):
        raise ValueError(f"{file}: search_space[{index}] is a {type(row).__name__}, not a candidate object.")
    fields = {f.name for f in dataclasses.fields(ScoredCandidate)}
    missing, unexpected = sorted(fields - set(row)), sorted(set(row) - fields)
    if missing or unexpected:
        raise ValueError(
            f"{file}: search_space[{index}] is not a scored candidate: missing keys {missing}, unexpected keys "
            f"{unexpected}. Each row needs exactly {sorted(fields)}."
        )
    where = f"{file}: search_space[{index}]"
    _check_types(where, row, _ROW_TYPES)
    if row["kind"] not in CANDIDATE_KINDS:
        raise ValueError(f"{where}.kind={row['kind']!r} is not allowed: choose one of {list(CANDIDATE_KINDS)}.")
    if row["num_params"] < 1:
        raise ValueError(f"{where}.num_params={row['num_params']!r} is not allowed: it must be >= 1.")
    return ScoredCandidate(**row)


def _module_info(file: Path, name: str, info: Any) -> ModuleInfo:
    if not isinstance(info, dict) or set(info) != set(_MODULE_TYPES):
        raise ValueError(
            f"{file}: modules[{name!r}]={info!r} is not allowed: it must be an object with keys "
            f"{sorted(_MODULE_TYPES)}."
        )
    _check_types(f"{file}: modules[{name!r}]", info, _MODULE_TYPES)
    return ModuleInfo(**info)


def apply_structure(
    base_model: nn.Module,
    structure: Union[SearchedStructure, str, Path],
    adapter_name: str = "default",
    revision: Optional[str] = None,
    *,
    init: Optional[str] = None,
    init_dataloader: Optional[Iterable] = None,
    eva_config: Optional[EvaInitConfig] = None,
    init_from: Optional[Any] = None,
) -> PeftModel:
    """A PeftModel with exactly `structure`'s candidates on `base_model`, initialised and ready to retrain.

    `structure` is a `SearchedStructure`, or a local path or Hub repo id for `SearchedStructure.from_pretrained`
    (with `revision`).

    `init` says how the candidates start (`peft_s3.tuner.config.RETRAIN_INITS`); the adapter config records it as
    `retrain_init`. The default is "inherit" when `init_from` is given and "fresh" otherwise: inheriting won the
    paired grid of initialisations (benchmarks/README.md, "Retraining initialisations (issue 25)"), and a structure
    loaded without its search model has nothing to inherit.

    - "fresh" (the paper's): LoRA A Kaiming-uniform; LoRA B, BitFit and LNFit deltas and adapter up-projections zero.
    - "eva" (data-driven, EVA's idea at the structure's ranks): each module's LoRA A is the top principal directions
      of the module's input activations on the batches of `init_dataloader` (mappings of model inputs, as for
      peft's `initialize_lora_eva_weights`; `eva_config` an `EvaInitConfig` for the number of batches and the label
      mask), computed like peft's EVA (incremental PCA); a low-rank adapter's down-projection likewise from the
      module's output. B, the up-projections and the BitFit / LNFit deltas stay zero, so the model starts as the base
      model. LoRA slices on fused expert weights are refused.
    - "inherit" (weight inheritance): each selected candidate starts from its trained weights in `init_from`, the
      search model (PeftModel) the structure was resolved from, as do modules_to_save such as a classification
      head; the model then computes what the search model computes with its gates fixed to the structure.
      `base_model` must carry the search base's weights (checked on the modules that carry candidates).

    peft's LoRA initialisations (pissa, olora, corda, lora_ga, gaussian, ...) apply through
    `structure.to_lora_config(init_lora_weights=...)`.

    `base_model` may be another instance of the architecture the structure was searched on, e.g. to transfer a
    structure found on one task to another. A model whose modules have other sizes gets the same positions with its
    own parameter counts, and a warning. It must be a plain base: not the search's PeftModel, and not a base that
    a search wrapped in place (see `peft_s3.tuner.model.check_unwrapped_base`).
    """
    # Before get_peft_model: peft's tuner writes its config into the peft_config dict of a wrapped base it is given.
    check_unwrapped_base(base_model)
    if not isinstance(structure, SearchedStructure):
        structure = SearchedStructure.from_pretrained(structure, revision)
    elif revision is not None:
        raise ValueError(f"revision={revision!r} applies to a structure given by repo id or path, not to an object.")
    if init is None:
        init = "fresh" if init_from is None else "inherit"
    config = structure.to_peft_config(retrain_init=init)
    _check_init_arguments(init, init_dataloader, eva_config, init_from)
    # Everything that can be refused is refused here, before get_peft_model changes the base in place.
    if init == "eva":
        check_eva_applies(base_model, structure)
    elif init == "inherit":
        check_inheritable(base_model, structure, init_from)
    model = get_peft_model(base_model, config, adapter_name=adapter_name)
    built = sum(candidate.num_params for candidate in model.base_model.candidates(adapter_name))
    if built != structure.num_trainable_params:
        warnings.warn(
            f"The structure has {structure.num_trainable_params} trainable parameters on the model it was searched "
            f"on, but {built} on this {type(base_model).__name__}: its modules have other sizes.",
            stacklevel=2,
        )
    if init == "eva":
        eva_initialise(model, adapter_name, init_dataloader, eva_config or EvaInitConfig())
    elif init == "inherit":
        inherit_weights(model, adapter_name, structure, init_from)
    return model


def _check_init_arguments(
    init: str, init_dataloader: Optional[Iterable], eva_config: Optional[EvaInitConfig], init_from: Optional[Any]
) -> None:
    """Each initialisation gets exactly the arguments it uses (`init` itself is checked by S3SearchConfig)."""
    if init == "eva" and init_dataloader is None:
        raise ValueError(
            "init='eva' needs data: pass init_dataloader= an iterable of model-input batches (e.g. a DataLoader of "
            "a few training batches), whose activations give each module's directions."
        )
    if eva_config is not None and not isinstance(eva_config, EvaInitConfig):
        raise ValueError(
            f"eva_config={eva_config!r} is not allowed: pass a peft_s3.retrain_init.EvaInitConfig (peft's EvaConfig "
            "is for `to_lora_config(init_lora_weights='eva')`: its rho and tau do not apply to a fixed structure)."
        )
    if init == "inherit" and init_from is None:
        raise ValueError(
            "init='inherit' needs init_from= the search model (PeftModel) the structure was resolved from."
        )
    unused = [
        name
        for name, value, used_by in (
            ("init_dataloader", init_dataloader, "eva"),
            ("eva_config", eva_config, "eva"),
            ("init_from", init_from, "inherit"),
        )
        if value is not None and init != used_by
    ]
    if unused:
        raise ValueError(
            f"{unused} do not apply to init={init!r}: init_dataloader and eva_config are for init='eva', "
            "init_from for init='inherit'."
        )

"""Configuration of the S3 structure-search tuner."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from peft.config import PeftConfig
from peft.utils import PeftType
from transformers.activations import ACT2FN

CANDIDATE_KINDS = ("lora", "bitfit", "lnfit", "adapter")
MIX_SPACE = CANDIDATE_KINDS
LORA_SPACE = ("lora",)
RETRAIN_INITS = ("fresh", "eva", "inherit")


@dataclass
class S3SearchConfig(PeftConfig):
    """
    Configuration of [`S3Model`]: a search space of gated parameter-efficient candidates and the trainable-parameter
    budget that the search must respect (S3PET, "Sparse Structure Search for Parameter-Efficient Tuning").

    The same config type describes a *fixed* structure (`structure` given, no `budget`): exactly the listed candidates
    are created, their gates are open and there are no structural parameters. That is what a searched structure turns
    into for retraining, so a searched structure reloads exactly.
    """

    budget: Optional[Union[float, int]] = field(
        default=None,
        metadata={
            "help": (
                "Trainable-parameter budget of the searched structure. A float in (0, 1) is a fraction of the "
                "backbone's parameters (e.g. 1e-4 = 1 per ten thousand); an int >= 1 is an absolute count. "
                "Required in search mode, must be None in fixed-structure mode."
            )
        },
    )
    candidate_kinds: list[str] = field(
        default_factory=lambda: list(MIX_SPACE),
        metadata={
            "help": (
                f"Kinds of candidates in the search space, a subset of {list(CANDIDATE_KINDS)}. The default is the "
                "paper's Mix space (S3PET-M); ['lora'] gives the LoRA-only space (S3PET-L)."
            )
        },
    )
    target_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Linear (or GPT-2 Conv1D) modules that get LoRA and BitFit candidates: a list of names matched "
                "exactly or as a '.'-suffix, or a regex matched against the full name (peft's convention). "
                "Default: every linear layer inside the transformer blocks."
            )
        },
    )
    norm_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Normalisation modules (LayerNorm, RMSNorm, T5LayerNorm, ...) that get LNFit and BitFit "
                "candidates, matched like target_modules. Default: every norm inside the transformer blocks."
            )
        },
    )
    adapter_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules whose output gets a low-rank adapter candidate, matched like target_modules. Any module "
                "works, also one returning a tuple (the adapter acts on the first element). Default: the output "
                "projection of every attention block and of every feed-forward block."
            )
        },
    )
    exclude_modules: Optional[Union[list[str], str]] = field(
        default=None,
        metadata={"help": "Modules never to put a candidate on, matched like target_modules."},
    )
    max_rank: int = field(
        default=1,
        metadata={
            "help": (
                "Largest LoRA rank per linear module. Each rank-1 slice is its own candidate, so the rank of every "
                "module falls out of the search. The paper uses 1."
            )
        },
    )
    lora_alpha: float = field(
        default=8,
        metadata={"help": "LoRA alpha; as in peft, the LoRA update is scaled by lora_alpha / max_rank."},
    )
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the input of the LoRA branch."})
    adapter_rank: int = field(default=1, metadata={"help": "Bottleneck width of each low-rank adapter candidate."})
    adapter_activation: str = field(
        default="relu",
        metadata={"help": "Activation between the adapter's down and up projection (a name in ACT2FN)."},
    )
    tau: float = field(
        default=0.1,
        metadata={
            "help": (
                "Temperature of the shifted global sigmoid p = sigmoid((alpha - zeta) / tau) at the end of the search "
                "and in the gate report. S3SearchTrainer anneals it from 1 (the paper's value) by default, so the "
                "gates end decided (p near 0 or 1)."
            )
        },
    )
    beta: float = field(default=1.0, metadata={"help": "Temperature of the binary-concrete gate relaxation."})
    hard_gates: bool = field(
        default=False,
        metadata={"help": "Use straight-through hard gates (forward 0/1, backward through the relaxed sample)."},
    )
    alpha_init: float = field(default=0.0, metadata={"help": "Initial value of every structural parameter alpha."})
    init_weights: bool = field(
        default=True,
        metadata={
            "help": (
                "Initialise every candidate so that it starts as the identity (LoRA B, adapter up-projection, bias "
                "and scale deltas at zero). False gives random deltas, which is only useful for tests."
            )
        },
    )
    structure: Optional[dict[str, dict[str, int]]] = field(
        default=None,
        metadata={
            "help": (
                "Fixed-structure mode: {module name: {kind: count}}, count being the LoRA rank for 'lora' and 1 for "
                "the other kinds. Usually produced by `SearchedStructure.to_peft_config()`."
            )
        },
    )
    modules_to_save: Optional[list[str]] = field(
        default=None,
        metadata={
            "help": (
                "Modules besides the candidates that are trained and saved in full, e.g. a freshly initialised "
                "classification head. They do not count towards the budget."
            )
        },
    )
    retrain_init: str = field(
        default="fresh",
        metadata={
            "help": (
                f"How `apply_structure` initialised a fixed structure's candidates, one of {list(RETRAIN_INITS)}: "
                "'fresh' (the paper's: LoRA A and adapter down-projections Kaiming-uniform, everything else zero), "
                "'eva' (LoRA A and adapter down-projections from the principal directions of what they read, over a "
                "few batches) or 'inherit' (the search's trained weights). A record of how the adapter was trained; "
                "a search is always 'fresh'."
            )
        },
    )
    search_space_signature: Optional[str] = field(
        default=None,
        metadata={
            "help": (
                "Set when the adapter is created: a digest of the candidate list. Loading a checkpoint into a model "
                "whose search space differs (another architecture or size) is refused instead of misloading alphas."
            )
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        self.peft_type = PeftType.S3
        # peft appends the classifier names to modules_to_save in place; a copy keeps the caller's list intact.
        if self.modules_to_save is not None:
            self.modules_to_save = list(self.modules_to_save)
        if isinstance(self.candidate_kinds, str):
            self.candidate_kinds = [self.candidate_kinds]
        self.candidate_kinds = list(self.candidate_kinds)
        unknown = sorted(set(self.candidate_kinds) - set(CANDIDATE_KINDS))
        if unknown or not self.candidate_kinds:
            raise ValueError(
                f"candidate_kinds={self.candidate_kinds!r} is not allowed: use a non-empty subset of "
                f"{list(CANDIDATE_KINDS)}."
            )
        if self.retrain_init not in RETRAIN_INITS:
            raise ValueError(
                f"retrain_init={self.retrain_init!r} (apply_structure's init) is not allowed: choose one of "
                f"{list(RETRAIN_INITS)}. peft's LoRA initialisations (pissa, olora, corda, lora_ga, gaussian, ...) "
                "apply to the structure as a LoraConfig: "
                "`peft.get_peft_model(base, structure.to_lora_config(init_lora_weights=...))`."
            )
        if self.structure is None and self.retrain_init != "fresh":
            raise ValueError(
                f"retrain_init={self.retrain_init!r} is not allowed for a search (no `structure`): a search starts "
                "'fresh'; the other initialisations retrain a searched structure (`apply_structure`)."
            )
        if self.structure is None:
            self._validate_budget()
        elif self.budget is not None:
            raise ValueError(
                "Pass either `budget` (search mode) or `structure` (fixed-structure mode), not both: "
                f"got budget={self.budget!r} and a structure of {len(self.structure)} modules."
            )
        else:
            self._validate_structure()
        for name in ("max_rank", "adapter_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}={value!r} is not allowed: it must be an int >= 1.")
        for name in ("tau", "beta"):
            value = getattr(self, name)
            if not (_is_real(value) and 0 < value < math.inf):
                raise ValueError(f"{name}={value!r} is not allowed: the temperature must be a finite number > 0.")
            setattr(self, name, float(value))
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout={self.lora_dropout!r} is not allowed: it must be in [0, 1).")
        if self.adapter_activation not in ACT2FN:
            raise ValueError(
                f"adapter_activation={self.adapter_activation!r} is unknown; choose one of {sorted(ACT2FN)}."
            )

    def _validate_budget(self) -> None:
        # NumPy and 0-d torch scalars are real numbers too; plain Python numbers keep the config JSON-serialisable.
        if isinstance(self.budget, torch.Tensor) and self.budget.ndim == 0 and self.budget.dtype != torch.bool:
            self.budget = self.budget.detach().cpu().numpy()[()]
        if _is_real(self.budget):
            # str() of a NumPy float is its shortest round-trip decimal, so float32(0.01) stays 0.01, not 0.0099999998.
            self.budget = int(self.budget) if isinstance(self.budget, numbers.Integral) else float(str(self.budget))
        budget = self.budget
        if budget is None:
            raise ValueError(
                "S3SearchConfig needs a `budget`: a fraction of the backbone's parameters (float in (0, 1)) or an "
                "absolute parameter count (int >= 1); or a `structure` for fixed-structure mode."
            )
        if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not math.isfinite(budget):
            raise ValueError(f"budget={budget!r} is not allowed: use a float in (0, 1) or an int >= 1.")
        if budget <= 0:
            raise ValueError(f"budget={budget!r} is not allowed: it must be > 0 (a float in (0, 1) or an int >= 1).")
        if budget >= 1 and float(budget) != int(budget):
            raise ValueError(
                f"budget={budget!r} is not allowed: a budget >= 1 is an absolute parameter count and must be whole; "
                "a fraction of the backbone must be < 1."
            )

    def _validate_structure(self) -> None:
        if not isinstance(self.structure, dict) or not self.structure:
            raise ValueError(
                f"structure={self.structure!r} is not allowed: fixed-structure mode needs a non-empty dict "
                "{module name: {kind: count}}."
            )
        for module, kinds in self.structure.items():
            if not isinstance(kinds, dict) or not kinds:
                raise ValueError(
                    f"structure[{module!r}]={kinds!r} is not allowed: give a non-empty dict {{kind: count}} with "
                    f"kinds from {list(CANDIDATE_KINDS)}."
                )
            for kind, count in kinds.items():
                if kind not in CANDIDATE_KINDS:
                    raise ValueError(
                        f"structure[{module!r}] asks for kind {kind!r}, which is unknown; choose from "
                        f"{list(CANDIDATE_KINDS)}."
                    )
                # Only LoRA has a count (its rank); every other kind is a single candidate per module.
                valid = count >= 1 if kind == "lora" else count == 1
                if isinstance(count, bool) or not isinstance(count, int) or not valid:
                    allowed = "an int >= 1 (the LoRA rank)" if kind == "lora" else "1"
                    raise ValueError(
                        f"structure[{module!r}][{kind!r}]={count!r} is not allowed: the count must be {allowed}."
                    )

    @property
    def is_search(self) -> bool:
        return self.structure is None

    def absolute_budget(self, backbone_params: int) -> int:
        """The budget as a parameter count, given the number of parameters of the backbone."""
        if self.budget is None:
            raise ValueError("A fixed-structure config has no budget.")
        if self.budget < 1:
            return int(self.budget * backbone_params)
        return int(self.budget)


def _is_real(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def string_pattern_hint(patterns: Optional[Union[list[str], str]]) -> str:
    """For an error about module patterns that matched nothing: what a string means to peft, and the likely intent."""
    if not isinstance(patterns, str):
        return ""
    hint = " A string is a regular expression that must match the whole module name (peft's convention)"
    if all(part.isidentifier() for part in patterns.split(".")):
        return (
            f"{hint}, so {patterns!r} matches only a module whose full name is exactly {patterns!r}. To match every "
            f"module whose name ends in it, pass a list: [{patterns!r}]."
        )
    return f"{hint}. Match the full name (e.g. r'.*\\.q_proj') or pass a list of names."

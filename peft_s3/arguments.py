"""The options of a structure search as dataclass fields: `SearchOptions`, `S3SearchArguments` and `S3SFTConfig`.

`SearchOptions` holds every option of one search with its default, its `help` and its validation. It is both the
standalone set of options a trainer works from and the mixin that turns a `TrainingArguments` into one that
`HfArgumentParser` fills from a command line or a YAML/JSON file:

    >>> parser = HfArgumentParser(S3SearchArguments)
    >>> (args,) = parser.parse_args_into_dataclasses(["--output_dir", "search", "--bilevel", "first_order"])
    >>> args.bilevel, args.annealing
    ('first_order', SearchAnnealing(budget_from=4.0, tau_from=1.0, beta_from=None, fraction=0.5))

`SearchOptions.from_arguments(args, **overrides)` gives the options of a run from any `TrainingArguments` (those of
an `S3SearchArguments` / `S3SFTConfig`, else the defaults) with keyword arguments taking precedence, validated once.
"""

from __future__ import annotations

import functools
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Optional, Union

from transformers import TrainingArguments

from .annealing import DEFAULT_ANNEALING, SearchAnnealing
from .estimators import FINITE_DIFFERENCES
from .selection import SELECTION_METHODS

BILEVEL_MODES = ("first_order", "second_order")
# transformers scheduler types that need nothing but a step count.
ALPHA_LR_SCHEDULER_TYPES = ("linear", "cosine", "constant")
# Strings that mean "no annealing" where a command line cannot write None.
_NO_ANNEALING = ("none", "null")


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class SearchOptions:
    """
    Every option of one S3PET structure search, with its default, its `help` and its validation: the one place the
    trainers (`S3SearchTrainer`, `S3SFTTrainer`) and `S3SearchCallback` take them from.

    A plain `SearchOptions(...)` is the validated set of options of one search; mixed into a `TrainingArguments`
    (`S3SearchArguments`, `S3SFTConfig`) the same fields become command-line and config-file options.

    `annealing` takes a `SearchAnnealing`, a dict of its fields (the missing ones take `SearchAnnealing`'s defaults),
    that dict as a JSON string (the form a command line gives), `None`, or the string `"none"`; after construction it
    holds a `SearchAnnealing` or `None`. `alpha_warmup_steps` given as an integral float (a command line parses it as
    a float) becomes that int: 0.0 and 0 both mean no warm-up, and a float >= 1 can only be a step count.
    """

    search_split: Optional[float] = field(
        default=None,
        metadata={
            "help": "Fraction of train_dataset split off as D_alpha, the data of the structural parameters, when no "
            "search_dataset is given; a float in (0, 1). None: 0.5, as in the paper."
        },
    )
    alpha_learning_rate: float = field(
        default=0.5,
        metadata={
            "help": "Learning rate of the AdamW that updates alpha. The paper's 0.1 is meant for thousands of steps; "
            "0.5 decides the gates in the few dozen to hundreds of steps of a short fine-tuning run."
        },
    )
    alpha_weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the alpha AdamW (>= 0)."})
    alpha_lr_scheduler_type: str = field(
        default="constant",
        metadata={
            "help": "Schedule of the alpha learning rate over the search steps: one of "
            f"{list(ALPHA_LR_SCHEDULER_TYPES)}. A rate that decays to 0 leaves the last few gates undecided."
        },
    )
    bilevel: str = field(
        default="second_order",
        metadata={
            "help": f"The alpha gradient, one of {list(BILEVEL_MODES)}: second_order is DARTS' unrolled gradient "
            "(the paper's Algorithm 1, 3-4 passes per step), first_order the gradient at the current delta (2 passes)."
        },
    )
    unrolled_learning_rate: Optional[float] = field(
        default=None,
        metadata={
            "help": "xi, the step size of second order's virtual delta update (a finite float >= 0; 0 drops the "
            "Hessian term and its finite-difference passes: 2 passes per step). None: the delta learning rate in "
            "force at that step, as the paper defines xi."
        },
    )
    finite_difference: str = field(
        default="central",
        metadata={
            "help": f"How second order approximates the Hessian-vector product, one of {list(FINITE_DIFFERENCES)}: "
            "central is the paper's eq. 13 (two extra passes), forward takes one."
        },
    )
    finite_difference_epsilon: float = field(
        default=0.01,
        metadata={
            "help": "The finite-difference step is this (a finite float > 0) divided by the norm of the gradient it "
            "perturbs along, as in DARTS."
        },
    )
    alpha_warmup_steps: float = field(
        default=0,
        metadata={
            "help": "Optimizer steps at the start during which only delta trains: an int >= 0 is a count, a float in "
            "[0, 1) a share of the run's steps (as warmup_steps)."
        },
    )
    alpha_update_interval: int = field(
        default=1,
        metadata={
            "help": "Update alpha every k-th optimizer step of the search (an int >= 1; 1 is the paper); the steps "
            "between are plain delta steps."
        },
    )
    annealing: Optional[Union[dict, str]] = field(
        default_factory=lambda: asdict(DEFAULT_ANNEALING),
        metadata={
            "help": "Budget and temperature schedules at the start of the search, as a JSON object of "
            "SearchAnnealing's fields (budget_from, tau_from, beta_from, fraction; missing ones take "
            "SearchAnnealing's defaults), or none for no schedule. Default: peft_s3.DEFAULT_ANNEALING, "
            f"{json.dumps(asdict(DEFAULT_ANNEALING))}."
        },
    )
    selection_method: str = field(
        default="exact",
        metadata={
            "help": "How the structure is chosen from the gates (resolve's method), one of "
            f"{list(SELECTION_METHODS)}: exact is the paper's rule (highest sum of p within the budget), greedy "
            "takes candidates by p."
        },
    )
    select_on_validation: bool = field(
        default=False,
        metadata={
            "help": "Evaluate the structure resolve would pick at each evaluation (needs an eval dataset and an "
            "eval_strategy) and keep the best one by metric_for_best_model, as the paper does every I_eval steps."
        },
    )
    stop_when_stable: Optional[int] = field(
        default=None,
        metadata={
            "help": "Stop the search once the structure resolve would pick has not changed for this many optimizer "
            "steps after the annealing (an int >= 1). None: run all steps."
        },
    )
    close_unfittable: bool = field(
        default=True,
        metadata={
            "help": "After the annealing, close the gates of candidates that no longer fit beside the decided ones, "
            "so the expected size moves to candidates resolve can take."
        },
    )
    close_overflow: bool = field(
        default=True,
        metadata={
            "help": "With close_unfittable: when the decided candidates together exceed the budget, keep the subset "
            "of them that fits and holds the most expected size, and close the others."
        },
    )

    def __post_init__(self) -> None:
        self._check_and_normalise()
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:
            parent()

    def _check_and_normalise(self) -> None:
        if self.search_split is not None and not (_is_real(self.search_split) and 0 < self.search_split < 1):
            raise ValueError(f"search_split={self.search_split!r} is not allowed: it must be a float in (0, 1).")
        if not (_is_real(self.alpha_learning_rate) and 0 < self.alpha_learning_rate < math.inf):
            raise ValueError(
                f"alpha_learning_rate={self.alpha_learning_rate!r} is not allowed: it must be a finite float > 0."
            )
        if not (_is_real(self.alpha_weight_decay) and 0 <= self.alpha_weight_decay < math.inf):
            raise ValueError(
                f"alpha_weight_decay={self.alpha_weight_decay!r} is not allowed: it must be a finite float >= 0."
            )
        warmup = self.alpha_warmup_steps
        if isinstance(warmup, float) and warmup >= 0 and warmup.is_integer():
            self.alpha_warmup_steps = warmup = int(warmup)
        is_steps = isinstance(warmup, int) and warmup >= 0
        is_ratio = isinstance(warmup, float) and 0 <= warmup < 1
        if isinstance(warmup, bool) or not (is_steps or is_ratio):
            raise ValueError(
                f"alpha_warmup_steps={warmup!r} is not allowed: use an int >= 0 (optimizer steps) or a float in "
                "[0, 1) (a share of the run's optimizer steps)."
            )
        if self.alpha_lr_scheduler_type not in ALPHA_LR_SCHEDULER_TYPES:
            raise ValueError(
                f"alpha_lr_scheduler_type={self.alpha_lr_scheduler_type!r} is not allowed: choose one of "
                f"{list(ALPHA_LR_SCHEDULER_TYPES)}."
            )
        if self.bilevel not in BILEVEL_MODES:
            raise ValueError(f"bilevel={self.bilevel!r} is not allowed: choose one of {list(BILEVEL_MODES)}.")
        if self.unrolled_learning_rate is not None and not (
            _is_real(self.unrolled_learning_rate) and 0 <= self.unrolled_learning_rate < math.inf
        ):
            raise ValueError(
                f"unrolled_learning_rate={self.unrolled_learning_rate!r} is not allowed: it must be a finite float "
                ">= 0, or None for the delta learning rate in force at the step."
            )
        if self.finite_difference not in FINITE_DIFFERENCES:
            raise ValueError(
                f"finite_difference={self.finite_difference!r} is not allowed: choose one of "
                f"{list(FINITE_DIFFERENCES)}."
            )
        if not (_is_real(self.finite_difference_epsilon) and 0 < self.finite_difference_epsilon < math.inf):
            raise ValueError(
                f"finite_difference_epsilon={self.finite_difference_epsilon!r} is not allowed: it must be a finite "
                "float > 0."
            )
        if not _is_positive_int(self.alpha_update_interval):
            raise ValueError(
                f"alpha_update_interval={self.alpha_update_interval!r} is not allowed: use an int >= 1 (1 updates "
                "alpha at every optimizer step, as the paper does)."
            )
        self.annealing = _search_annealing(self.annealing)
        if self.selection_method not in SELECTION_METHODS:
            raise ValueError(
                f"selection_method={self.selection_method!r} is not allowed: choose one of {list(SELECTION_METHODS)}."
            )
        if self.stop_when_stable is not None and not _is_positive_int(self.stop_when_stable):
            raise ValueError(f"stop_when_stable={self.stop_when_stable!r} is not allowed: use an int >= 1, or None.")
        for name in ("select_on_validation", "close_unfittable", "close_overflow"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}={getattr(self, name)!r} is not allowed: use True or False.")

    def to_dict(self) -> dict[str, Any]:
        """The options as plain JSON values, `annealing` as the dict of its fields (or None); mixed into a
        `TrainingArguments`, its `to_dict` with that change, so the arguments still serialise to JSON
        (`to_json_string`) and a dict of them builds them again."""
        parent = getattr(super(), "to_dict", None)
        values = parent() if parent is not None else {name: getattr(self, name) for name in self.names()}
        values["annealing"] = None if self.annealing is None else asdict(self.annealing)
        return values

    @staticmethod
    def names() -> tuple[str, ...]:
        """The option names, which the trainers also take as keyword arguments (overriding `args`)."""
        return tuple(option.name for option in fields(SearchOptions))

    @classmethod
    def from_arguments(cls, args: Optional[TrainingArguments] = None, **overrides: Any) -> SearchOptions:
        """The options of a run: those of `args` when it carries them (an `S3SearchArguments` or `S3SFTConfig`),
        else the defaults, with `overrides` (keyword arguments of the trainer) taking precedence; validated once.

        Raises a ValueError naming any override that is not a search option.
        """
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ValueError(f"{unknown} are not search options; the search options are {list(cls.names())}.")
        values = {name: getattr(args, name) for name in cls.names()} if isinstance(args, SearchOptions) else {}
        return SearchOptions(**{**values, **overrides})


def _search_annealing(annealing: Any) -> Optional[SearchAnnealing]:
    if isinstance(annealing, str):
        if annealing.strip().lower() in _NO_ANNEALING:
            return None
        try:
            annealing = json.loads(annealing)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"annealing={annealing!r} is not allowed: give a JSON object of SearchAnnealing's fields, such as "
                f"{json.dumps(asdict(DEFAULT_ANNEALING))}, or none ({error})."
            ) from None
    if isinstance(annealing, dict):
        unknown = sorted(set(annealing) - {option.name for option in fields(SearchAnnealing)})
        if unknown:
            raise ValueError(
                f"annealing={annealing!r} is not allowed: {unknown} are not fields of SearchAnnealing, whose fields "
                f"are {[option.name for option in fields(SearchAnnealing)]}."
            )
        return SearchAnnealing(**annealing)
    if annealing is not None and not isinstance(annealing, SearchAnnealing):
        raise ValueError(
            f"annealing={annealing!r} is not allowed: pass a SearchAnnealing, a dict of its fields, or None."
        )
    return annealing


@dataclass
class S3SearchArguments(SearchOptions, TrainingArguments):
    """
    `transformers.TrainingArguments` plus every option of the S3PET structure search (`SearchOptions`), for
    `S3SearchTrainer` and for scripts that read their configuration with `HfArgumentParser`.

    Example:

        ```py
        >>> from transformers import HfArgumentParser
        >>> (args,) = HfArgumentParser(peft_s3.S3SearchArguments).parse_yaml_file("search.yaml")
        >>> trainer = peft_s3.S3SearchTrainer(model=model, args=args, train_dataset=data)  # with args' options
        ```
    """


@functools.cache
def _s3_sft_config() -> type:
    # TRL is an optional extra and slow to import: the class is built on first access to `S3SFTConfig`.
    try:
        from trl import SFTConfig
    except ImportError as error:
        raise ImportError(
            "peft_s3.arguments.S3SFTConfig needs TRL: install it with `pip install 'peft-s3[trl]'` (or `pip install "
            "trl`)."
        ) from error

    @dataclass
    class S3SFTConfig(SearchOptions, SFTConfig):
        """TRL's `SFTConfig` plus every option of the S3PET structure search (`SearchOptions`), for
        `peft_s3.sft.S3SFTTrainer` (the `trl` extra)."""

    # Pickling (the Trainer saves its arguments in every checkpoint) finds the class by this name in the module.
    S3SFTConfig.__qualname__ = "S3SFTConfig"
    return S3SFTConfig


def __getattr__(name: str) -> Any:
    if name == "S3SFTConfig":
        return _s3_sft_config()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

"""peft-s3: Sparse Structure Search for Parameter-Efficient Tuning (S3PET) as a peft method.

Importing the package registers the method with peft, after which `peft.get_peft_model(model, S3SearchConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work as for any built-in method.
"""

from . import data, metrics
from ._registration import register
from .annealing import DEFAULT_ANNEALING, SearchAnnealing
from .arguments import S3SearchArguments, SearchOptions
from .gate_report import gate_report, load_gate_report, save_gate_report
from .plotting import plot_structure, structure_matrix
from .resolution import resolve
from .retrain_init import EvaInitConfig, lora_eva_state_dict
from .sharing import push_to_hub_with_structure, save_pretrained_with_structure, write_model_card
from .structure import SearchedStructure, apply_structure
from .trainer import S3SearchCallback, S3SearchTrainer, SearchDivergedError
from .tuner import CANDIDATE_KINDS, LORA_SPACE, MIX_SPACE, Candidate, S3Model, S3SearchConfig

register()

__version__ = "0.1.0"

__all__ = [
    "CANDIDATE_KINDS",
    "DEFAULT_ANNEALING",
    "EvaInitConfig",
    "LORA_SPACE",
    "MIX_SPACE",
    "Candidate",
    "S3Model",
    "S3SearchArguments",
    "S3SearchCallback",
    "S3SearchConfig",
    "S3SearchTrainer",
    "SearchAnnealing",
    "SearchDivergedError",
    "SearchOptions",
    "SearchedStructure",
    "__version__",
    "apply_structure",
    "data",
    "gate_report",
    "load_gate_report",
    "lora_eva_state_dict",
    "metrics",
    "plot_structure",
    "push_to_hub_with_structure",
    "resolve",
    "save_gate_report",
    "save_pretrained_with_structure",
    "structure_matrix",
    "write_model_card",
]

"""peft-s3: Sparse Structure Search for Parameter-Efficient Tuning (S3PET) as a peft method.

Importing the package registers the method with peft, after which `peft.get_peft_model(model, S3SearchConfig(...))`,
`PeftConfig.from_pretrained` and `PeftModel.from_pretrained` work as for any built-in method.
"""

from ._registration import register
from .tuner import CANDIDATE_KINDS, LORA_SPACE, MIX_SPACE, Candidate, S3Model, S3SearchConfig

register()

__version__ = "0.1.0"

__all__ = ["CANDIDATE_KINDS", "LORA_SPACE", "MIX_SPACE", "Candidate", "S3Model", "S3SearchConfig", "__version__"]

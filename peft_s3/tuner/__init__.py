from .config import CANDIDATE_KINDS, LORA_SPACE, MIX_SPACE, S3SearchConfig
from .gates import GateBank
from .layer import S3Block, S3Layer, S3Linear, S3Norm
from .model import S3Model
from .search_space import Candidate

__all__ = [
    "CANDIDATE_KINDS",
    "LORA_SPACE",
    "MIX_SPACE",
    "Candidate",
    "GateBank",
    "S3Block",
    "S3Layer",
    "S3Linear",
    "S3Model",
    "S3Norm",
    "S3SearchConfig",
]

"""Registers the S3 search method with peft, idempotently, so `import peft_s3` is all a user needs."""

from __future__ import annotations

import aenum
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING
from peft.utils import PeftType, register_peft_method

PEFT_METHOD_NAME = "s3"


def register() -> None:
    # peft validates method names against its PeftType enum, which has no hook for plugins; extending the enum is the
    # only way in. Re-imports (e.g. importlib.reload in notebooks) must not register twice.
    if PEFT_METHOD_NAME.upper() not in PeftType.__members__:
        aenum.extend_enum(PeftType, PEFT_METHOD_NAME.upper(), PEFT_METHOD_NAME.upper())
    peft_type = PeftType[PEFT_METHOD_NAME.upper()]
    if peft_type in PEFT_TYPE_TO_CONFIG_MAPPING:
        return

    from .tuner.config import S3SearchConfig
    from .tuner.model import S3Model

    register_peft_method(name=PEFT_METHOD_NAME, config_cls=S3SearchConfig, model_cls=S3Model, prefix=S3Model.prefix)

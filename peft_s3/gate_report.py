"""The state of an S3 search as plain JSON data (the gate report), its file s3_gates.json, and reading it back.

A report holds what selection needs without the model: every candidate with its size, alpha and p, the budget, and
the modules' types for the LoRA conversion. `peft_s3.resolve` takes a model, a report or its file alike.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Optional, Union

import torch
from peft import PeftModel
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn
from transformers.pytorch_utils import Conv1D

from .tuner.config import S3SearchConfig
from .tuner.model import S3Model
from .tuner.search_space import Candidate, is_linear, is_norm

GATE_REPORT_FILE = "s3_gates.json"


def s3_model_of(model: nn.Module) -> S3Model:
    if isinstance(model, S3Model):
        return model
    base = getattr(model, "base_model", None)
    if isinstance(base, S3Model):
        return base
    wrapped = f" (wrapping {type(base).__name__})" if isinstance(model, PeftModel) else ""
    raise ValueError(
        f"Expected a PeftModel with an S3 adapter or an S3Model, got {type(model).__name__}{wrapped}. Create the "
        "model with `peft.get_peft_model(base_model, peft_s3.S3SearchConfig(...))`."
    )


def _module_info(s3_model: S3Model, module_names: Iterable[str]) -> dict[str, dict[str, Any]]:
    modules = dict(s3_model.model.named_modules())
    info = {}
    for name in module_names:
        if name not in modules:  # a fused expert weight, "<experts module>.<parameter>"
            info[name] = {"type": "expert_parameter", "bias_params": 0}
            continue
        module = modules[name]
        base = module.get_base_layer() if isinstance(module, BaseTunerLayer) else module
        bias = getattr(base, "bias", None)
        if is_linear(base):
            kind = "conv1d" if isinstance(base, Conv1D) else "linear"
        else:
            kind = "norm" if is_norm(base) else "other"
        info[name] = {"type": kind, "bias_params": bias.numel() if isinstance(bias, torch.Tensor) else 0}
    return info


def gate_report(model: nn.Module, adapter_name: Optional[str] = None) -> dict[str, Any]:
    """The state of an S3 adapter's search as plain JSON data: what `save_gate_report` writes.

    Keys: adapter_name, budget (absolute; None for a fixed structure), backbone_num_params, search_space_signature,
    config (the adapter's config as a dict), modules (per candidate module: type and own bias size) and candidates
    (the rows of `S3Model.gate_report`: name, kind, module, stack, layer, position, num_params, alpha, p).
    """
    s3_model = s3_model_of(model)
    name = adapter_name or s3_model.active_adapters[0]
    rows = s3_model.gate_report(name)
    config: S3SearchConfig = s3_model.peft_config[name]
    report = {
        "adapter_name": name,
        "budget": s3_model.budget(name),
        "backbone_num_params": s3_model.backbone_num_params,
        "search_space_signature": config.search_space_signature,
        "config": config.to_dict(),
        "modules": _module_info(s3_model, dict.fromkeys(row["module"] for row in rows)),
        "candidates": rows,
    }
    # A JSON round trip makes a report taken from a live model identical to one loaded from disk (plain str instead
    # of peft's str enums), so resolving either gives equal structures.
    return json.loads(json.dumps(report))


def save_gate_report(model: nn.Module, directory: Union[str, Path], adapter_name: Optional[str] = None) -> Path:
    """Write the adapter's `gate_report` to `directory/s3_gates.json` (creating the directory); returns the file."""
    path = Path(directory) / GATE_REPORT_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(gate_report(model, adapter_name), indent=1))
    return path


def load_gate_report(path: Union[str, Path]) -> dict[str, Any]:
    """Read a report written by `save_gate_report`: pass the directory or the s3_gates.json file itself."""
    path = Path(path)
    file = path / GATE_REPORT_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"No S3 gate report at {file}: expected a directory containing {GATE_REPORT_FILE}.")
    report = json.loads(file.read_text())
    missing = {"adapter_name", "budget", "backbone_num_params", "config", "modules", "candidates"} - set(report)
    if missing:
        raise ValueError(f"{file} is not an S3 gate report: it lacks the keys {sorted(missing)}.")
    return report


def report_of(source: Any, adapter_name: Optional[str]) -> dict[str, Any]:
    if isinstance(source, (str, Path)):
        report = load_gate_report(source)
    elif isinstance(source, dict):
        report = source
    else:
        return gate_report(source, adapter_name)
    if adapter_name is not None and adapter_name != report.get("adapter_name"):
        raise ValueError(
            f"adapter_name={adapter_name!r}, but this gate report belongs to adapter {report.get('adapter_name')!r}."
        )
    return report


def search_config_of(report: dict[str, Any]) -> S3SearchConfig:
    names = {f.name for f in dataclasses.fields(S3SearchConfig) if f.init}
    return S3SearchConfig(**{key: value for key, value in report["config"].items() if key in names})


def candidates_of(rows: list[dict[str, Any]]) -> list[Candidate]:
    # Reports name LoRA slots only inside `name`; slots are numbered in gate order per module and kind, as the
    # search space builds them.
    slots: dict[tuple[str, str], int] = {}
    candidates = []
    for row in rows:
        key = (row["module"], row["kind"])
        slots[key] = slots.get(key, -1) + 1
        candidates.append(
            Candidate(
                row["module"], row["kind"], slots[key], row["num_params"], row["stack"], row["layer"], row["position"]
            )
        )
    return candidates

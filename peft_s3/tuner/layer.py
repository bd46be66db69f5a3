"""S3 tuner layers: a wrapped module plus its gated candidates (LoRA slices, BitFit, LNFit, low-rank adapter)."""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.nn.functional as F
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from torch import nn
from torch.func import functional_call
from transformers.activations import ACT2FN
from transformers.pytorch_utils import Conv1D

from .config import S3SearchConfig
from .gates import GateBank
from .search_space import Candidate, adapter_width, fused_expert_parameters, is_linear, is_norm, linear_features


class S3Layer(BaseTunerLayer):
    """Common state of every S3 layer: per adapter, the candidate parameters and where their gates live.

    `s3_gate_span[adapter]` is the (start, stop) range of this module's candidates in the adapter's gate vector, and
    `s3_kind_offsets[adapter]` maps each kind to its (start, stop) inside that range. In fixed-structure mode the bank
    is None and every candidate is simply on.
    """

    adapter_layer_names = ("s3_lora_A", "s3_lora_B", "s3_bias", "s3_scale", "s3_adapter_down", "s3_adapter_up")
    # Every other per-adapter dict: peft's delete_adapter removes the adapter from all of these.
    other_param_names = (
        "s3_scaling",
        "s3_gate_span",
        "s3_kind_offsets",
        "s3_lora_dropout",
        "s3_activation",
        "s3_banks",
    )

    def __init__(self, base_layer: nn.Module) -> None:
        self.base_layer = base_layer
        self.in_features, self.out_features = _in_out_features(base_layer)
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict())
        self.s3_lora_dropout = nn.ModuleDict()
        self.s3_scaling: dict[str, float] = {}
        self.s3_gate_span: dict[str, tuple[int, int]] = {}
        self.s3_kind_offsets: dict[str, dict[str, tuple[int, int]]] = {}
        self.s3_activation: dict[str, str] = {}
        self.s3_banks: dict[str, Optional[GateBank]] = {}
        self._disable_adapters = False
        self.merged_adapters: list[str] = []

    def update_layer(
        self,
        adapter_name: str,
        candidates: list[Candidate],
        gate_start: int,
        bank: Optional[GateBank],
        config: S3SearchConfig,
    ) -> None:
        """Create the parameters of `candidates` (all on this module, contiguous in the gate vector).

        They are drawn in float32 and stored in the base's dtype, as peft's LoRA stores its weights: PeftModel then
        upcasts half-precision adapters to float32 unless `autocast_adapter_dtype=False`.
        """
        base = self.get_base_layer()
        factory = {"device": _base_device_and_dtype(base)[0], "dtype": torch.float32}
        offsets: dict[str, tuple[int, int]] = {}
        for index, candidate in enumerate(candidates):
            key = self._segment_key(candidate)
            start, _ = offsets.get(key, (index, index))
            offsets[key] = (start, index + 1)
        self.s3_kind_offsets[adapter_name] = offsets
        self.s3_gate_span[adapter_name] = (gate_start, gate_start + len(candidates))
        self.s3_banks[adapter_name] = bank

        if "lora" in offsets:
            rank = offsets["lora"][1] - offsets["lora"][0]
            in_features, out_features = linear_features(base)
            lora_a = torch.empty(rank, in_features, **factory)
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
            self.s3_lora_A[adapter_name] = self._parameter(lora_a)
            self.s3_lora_B[adapter_name] = self._parameter(self._delta_init(config, out_features, rank, **factory))
            self.s3_scaling[adapter_name] = config.lora_alpha / config.max_rank
            self.s3_lora_dropout[adapter_name] = (
                nn.Dropout(config.lora_dropout) if config.lora_dropout > 0 else nn.Identity()
            )
        if "bitfit" in offsets:
            width = linear_features(base)[1] if is_linear(base) else base.weight.shape[0]
            self.s3_bias[adapter_name] = self._parameter(self._delta_init(config, width, **factory))
        if "lnfit" in offsets:
            self.s3_scale[adapter_name] = self._parameter(self._delta_init(config, base.weight.shape[0], **factory))
        if "adapter" in offsets:
            width = adapter_width(base)
            down = torch.empty(config.adapter_rank, width, **factory)
            nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.s3_adapter_down[adapter_name] = self._parameter(down)
            up = self._delta_init(config, width, config.adapter_rank, **factory)
            self.s3_adapter_up[adapter_name] = self._parameter(up)
            self.s3_activation[adapter_name] = config.adapter_activation
        self.set_adapter(self.active_adapters)

    def _segment_key(self, candidate: Candidate) -> str:
        """Key of the candidate's run of gates in `s3_kind_offsets`: its kind."""
        return candidate.kind

    def _parameter(self, values: torch.Tensor) -> nn.Parameter:
        """A candidate parameter holding `values` in the dtype of the base layer (float32 if that is not a float)."""
        return nn.Parameter(values.to(_base_device_and_dtype(self.get_base_layer())[1]))

    @staticmethod
    def _delta_init(config: S3SearchConfig, *shape: int, **factory: Any) -> torch.Tensor:
        # Zero makes every candidate start as the identity, as LoRA's zero B does; random is for tests that must see
        # each delta act on the output.
        if config.init_weights:
            return torch.zeros(*shape, **factory)
        return torch.randn(*shape, **factory) * 0.1

    def _gate(self, adapter_name: str, kind: str) -> Optional[torch.Tensor]:
        """The current gates of this module's `kind` candidates; None in fixed-structure mode (open gates)."""
        bank = self.s3_banks[adapter_name]
        if bank is None:
            return None
        if bank.values is None:
            raise RuntimeError(
                "S3 gate values are missing: call the model through its PeftModel/S3Model wrapper (which refreshes "
                "the gates before each forward pass), not a submodule on its own."
            )
        return bank.segment(self.s3_gate_span[adapter_name][0] + self.s3_kind_offsets[adapter_name][kind][0])

    def _gated_bias(self, adapter_name: str) -> torch.Tensor:
        bias = self.s3_bias[adapter_name]
        gate = self._gate(adapter_name, "bitfit")
        return bias if gate is None else bias * gate.to(bias.dtype)

    def _active(self) -> list[str]:
        return [name for name in self.active_adapters if name in self.s3_kind_offsets]

    def _add_output_deltas(self, result: torch.Tensor, x: Optional[torch.Tensor]) -> torch.Tensor:
        """result + the gated LoRA (needs the input x), BitFit and adapter deltas of every active adapter.

        Gates and scaling multiply the narrow LoRA and adapter bottlenecks, not the full-width outputs, and the BitFit
        bias rides in the LoRA up-projection, which leaves one full-width addition for LoRA and BitFit together and
        one for the adapter.
        """
        out_dtype = result.dtype
        for name in self._active():
            if name in self.s3_lora_A:
                lora_a = self.s3_lora_A[name]
                hidden = F.linear(self.s3_lora_dropout[name](x.to(lora_a.dtype)), lora_a)
                gate = self._gate(name, "lora")
                scaling = self.s3_scaling[name]
                hidden = hidden * (scaling if gate is None else gate.to(hidden.dtype) * scaling)
                bias = self._gated_bias(name) if name in self.s3_bias else None
                result = result + F.linear(hidden, self.s3_lora_B[name], bias).to(out_dtype)
            elif name in self.s3_bias:
                result = result + self._gated_bias(name).to(out_dtype)
            if name in self.s3_adapter_down:
                activation = ACT2FN[self.s3_activation[name]]
                down = self.s3_adapter_down[name]
                hidden = activation(F.linear(result.to(down.dtype), down))
                gate = self._gate(name, "adapter")
                if gate is not None:
                    hidden = hidden * gate.to(hidden.dtype)
                result = result + F.linear(hidden, self.s3_adapter_up[name]).to(out_dtype)
        return result

    def _check_mergeable(self, adapter_names: list[str]) -> None:
        for name in adapter_names:
            if name not in self.s3_banks:
                continue
            if self.s3_banks[name] is not None:
                raise ValueError(
                    f"Adapter '{name}' is a structure search with soft gates and cannot be merged: resolve it with "
                    "`peft_s3.resolve(...)` and retrain the fixed structure, then merge."
                )
            if name in self.s3_adapter_down:
                raise ValueError(
                    f"Adapter '{name}' has a low-rank adapter on {type(self.get_base_layer()).__name__}, which is "
                    "non-linear and cannot be merged into the base weights."
                )
            if name in self.s3_bias and getattr(self.get_base_layer(), "bias", None) is None:
                raise ValueError(
                    f"Adapter '{name}' has a BitFit bias on a bias-free {type(self.get_base_layer()).__name__}; "
                    "there is no base bias to merge it into."
                )

    def _merged_parameter_deltas(self, name: str) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def _unmerged(self, adapter_names: Optional[list[str]]) -> list[str]:
        """The adapters of `adapter_names` (default: the active ones) that this layer holds and has not merged."""
        names = self.active_adapters if adapter_names is None else adapter_names
        return [name for name in names if name in self.s3_kind_offsets and name not in self.merged_adapters]

    def _merged_parameters(self, adapter_names: list[str], safe_merge: bool) -> dict[str, torch.Tensor]:
        """The base parameters with `adapter_names` merged in, computed without touching the layer.

        With `safe_merge`, non-finite results are refused here, before anything is assigned, so a refused merge
        leaves every part of the layer as it was.
        """
        base = self.get_base_layer()
        merged: dict[str, torch.Tensor] = {}
        for name in adapter_names:
            for param_name, delta in self._merged_parameter_deltas(name).items():
                current = merged.get(param_name, getattr(base, param_name).data)
                merged[param_name] = current + delta.to(current.dtype)
        if safe_merge:
            broken = [param_name for param_name, value in merged.items() if not torch.isfinite(value).all()]
            if broken:
                raise ValueError(
                    f"NaNs or infs detected in the merged {broken} of adapter(s) {adapter_names}: nothing was merged."
                )
        return merged

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        adapter_names = [name for name in check_adapters_to_merge(self, adapter_names) if name in self.s3_kind_offsets]
        if not adapter_names:
            return
        self._check_mergeable(adapter_names)
        base = self.get_base_layer()
        for param_name, value in self._merged_parameters(adapter_names, safe_merge).items():
            getattr(base, param_name).data = value
        self.merged_adapters.extend(adapter_names)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            for param_name, delta in self._merged_parameter_deltas(name).items():
                param = getattr(base, param_name)
                param.data -= delta.to(param.dtype)

    def _run_unmerged(self) -> bool:
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return False
        return not self.merged


class S3Linear(nn.Module, S3Layer):
    """nn.Linear (or GPT-2 Conv1D) with gated LoRA rank-1 slices, a BitFit bias delta and an output adapter."""

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        S3Layer.__init__(self, base_layer)
        self.update_layer(**kwargs)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        # Decided before the base runs: with adapters disabled this unmerges merged weights first.
        run_unmerged = self._run_unmerged()
        result = self.base_layer(x, *args, **kwargs)
        return self._add_output_deltas(result, x) if run_unmerged else result

    def _merged_parameter_deltas(self, name: str) -> dict[str, torch.Tensor]:
        deltas = {}
        if name in self.s3_lora_A:
            weight = (self.s3_lora_B[name] @ self.s3_lora_A[name]) * self.s3_scaling[name]
            deltas["weight"] = weight.T if isinstance(self.get_base_layer(), Conv1D) else weight
        if name in self.s3_bias:
            deltas["bias"] = self.s3_bias[name]
        return {key: value.detach() for key, value in deltas.items()}

    def __repr__(self) -> str:
        return "s3." + super().__repr__()


class S3Norm(nn.Module, S3Layer):
    """A LayerNorm/RMSNorm-like module with a gated LNFit scale delta and a gated BitFit bias delta.

    Attributes it does not have are read from the wrapped norm: state-space mixers read `self.norm.variance_epsilon`
    and hand it to their kernels.
    """

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        S3Layer.__init__(self, base_layer)
        self.update_layer(**kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Before __init__ has registered base_layer, looking it up here would recurse.
            base = self.__dict__.get("_modules", {}).get("base_layer")
            if base is None or name == "base_layer":
                raise
            return getattr(base, name)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if not self._run_unmerged():
            return self.base_layer(x, *args, **kwargs)
        base = self.base_layer
        weight = base.weight
        for name in self._active():
            if name in self.s3_scale:
                scale = self.s3_scale[name]
                gate = self._gate(name, "lnfit")
                weight = weight + (scale if gate is None else scale * gate).to(weight.dtype)
        # Running the norm's own forward with a shifted scale works for every norm flavour (LayerNorm, RMSNorm,
        # T5LayerNorm, Gemma's 1 + weight) without re-implementing their normalisation; the other arguments (the
        # gate of Mamba2's gated RMSNorm) go along.
        if weight is base.weight:
            result = base(x, *args, **kwargs)
        else:
            result = functional_call(base, {"weight": weight}, (x, *args), kwargs)
        return self._add_output_deltas(result, None)

    def _merged_parameter_deltas(self, name: str) -> dict[str, torch.Tensor]:
        deltas = {}
        if name in self.s3_scale:
            deltas["weight"] = self.s3_scale[name]
        if name in self.s3_bias:
            deltas["bias"] = self.s3_bias[name]
        return {key: value.detach() for key, value in deltas.items()}

    def __repr__(self) -> str:
        return "s3." + super().__repr__()


class S3Block(nn.Module, S3Layer):
    """Any module (an attention or feed-forward block, say) with a gated low-rank adapter on its output.

    Modules returning a tuple or list get the adapter on their first element, the hidden states, as transformers'
    attention blocks return (hidden_states, attention_weights, ...).
    """

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        S3Layer.__init__(self, base_layer)
        self.update_layer(**kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        run_unmerged = self._run_unmerged()
        output = self.base_layer(*args, **kwargs)
        if not run_unmerged:
            return output
        if isinstance(output, torch.Tensor):
            return self._add_output_deltas(output, None)
        if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
            return type(output)([self._add_output_deltas(output[0], None), *output[1:]])
        raise TypeError(
            f"S3 adapter on {type(self.base_layer).__name__}: its output is a {type(output).__name__}, but an "
            "adapter needs a tensor or a tuple whose first element is the hidden states tensor."
        )

    def _merged_parameter_deltas(self, name: str) -> dict[str, torch.Tensor]:
        return {}

    def __repr__(self) -> str:
        return "s3." + super().__repr__()


class S3Experts(nn.Module, S3Layer):
    """Fused mixture-of-experts weights (one 3-d parameter per projection, experts first) with gated LoRA slices.

    A slice of a parameter is one rank on every expert: W[e] + gate * scaling * B[e] A[e], the form of peft's LoRA on
    `target_parameters`. The experts module runs its own forward on the shifted parameters, so routing and expert
    kernels are untouched. `s3_expert_A[adapter][parameter]` is (experts, rank, columns), `s3_expert_B` (experts,
    rows, rank).
    """

    adapter_layer_names = (*S3Layer.adapter_layer_names, "s3_expert_A", "s3_expert_B")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        super().__init__()
        S3Layer.__init__(self, base_layer)
        # Per adapter, one tensor per expert parameter: the adapter name stays the first key below the layer name, as
        # peft's state-dict conversion expects.
        self.s3_expert_A = nn.ModuleDict()
        self.s3_expert_B = nn.ModuleDict()
        self.update_layer(**kwargs)

    def _segment_key(self, candidate: Candidate) -> str:
        parameter = candidate.module.rpartition(".")[2]
        return parameter if parameter in fused_expert_parameters(self.get_base_layer()) else candidate.kind

    def update_layer(
        self,
        adapter_name: str,
        candidates: list[Candidate],
        gate_start: int,
        bank: Optional[GateBank],
        config: S3SearchConfig,
    ) -> None:
        super().update_layer(adapter_name, candidates, gate_start, bank, config)
        base = self.get_base_layer()
        lora_a, lora_b = nn.ParameterDict(), nn.ParameterDict()
        for parameter in fused_expert_parameters(base):
            if parameter not in self.s3_kind_offsets[adapter_name]:
                continue
            start, stop = self.s3_kind_offsets[adapter_name][parameter]
            weight = getattr(base, parameter)
            experts, rows, columns = weight.shape
            factory = {"device": weight.device, "dtype": torch.float32}
            a = torch.empty(experts, stop - start, columns, **factory)
            for expert in a:
                nn.init.kaiming_uniform_(expert, a=math.sqrt(5))
            lora_a[parameter] = self._parameter(a)
            lora_b[parameter] = self._parameter(self._delta_init(config, experts, rows, stop - start, **factory))
        self.s3_expert_A[adapter_name] = lora_a
        self.s3_expert_B[adapter_name] = lora_b
        self.s3_scaling[adapter_name] = config.lora_alpha / config.max_rank
        self.set_adapter(self.active_adapters)

    def _expert_deltas(self, name: str) -> dict[str, torch.Tensor]:
        """Per expert parameter of adapter `name`: the gated, scaled sum of its LoRA slices, per expert."""
        deltas = {}
        for parameter, lora_a in self.s3_expert_A[name].items():
            gate = self._gate(name, parameter)
            scaling = self.s3_scaling[name]
            # As in S3Linear: gates and scaling multiply the rank dimension, here of B (experts, rows, rank).
            lora_b = self.s3_expert_B[name][parameter]
            lora_b = lora_b * (scaling if gate is None else gate.to(lora_b.dtype) * scaling)
            deltas[parameter] = lora_b @ lora_a
        return deltas

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        if not self._run_unmerged():
            return self.base_layer(*args, **kwargs)
        base = self.base_layer
        weights: dict[str, torch.Tensor] = {}
        for name in self._active():
            if name in self.s3_expert_A:
                for parameter, delta in self._expert_deltas(name).items():
                    weight = weights.get(parameter, getattr(base, parameter))
                    weights[parameter] = weight + delta.to(weight.dtype)
        output = functional_call(base, weights, args, kwargs) if weights else base(*args, **kwargs)
        if not any(name in self.s3_adapter_down for name in self._active()):
            return output
        return self._add_output_deltas(output, None)

    def _merged_parameter_deltas(self, name: str) -> dict[str, torch.Tensor]:
        if name not in self.s3_expert_A:
            return {}
        return {parameter: delta.detach() for parameter, delta in self._expert_deltas(name).items()}

    def __repr__(self) -> str:
        return "s3." + super().__repr__()


def _in_out_features(base: nn.Module) -> tuple[Optional[int], Optional[int]]:
    """in_features / out_features of an S3 layer: the base linear's, a norm's width, None otherwise (as in peft)."""
    if is_linear(base):
        return linear_features(base)
    if is_norm(base):
        width = base.weight.shape[0]
        return width, width
    return None, None


def _base_device_and_dtype(base: nn.Module) -> tuple[Optional[torch.device], torch.dtype]:
    """Where and in which dtype the candidates of `base` live: those of its weight (or first parameter), float32
    where that is no float (quantized weights)."""
    reference = getattr(base, "weight", None)
    if not isinstance(reference, torch.Tensor):
        reference = next(base.parameters(), None)
    if reference is None:
        return None, torch.float32
    return reference.device, reference.dtype if reference.is_floating_point() else torch.float32

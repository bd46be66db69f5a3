"""The S3 tuner: injects gated candidates into a model and keeps their gates in step with the budget."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
from collections.abc import Iterator, Sequence
from itertools import groupby
from typing import Any, Optional

import torch
from peft.tuners.tuners_utils import BaseTuner, BaseTunerLayer
from torch import nn
from torch.utils.hooks import RemovableHandle

from .config import S3SearchConfig
from .gates import GateBank
from .layer import S3Block, S3Experts, S3Layer, S3Linear, S3Norm
from .search_space import (
    Candidate,
    build_fixed_structure,
    build_search_space,
    expert_parameter_owners,
    fused_expert_parameters,
    is_linear,
    is_norm,
    signature,
)


class S3Model(BaseTuner):
    """
    Sparse Structure Search (S3PET) over a mixture of LoRA, BitFit, LNFit and low-rank adapter candidates.

    Every candidate is behind a binary-concrete gate with a structural parameter alpha (in `s3_alpha`); the shifted
    global sigmoid keeps the expected number of trainable parameters at the budget. With a fixed `structure` in the
    config, only those candidates exist and their gates are open.

    Example:

        ```py
        >>> import peft, peft_s3
        >>> model = peft.get_peft_model(base_model, peft_s3.S3SearchConfig(budget=1e-4))
        >>> model.print_trainable_parameters()
        >>> model.base_model.gate_report()[:3]
        ```
    """

    prefix: str = "s3_"
    tuner_layer_cls = S3Layer
    target_module_mapping: dict[str, list[str]] = {}
    uses_shared_state = True

    def inject_adapter(
        self, model: nn.Module, adapter_name: str, autocast_adapter_dtype: bool = True, **kwargs: Any
    ) -> None:
        self._plan_adapter(model, adapter_name)
        # peft's injection re-activates the active adapters with the new adapter's inference_mode and then restores
        # the trainability of the parameters it found in the model; the alphas live on the tuner, so restore them here.
        alphas_trainable = {name: alpha.requires_grad for name, alpha in self.s3_alpha.items() if name != adapter_name}
        super().inject_adapter(model, adapter_name, autocast_adapter_dtype=autocast_adapter_dtype, **kwargs)
        for name, requires_grad in alphas_trainable.items():
            self.s3_alpha[name].requires_grad_(requires_grad)
        if not getattr(self, "_s3_hooks", None):
            self._s3_hooks = self._register_gate_hooks(model)

    def _register_gate_hooks(self, model: nn.Module) -> list[RemovableHandle]:
        """Refresh the gates once per forward pass of the wrapped model, and before the encoder runs on its own."""
        self._s3_in_forward = False
        # Hooks on the wrapped model (not S3Model.forward) also cover generate(), which calls it directly.
        hooks = [
            model.register_forward_pre_hook(self._enter_forward),
            model.register_forward_hook(self._exit_forward, always_call=True),
        ]
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # generate() of an encoder-decoder runs the encoder before the first full forward pass; without its own
            # refresh it would find no gates, or stale ones from the last training step.
            hooks.append(model.get_encoder().register_forward_pre_hook(self._refresh_outside_forward))
        return hooks

    def _plan_adapter(self, model: nn.Module, adapter_name: str) -> None:
        """Decide the candidates of `adapter_name`, validate them and create its structural parameters."""
        if "s3_alpha" not in self._modules:
            check_unwrapped_base(model)
            self.s3_alpha = nn.ParameterDict()
            self._s3_candidates: dict[str, list[Candidate]] = {}
            self._s3_banks: dict[str, Optional[GateBank]] = {}
            self._s3_module_plans: dict[str, dict[str, tuple[list[Candidate], int]]] = {}
            self.backbone_num_params = sum(p.numel() for p in model.parameters())
        # The signature written below must describe this model only: on the caller's config object it would make
        # reusing that config for another model fail as if it were a checkpoint of the first one.
        config: S3SearchConfig = copy.copy(self.peft_config[adapter_name])
        if config.modules_to_save is not None:
            # PeftModelForSequenceClassification appends "classifier" and "score" to a list that, for a structure
            # resolved from a classifier's search, already holds them; saved configs would list them twice.
            config.modules_to_save = list(dict.fromkeys(config.modules_to_save))
        self.peft_config[adapter_name] = config
        candidates = build_search_space(model, config) if config.is_search else build_fixed_structure(model, config)
        if not candidates:
            raise ValueError(_no_candidates_message(model, config))
        _check_not_nested(candidates)
        # Candidates on fused expert parameters live in the layer that wraps the experts module holding them.
        owners = expert_parameter_owners(model)
        _check_dropout(candidates, config, owners)
        digest = signature(candidates)
        if config.search_space_signature is not None and config.search_space_signature != digest:
            raise ValueError(
                f"This S3 checkpoint was created on a search space with signature {config.search_space_signature} "
                f"(count:digest), but on this {type(model).__name__} the same config yields {digest}. The "
                "checkpoint belongs to another architecture or model size; load it into the model it was made on."
            )
        config.search_space_signature = digest

        bank = None
        if config.is_search:
            sizes = torch.tensor([c.num_params for c in candidates], dtype=torch.float32)
            budget = self._check_budget(config, sizes)
            device = next(model.parameters()).device
            alpha = torch.full((len(candidates),), config.alpha_init, device=device)
            # peft freezes inference-mode adapters inside the wrapped model only; alpha lives on the tuner itself.
            self.s3_alpha[adapter_name] = nn.Parameter(alpha, requires_grad=not config.inference_mode)
            segments = [len(list(run)) for _, run in groupby(candidates, key=lambda c: (c.module, c.kind))]
            bank = GateBank(
                self.s3_alpha, adapter_name, sizes, budget, config.tau, config.beta, config.hard_gates, segments
            )
        self._s3_candidates[adapter_name] = candidates
        self._s3_banks[adapter_name] = bank
        plan = {}
        start = 0
        for module, group in groupby(candidates, key=lambda c: owners.get(c.module, c.module)):
            group = list(group)
            plan[module] = (group, start)
            start += len(group)
        self._s3_module_plans[adapter_name] = plan
        self._s3_injecting = adapter_name

    def _check_budget(self, config: S3SearchConfig, sizes: torch.Tensor) -> int:
        budget = config.absolute_budget(self.backbone_num_params)
        space = int(sizes.sum().item())
        smallest = int(sizes.min().item())
        if budget < smallest:
            raise ValueError(
                f"budget={config.budget!r} allows {budget} trainable parameters, fewer than the smallest candidate "
                f"({smallest}), so no structure fits. Allowed: at least {smallest} and below the search space "
                f"size {space} (backbone: {self.backbone_num_params} parameters)."
            )
        if budget >= space:
            raise ValueError(
                f"budget={config.budget!r} allows {budget} trainable parameters, but the whole search space has only "
                f"{space} in {len(sizes)} candidates, so there is nothing to search. Use a budget below {space} "
                f"(a fraction below {space / self.backbone_num_params:.3g} of the backbone), or enlarge the space "
                "(max_rank, candidate_kinds, target_modules)."
            )
        return budget

    def _prepare_adapter_config(self, peft_config: S3SearchConfig, model_config: dict) -> S3SearchConfig:
        return peft_config

    def _check_target_module_exists(self, peft_config: S3SearchConfig, key: str) -> bool:
        return key in self._s3_module_plans[self._s3_injecting]

    def _create_and_replace(
        self,
        peft_config: S3SearchConfig,
        adapter_name: str,
        target: nn.Module,
        target_name: str,
        parent: nn.Module,
        current_key: str,
        **optional_kwargs: Any,
    ) -> None:
        candidates, gate_start = self._s3_module_plans[adapter_name][current_key]
        layer_kwargs = {
            "adapter_name": adapter_name,
            "candidates": candidates,
            "gate_start": gate_start,
            "bank": self._s3_banks[adapter_name],
            "config": peft_config,
        }
        if isinstance(target, S3Layer):
            target.update_layer(**layer_kwargs)
            return
        if is_linear(target):
            new_module = S3Linear(target, **layer_kwargs)
        elif is_norm(target):
            new_module = S3Norm(target, **layer_kwargs)
        elif fused_expert_parameters(target):
            new_module = S3Experts(target, **layer_kwargs)
        else:
            new_module = S3Block(target, **layer_kwargs)
        if adapter_name not in self.active_adapters:
            new_module.requires_grad_(False)
        self._replace_module(parent, target_name, new_module, target)

    def _replace_module(self, parent: nn.Module, child_name: str, new_module: nn.Module, child: nn.Module) -> None:
        # BaseTuner's version also copies `child.weight` onto replacements without a base layer. Here those occur
        # only when unloading (the base layer itself, or a trained modules_to_save copy such as RoBERTa's
        # classification head, which has no `weight`), and S3 layers are built on their child's device already.
        setattr(parent, child_name, new_module)

    def _refresh_gates(self, training: bool) -> None:
        for name in self.active_adapters:
            bank = self._s3_banks.get(name)
            if bank is not None:
                bank.refresh(training=training)

    def _enter_forward(self, module: nn.Module, args: Any) -> None:
        self._s3_in_forward = True
        self._refresh_gates(module.training)

    def _exit_forward(self, module: nn.Module, args: Any, output: Any) -> None:
        self._s3_in_forward = False

    def _refresh_outside_forward(self, module: nn.Module, args: Any) -> None:
        if not self._s3_in_forward:
            self._refresh_gates(module.training)

    def _check_layers_mergeable(self, adapter_names: Optional[list[str]], safe_merge: bool) -> None:
        """Refuse the merge before any layer changes: a layer refusing halfway through would leave the model partly
        merged. With `safe_merge`, every layer's merged parameters are computed and checked for NaNs and infs first."""
        names = adapter_names if adapter_names is not None else self.active_adapters
        for path, module in self.model.named_modules():
            if isinstance(module, S3Layer):
                try:
                    module._check_mergeable(names)
                    if safe_merge:
                        module._merged_parameters(module._unmerged(names), safe_merge=True)
                except ValueError as error:
                    raise ValueError(f"Cannot merge {path}: {error}") from None

    def merge_adapter(self, adapter_names: Optional[list[str]] = None, safe_merge: bool = False) -> None:
        self._check_layers_mergeable(adapter_names, safe_merge)
        super().merge_adapter(adapter_names=adapter_names, safe_merge=safe_merge)

    def _unload_and_optionally_merge(
        self,
        merge: bool = True,
        progressbar: bool = False,
        safe_merge: bool = False,
        adapter_names: Optional[list[str]] = None,
    ) -> nn.Module:
        if merge:
            self._check_layers_mergeable(adapter_names, safe_merge)
        model = super()._unload_and_optionally_merge(
            merge=merge, progressbar=progressbar, safe_merge=safe_merge, adapter_names=adapter_names
        )
        for hook in getattr(self, "_s3_hooks", None) or []:
            hook.remove()
        self._s3_hooks = []
        return model

    def set_adapter(self, adapter_name: str | list[str], inference_mode: bool = False) -> None:
        super().set_adapter(adapter_name, inference_mode=inference_mode)
        self._train_active_alphas(inference_mode)

    def set_requires_grad(self, adapter_names: str | Sequence[str], requires_grad: bool = True) -> None:
        super().set_requires_grad(adapter_names, requires_grad=requires_grad)
        names = {adapter_names} if isinstance(adapter_names, str) else set(adapter_names)
        for name in names & set(self.s3_alpha):
            self.s3_alpha[name].requires_grad_(requires_grad)

    def _train_active_alphas(self, inference_mode: bool = False) -> None:
        # As peft does for the candidate parameters in the layers: only the active adapters' alphas train.
        for name, alpha in self.s3_alpha.items():
            alpha.requires_grad_(name in self.active_adapters and not inference_mode)

    def delete_adapter(self, adapter_name: str) -> None:
        was_active = adapter_name in self.active_adapters
        super().delete_adapter(adapter_name)
        if adapter_name in self.s3_alpha:
            del self.s3_alpha[adapter_name]
        if was_active:
            # As peft's layers do: only a new active adapter is made trainable; deleting another changes nothing.
            self._train_active_alphas()
        for registry in (self._s3_candidates, self._s3_banks, self._s3_module_plans):
            registry.pop(adapter_name, None)

    # ------------------------------------------------------------------ inspection API used by trainer and resolver

    def _adapter(self, adapter_name: Optional[str]) -> str:
        name = adapter_name or self.active_adapters[0]
        if name not in self._s3_candidates:
            raise ValueError(f"Unknown S3 adapter {name!r}; this model has {sorted(self._s3_candidates)}.")
        return name

    def candidates(self, adapter_name: Optional[str] = None) -> list[Candidate]:
        """The candidates of an adapter, in gate order."""
        return list(self._s3_candidates[self._adapter(adapter_name)])

    def gate_bank(self, adapter_name: Optional[str] = None) -> Optional[GateBank]:
        """The gates of a search adapter (None in fixed-structure mode)."""
        return self._s3_banks[self._adapter(adapter_name)]

    def budget(self, adapter_name: Optional[str] = None) -> Optional[int]:
        """The absolute trainable-parameter budget of a search adapter."""
        bank = self.gate_bank(adapter_name)
        return None if bank is None else bank.budget

    def gate_probabilities(self, adapter_name: Optional[str] = None) -> torch.Tensor:
        """Current p_i of every candidate (ones in fixed-structure mode), detached."""
        bank = self.gate_bank(adapter_name)
        if bank is None:
            return torch.ones(len(self.candidates(adapter_name)))
        with torch.no_grad():
            return bank.probabilities().detach().float().cpu()

    def gate_report(self, adapter_name: Optional[str] = None) -> list[dict[str, Any]]:
        """One row per candidate: name, kind, module, stack, layer, position, num_params, alpha and p."""
        name = self._adapter(adapter_name)
        probabilities = self.gate_probabilities(name).tolist()
        alphas = self.s3_alpha[name].detach().float().cpu().tolist() if name in self.s3_alpha else None
        return [
            {
                "name": candidate.name,
                "kind": candidate.kind,
                "module": candidate.module,
                "stack": candidate.stack,
                "layer": candidate.layer,
                "position": candidate.position,
                "num_params": candidate.num_params,
                "alpha": None if alphas is None else alphas[index],
                "p": probabilities[index],
            }
            for index, candidate in enumerate(self._s3_candidates[name])
        ]

    @contextlib.contextmanager
    def fixed_eval_gates(self, values: torch.Tensor, adapter_name: Optional[str] = None) -> Iterator[None]:
        """Within the block, eval-mode forward passes use `values` as the gates (e.g. a resolved 0/1 mask), not p."""
        bank = self.gate_bank(adapter_name)
        if bank is None:
            raise ValueError("fixed_eval_gates needs a search adapter; a fixed structure has no gates to set.")
        if values.shape != bank.sizes.shape:
            raise ValueError(
                f"fixed_eval_gates got {tuple(values.shape)} gate values for {len(bank.sizes)} candidates."
            )
        bank.eval_values = values.detach().float()
        try:
            yield
        finally:
            bank.eval_values = None

    @contextlib.contextmanager
    def frozen_gate_noise(self) -> Iterator[None]:
        """Within the block, every forward pass reuses one binary-concrete noise sample (one bi-level step)."""
        banks = [bank for bank in self._s3_banks.values() if bank is not None]
        for bank in banks:
            bank.noise = None
            bank.noise_frozen = True
        try:
            yield
        finally:
            for bank in banks:
                bank.noise_frozen = False


def check_unwrapped_base(model: nn.Module) -> None:
    """Refuse a base that already holds adapter layers: peft injects in place, so it may be an earlier search's."""
    wrapped = [name for name, module in model.named_modules() if isinstance(module, BaseTunerLayer)]
    if wrapped:
        raise ValueError(
            f"This {type(model).__name__} already carries peft adapter layers ({wrapped[0]!r} and {len(wrapped) - 1} "
            "more). get_peft_model changes the base model in place, as in peft, so a base used for a search still "
            "holds the whole search space and its gates. Pass a fresh base (from_pretrained again, or a "
            "copy.deepcopy(base_model) taken before get_peft_model); to put a second adapter on the same PeftModel, "
            "use its add_adapter."
        )


def _no_candidates_message(model: nn.Module, config: S3SearchConfig) -> str:
    found = f"No S3 candidates found in {type(model).__name__} for candidate_kinds={config.candidate_kinds}"
    if config.is_search and config.exclude_modules is not None:
        unexcluded = dataclasses.replace(config, exclude_modules=None)
        if build_search_space(model, unexcluded):
            return (
                f"{found}: exclude_modules={config.exclude_modules!r} excludes every module that would carry one. "
                "Narrow the pattern (it is matched against full module names, e.g. '.*attention.*')."
            )
    return (
        f"{found}: no transformer block stack (a ModuleList of identical blocks with linear layers) was detected and "
        "no `target_modules` / `norm_modules` / `adapter_modules` were given. Name the modules to search over."
    )


def _check_dropout(candidates: list[Candidate], config: S3SearchConfig, expert_owners: dict[str, str]) -> None:
    # A slice on a fused expert weight is added to the weight the experts' kernels read, so there is no LoRA input to
    # drop out (peft refuses lora_dropout with target_parameters for the same reason). Ignoring the setting there
    # would train those slices differently from the linears' without a word.
    experts = sorted({c.module for c in candidates if c.module in expert_owners})
    if config.lora_dropout and experts:
        raise ValueError(
            f"lora_dropout={config.lora_dropout!r} cannot apply to the LoRA slices on fused expert weights, e.g. "
            f"{experts[:2]}: they are added to the expert weights, so there is no LoRA input to drop out. Use "
            "lora_dropout=0, or leave the expert weights out of the search space (e.g. "
            "exclude_modules=r'.*experts.*')."
        )


def _check_not_nested(candidates: list[Candidate]) -> None:
    modules = sorted({c.module for c in candidates})
    for outer, inner in zip(modules, modules[1:], strict=False):
        if inner.startswith(f"{outer}."):
            raise ValueError(
                f"Candidates on both {outer!r} and its submodule {inner!r}: an S3 module cannot wrap another. Put the "
                "adapter on a module that does not contain other targets (see adapter_modules / exclude_modules)."
            )

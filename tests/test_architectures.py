"""End to end on architectures beyond the classic transformer: state-space (Mamba, Mamba2), a hybrid of state-space
mixers, attention and experts (Granite-MoE-Hybrid), nested block stacks (Swin), a current MoE (Qwen3-MoE) and a
width-1 value head (GPT-2). Every model is built tiny from its config; nothing is downloaded."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import peft
import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2ForSequenceClassification,
    GPT2Model,
    GraniteMoeHybridConfig,
    GraniteMoeHybridForCausalLM,
    Mamba2Config,
    Mamba2ForCausalLM,
    MambaConfig,
    MambaForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwinConfig,
    SwinForImageClassification,
    TrainingArguments,
)
from transformers.pytorch_utils import Conv1D

from peft_s3 import S3SearchConfig, S3SearchTrainer, SearchedStructure, apply_structure, resolve

VOCAB = 64
SEQ_LEN = 8
IMAGE_SIZE = 32


def _mamba2() -> PreTrainedModel:
    config = Mamba2Config(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_heads=4,
        head_dim=8,
        state_size=8,
        n_groups=1,
        expand=2,
        chunk_size=8,
        conv_kernel=4,
    )
    return Mamba2ForCausalLM(config)


def _mamba() -> PreTrainedModel:
    return MambaForCausalLM(MambaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=2, state_size=8))


def _granite_moe_hybrid() -> PreTrainedModel:
    # Layer 0 is a Mamba2-style mixer with a gated RMSNorm, layer 1 attention; both have routed experts and a
    # shared MLP.
    config = GraniteMoeHybridConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=32,
        shared_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        num_local_experts=4,
        num_experts_per_tok=2,
        layer_types=["mamba", "attention"],
        mamba_n_heads=4,
        mamba_d_head=16,
        mamba_d_state=8,
        mamba_n_groups=1,
        mamba_chunk_size=8,
        mamba_d_conv=4,
        mamba_expand=2,
    )
    return GraniteMoeHybridForCausalLM(config)


def _swin() -> PreTrainedModel:
    config = SwinConfig(
        image_size=IMAGE_SIZE,
        patch_size=4,
        embed_dim=16,
        depths=[2, 2],
        num_heads=[2, 2],
        window_size=4,
        num_labels=2,
    )
    return SwinForImageClassification(config)


def _qwen3_moe() -> PreTrainedModel:
    config = Qwen3MoeConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=48,
        moe_intermediate_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return Qwen3MoeForCausalLM(config)


def _gpt2_value_head() -> PreTrainedModel:
    # num_labels=1: `score` is a width-1 linear, a value head.
    config = GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32, num_labels=1, pad_token_id=0)
    return GPT2ForSequenceClassification(config)


def _lm_example(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=generator)
    return {"input_ids": ids, "labels": ids}


def _image_example(generator: torch.Generator) -> dict[str, torch.Tensor]:
    image = torch.randn(3, IMAGE_SIZE, IMAGE_SIZE, generator=generator)
    return {"pixel_values": image, "labels": torch.randint(0, 2, (), generator=generator)}


def _value_example(generator: torch.Generator) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, VOCAB, (SEQ_LEN,), generator=generator)
    return {"input_ids": ids, "labels": torch.randn((), generator=generator)}


@dataclass(frozen=True)
class Architecture:
    build: Callable[[], PreTrainedModel]
    example: Callable[[torch.Generator], dict[str, torch.Tensor]]
    task_type: str | None = "CAUSAL_LM"
    target_modules: list[str] | None = None


ARCHITECTURES = {
    "mamba2": Architecture(_mamba2, _lm_example),
    "mamba": Architecture(_mamba, _lm_example),
    "granite_moe_hybrid": Architecture(_granite_moe_hybrid, _lm_example),
    "swin": Architecture(_swin, _image_example, task_type=None),
    "qwen3_moe": Architecture(_qwen3_moe, _lm_example),
    # The value head is outside the blocks, so only naming it makes it a target.
    "gpt2_value_head": Architecture(
        _gpt2_value_head, _value_example, task_type=None, target_modules=["c_attn", "c_proj", "c_fc", "score"]
    ),
}


def fresh(arch: str) -> PreTrainedModel:
    """The tiny model of `arch`, with the same weights on every call."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return ARCHITECTURES[arch].build()


def examples(arch: str, count: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [ARCHITECTURES[arch].example(generator) for _ in range(count)]


def batch(arch: str, seed: int = 1) -> dict[str, torch.Tensor]:
    rows = examples(arch, 2, seed)
    return {key: torch.stack([row[key] for row in rows]) for key in rows[0]}


@torch.no_grad()
def logits(model: nn.Module, arch: str) -> torch.Tensor:
    model.eval()
    return model(**batch(arch)).logits


def search(arch: str, **config) -> peft.PeftModel:
    spec = ARCHITECTURES[arch]
    config = S3SearchConfig(
        **{"budget": 0.05, "task_type": spec.task_type, "target_modules": spec.target_modules, **config}
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MoE models name their routers and expert blocks in a warning
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return peft.get_peft_model(fresh(arch), config)


def module_of(path: str) -> str:
    return path.rpartition(".")[2]


def expected_merge_refusal(structure: SearchedStructure) -> str | None:
    """The documented reason a merge of `structure` is refused, or None when it merges."""
    for candidate in structure.candidates:
        if candidate.kind == "adapter":
            return "non-linear and cannot be merged"
        if candidate.kind == "bitfit" and structure.modules[candidate.module].bias_params == 0:
            return "no base bias to merge it into"
    return None


@pytest.mark.parametrize("arch", list(ARCHITECTURES))
def test_search_step_resolve_apply_save_load_merge_and_lora_export(arch: str, tmp_path: Path) -> None:
    model = search(arch)
    searched = {candidate.module for candidate in model.base_model.candidates()}
    for pattern in ARCHITECTURES[arch].target_modules or []:
        assert any(module_of(module) == pattern for module in searched), (
            f"target_modules names {pattern}: no candidate"
        )
    alpha = model.base_model.s3_alpha["default"]
    alpha_before = alpha.detach().clone()
    args = TrainingArguments(
        str(tmp_path / "search"),
        per_device_train_batch_size=4,
        max_steps=1,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        save_strategy="no",
        seed=0,
    )
    S3SearchTrainer(model=model, args=args, train_dataset=examples(arch, 8)).train()
    assert not torch.equal(alpha.detach(), alpha_before), "the search step left alpha unchanged"

    modules = dict(model.base_model.model.named_modules())
    with torch.no_grad():
        # Open the LoRA slices on linear layers (not on expert parameters), so that the structure holds some whatever
        # one step ranked first, and its LoraConfig has targets.
        for index, candidate in enumerate(model.base_model.candidates()):
            if candidate.kind == "lora" and candidate.module in modules:
                alpha[index] += 5.0
    structure = resolve(model)
    assert structure.candidates and structure.num_trainable_params <= structure.budget

    retrain = apply_structure(fresh(arch), structure)
    assert sum(p.numel() for p in retrain.parameters() if p.requires_grad) == structure.num_trainable_params
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for parameter in retrain.parameters():
            if parameter.requires_grad:
                parameter.copy_(0.1 * torch.randn(parameter.shape, generator=generator))
    adapted = logits(retrain, arch)
    assert not torch.allclose(adapted, logits(fresh(arch), arch)), "the trained structure does not act"
    retrain.save_pretrained(tmp_path / "adapter")
    reloaded = peft.PeftModel.from_pretrained(fresh(arch), tmp_path / "adapter")
    torch.testing.assert_close(logits(reloaded, arch), adapted)

    refusal = expected_merge_refusal(structure)
    if refusal is None:
        merged = reloaded.merge_and_unload()
        torch.testing.assert_close(logits(merged, arch), adapted, rtol=1e-4, atol=1e-5)
    else:
        with pytest.raises(ValueError, match=refusal):
            reloaded.merge_and_unload()
        torch.testing.assert_close(logits(reloaded, arch), adapted)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # what the LoraConfig cannot express is dropped, with a warning
        lora_config = structure.to_lora_config(policy="drop")
    # Before get_peft_model, which shortens long target lists in place to equivalent suffixes.
    expected = {f"base_model.model.{path}" for path in lora_config.target_modules}
    lora_model = peft.get_peft_model(fresh(arch), lora_config)
    assert {
        path for path, module in lora_model.named_modules() if isinstance(module, peft.tuners.lora.Linear)
    } == expected


def test_gated_norm_keeps_its_gate_under_lnfit() -> None:
    """Mamba2 calls its gated RMSNorm as norm(x, gate): LNFit on it must pass the gate on."""
    norm = "backbone.layers.0.mixer.norm"
    base_logits = logits(fresh("mamba2"), "mamba2")
    at_init = peft.get_peft_model(fresh("mamba2"), S3SearchConfig(structure={norm: {"lnfit": 1}}))
    torch.testing.assert_close(logits(at_init, "mamba2"), base_logits)

    trained = peft.get_peft_model(fresh("mamba2"), S3SearchConfig(structure={norm: {"lnfit": 1}}, init_weights=False))
    scale = trained.base_model.model.get_submodule(norm).s3_scale["default"]
    reference = fresh("mamba2")
    with torch.no_grad():
        reference.get_submodule(norm).weight += scale
    torch.testing.assert_close(logits(trained, "mamba2"), logits(reference, "mamba2"))


def test_wrapped_norm_reads_through_to_the_base_norm() -> None:
    model = search("granite_moe_hybrid", init_weights=False)  # non-zero deltas: alpha gets a gradient
    wrapped = model.base_model.model.get_submodule("model.layers.0.mamba.norm")
    base = fresh("granite_moe_hybrid").get_submodule("model.layers.0.mamba.norm")
    assert isinstance(wrapped, peft.tuners.tuners_utils.BaseTunerLayer)
    assert wrapped.variance_epsilon == base.variance_epsilon
    with pytest.raises(AttributeError, match="no_such_attribute"):
        getattr(wrapped, "no_such_attribute")  # noqa: B009
    # The mixer reads norm.variance_epsilon on its training path: a training forward and backward run.
    model.train()
    model(**batch("granite_moe_hybrid")).loss.backward()
    assert model.base_model.s3_alpha["default"].grad.abs().sum() > 0


# The state-space mixer of layer 0, which holds the depthwise conv1d.
MIXERS = {
    "mamba2": "backbone.layers.0.mixer",
    "mamba": "backbone.layers.0.mixer",
    "granite_moe_hybrid": "model.layers.0.mamba",
}


@pytest.mark.parametrize("arch", list(MIXERS))
def test_convolutions_are_not_experts_and_mixers_are_not_moe_blocks(arch: str) -> None:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = search(arch)
    modules = {candidate.module for candidate in model.base_model.candidates()}
    assert not any("conv1d" in module for module in modules)
    assert not [w for w in caught if f"'{MIXERS[arch]}'" in str(w.message)], "the mixer was taken for an MoE block"
    if arch == "granite_moe_hybrid":
        # The state-space mixer groups like an attention: an adapter on its output, and one on the shared MLP's.
        adapters = {c.position for c in model.base_model.candidates() if c.kind == "adapter" and c.layer == 0}
        assert adapters == {"mamba.out_proj", "shared_mlp.output_linear"}
        experts = {module_of(c.module) for c in model.base_model.candidates() if ".experts." in c.module}
        assert experts == {"gate_up_proj", "down_proj"}


@pytest.mark.parametrize("arch", ["mamba2", "mamba"])
def test_mamba_kernel_modules_follow_peft(arch: str) -> None:
    """peft refuses LoRA on out_proj / conv1d of Mamba models; S3 offers nothing there and refuses to be told to."""
    with pytest.raises(ValueError, match="out_proj"):
        peft.get_peft_model(fresh(arch), peft.LoraConfig(target_modules=["in_proj", "out_proj"]))
    model = search(arch, candidate_kinds=["lora", "bitfit", "adapter"])
    assert not any(module_of(c.module) in ("out_proj", "conv1d") for c in model.base_model.candidates())
    with pytest.raises(
        ValueError,
        match=r"out_proj'\] cannot be adapted .*CUDA kernels read the weights .* Leave them out of target_modules",
    ):
        search(arch, target_modules=["in_proj", "out_proj"])
    with pytest.raises(ValueError, match=r"cannot be adapted .*\(or of the structure\)"):
        peft.get_peft_model(fresh(arch), S3SearchConfig(structure={"backbone.layers.0.mixer.out_proj": {"lora": 1}}))

    with torch.no_grad():
        model.base_model.s3_alpha["default"] += 5.0  # with a budget of the whole space, the structure is all of it
    structure = resolve(model, budget=sum(c.num_params for c in model.base_model.candidates()))
    assert any(module_of(module) == "in_proj" for module in structure.structure)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the BitFit and adapter candidates are dropped, with a warning
        lora_config = structure.to_lora_config(policy="drop")
    peft.get_peft_model(fresh(arch), lora_config)


def test_swin_blocks_are_the_innermost_stacks_and_their_mlps_get_adapters() -> None:
    candidates = search("swin").base_model.candidates()
    stacks = {c.stack for c in candidates if c.stack is not None}
    assert stacks == {"swin.encoder.layers.0.blocks", "swin.encoder.layers.1.blocks"}
    adapters = {c.module for c in candidates if c.kind == "adapter"}
    blocks = [f"swin.encoder.layers.{stage}.blocks.{block}" for stage in range(2) for block in range(2)]
    assert adapters == {f"{block}.{sub}" for block in blocks for sub in ("attention.o_proj", "mlp.fc2")}
    assert not any("downsample" in c.module for c in candidates)


class _ValueHeadModel(nn.Module):
    """A GPT-2 body with a GPT-2 style Conv1D(1, d) value head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = GPT2Model(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2, n_head=2, n_positions=32))
        self.v_head = Conv1D(1, 16)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.v_head(self.body(input_ids).last_hidden_state).squeeze(-1)


def test_width_one_linears_are_searched_when_named_and_only_moe_routers_are_skipped() -> None:
    named = S3SearchConfig(budget=0.05, target_modules=["c_attn", "v_head"], max_rank=2)
    candidates = peft.get_peft_model(_ValueHeadModel(), named).base_model.candidates()
    assert [(c.kind, c.num_params) for c in candidates if c.module == "v_head"] == [
        ("lora", 17),
        ("lora", 17),
        ("bitfit", 1),
    ]
    structure = {"v_head": {"lora": 1}}
    fixed = peft.get_peft_model(_ValueHeadModel(), S3SearchConfig(structure=structure))
    assert [c.module for c in fixed.base_model.candidates()] == ["v_head"]

    def qwen2_moe() -> PreTrainedModel:
        config = Qwen2MoeConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            intermediate_size=32,
            moe_intermediate_size=8,
            shared_expert_intermediate_size=16,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            num_experts=4,
            num_experts_per_tok=2,
        )
        return Qwen2MoeForCausalLM(config)

    gate = "model.layers.0.mlp.shared_expert_gate"
    with pytest.warns(UserWarning, match="routing or width-1 gating linears"):
        default = peft.get_peft_model(qwen2_moe(), S3SearchConfig(budget=0.05))
    assert not any(c.module == gate for c in default.base_model.candidates())
    explicit = S3SearchConfig(budget=100, target_modules=["q_proj", "shared_expert_gate"])
    assert any(c.module == gate for c in peft.get_peft_model(qwen2_moe(), explicit).base_model.candidates())

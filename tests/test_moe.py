"""Mixture-of-experts bases: LoRA slices on fused expert weights, nothing on routers or width-1 gates."""

from __future__ import annotations

import copy
import warnings

import peft
import pytest
import torch
from transformers import (
    GptOssConfig,
    GptOssForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    PreTrainedModel,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
)

from peft_s3 import S3SearchConfig, SearchedStructure, apply_structure, resolve

SIZES = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1)
EXPERTS = 4


def tiny_mixtral() -> PreTrainedModel:
    config = MixtralConfig(**SIZES, intermediate_size=48, num_local_experts=EXPERTS, num_experts_per_tok=2)
    return MixtralForCausalLM(config)


def tiny_qwen2_moe() -> PreTrainedModel:
    config = Qwen2MoeConfig(
        **SIZES,
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=48,
        num_experts=EXPERTS,
        num_experts_per_tok=2,
    )
    return Qwen2MoeForCausalLM(config)


def tiny_olmoe() -> PreTrainedModel:
    config = OlmoeConfig(**SIZES, intermediate_size=48, num_experts=EXPERTS, num_experts_per_tok=2, eos_token_id=2)
    return OlmoeForCausalLM(config)


def tiny_gpt_oss() -> PreTrainedModel:
    # Expert weights stored (experts, in, out), with per-expert biases, and a router with a bias.
    config = GptOssConfig(
        **SIZES,
        intermediate_size=48,
        head_dim=16,
        num_local_experts=EXPERTS,
        num_experts_per_tok=2,
        layer_types=["full_attention"] * 2,
        eos_token_id=2,
        pad_token_id=0,
    )
    return GptOssForCausalLM(config)


MOE_MODELS = {"mixtral": tiny_mixtral, "qwen2_moe": tiny_qwen2_moe, "olmoe": tiny_olmoe, "gpt_oss": tiny_gpt_oss}
# Per model: the experts module of layer 0, its fused weights with their (experts, rows, columns) shapes, and the
# routing modules that must carry nothing.
EXPERT_WEIGHTS = {
    "mixtral": {"gate_up_proj": (EXPERTS, 96, 32), "down_proj": (EXPERTS, 32, 48)},
    "qwen2_moe": {"gate_up_proj": (EXPERTS, 48, 32), "down_proj": (EXPERTS, 32, 24)},
    "olmoe": {"gate_up_proj": (EXPERTS, 96, 32), "down_proj": (EXPERTS, 32, 48)},
    "gpt_oss": {"gate_up_proj": (EXPERTS, 32, 96), "down_proj": (EXPERTS, 48, 32)},
}
ROUTING = {
    "mixtral": ["mlp.gate"],
    "qwen2_moe": ["mlp.gate", "mlp.shared_expert_gate"],
    "olmoe": ["mlp.gate"],
    "gpt_oss": ["mlp.router"],
}


def _model(arch: str) -> PreTrainedModel:
    torch.manual_seed(0)
    return MOE_MODELS[arch]()


def _batch(seed: int = 0) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (2, 8), generator=torch.Generator().manual_seed(seed))
    return {"input_ids": ids, "labels": ids}


def _search(arch: str, budget: int = 2000, **config) -> peft.PeftModel:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return peft.get_peft_model(_model(arch), S3SearchConfig(budget=budget, task_type="CAUSAL_LM", **config))


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_fused_expert_weights_get_lora_slices_that_count_every_expert(arch: str) -> None:
    candidates = _search(arch, max_rank=2).base_model.candidates()
    prefix = "model.layers.0.mlp.experts."
    for parameter, (experts, rows, columns) in EXPERT_WEIGHTS[arch].items():
        slices = [c for c in candidates if c.module == prefix + parameter]
        assert [(c.kind, c.slot) for c in slices] == [("lora", 0), ("lora", 1)]
        assert all(c.num_params == experts * (rows + columns) for c in slices)
        assert slices[0].layer == 0 and slices[0].position == f"mlp.experts.{parameter}"


@pytest.mark.parametrize("arch", list(MOE_MODELS))
def test_routers_and_width_one_gates_carry_nothing_and_left_outs_are_named_in_a_warning(arch: str) -> None:
    with pytest.warns(UserWarning, match="S3 search space: ") as caught:
        model = peft.get_peft_model(_model(arch), S3SearchConfig(budget=2000, task_type="CAUSAL_LM"))
    routing = [f"model.layers.{layer}.{module}" for layer in range(2) for module in ROUTING[arch]]
    modules = {c.module for c in model.base_model.candidates()}
    assert not any(module == path or module.startswith(f"{path}.") for path in routing for module in modules)
    message = str(next(w.message for w in caught if "S3 search space" in str(w.message)))
    base = model.base_model.model
    linear_routing = [path for path in routing if isinstance(base.get_submodule(path), torch.nn.Linear)]
    assert all(path in message for path in linear_routing[:4])
    assert bool(linear_routing) == ("routing or width-1 gating linears" in message)
    # No default adapter in a mixture-of-experts feed-forward block: its output is a routed sum, not one projection.
    assert "no default adapter on 2 mixture-of-experts feed-forward blocks" in message
    adapters = [c.module for c in model.base_model.candidates() if c.kind == "adapter"]
    assert adapters and all("self_attn" in module for module in adapters)


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss"])
def test_expert_slices_add_b_times_a_to_every_expert(arch: str) -> None:
    """A fixed structure with expert slices computes what the base computes with W[e] + scaling * B[e] A[e]."""
    base = _model(arch)
    reference = copy.deepcopy(base)
    target = "model.layers.1.mlp.experts.down_proj"
    config = S3SearchConfig(structure={target: {"lora": 2}}, max_rank=2, lora_alpha=6, init_weights=False)
    model = peft.get_peft_model(base, config)
    layer = model.base_model.model.get_submodule("model.layers.1.mlp.experts")
    lora_a, lora_b = layer.s3_expert_A["default"]["down_proj"], layer.s3_expert_B["default"]["down_proj"]
    assert lora_a.shape[:2] == (EXPERTS, 2) and lora_b.shape[::2] == (EXPERTS, 2)
    with torch.no_grad():
        weight = reference.get_submodule(target.rpartition(".")[0]).down_proj
        weight += 3.0 * torch.bmm(lora_b, lora_a)
    batch = _batch()
    model.eval(), reference.eval()
    torch.testing.assert_close(model(**batch).logits, reference(**batch).logits)
    assert model.get_nb_trainable_parameters()[0] == 2 * EXPERTS * sum(EXPERT_WEIGHTS[arch]["down_proj"][1:])
    merged = model.merge_and_unload()
    torch.testing.assert_close(merged(**batch).logits, reference(**batch).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_expert_gates_learn_and_the_structure_retrains_and_reloads(arch: str, tmp_path) -> None:
    model = _search(arch, init_weights=False, candidate_kinds=["lora"])
    loss = model(**_batch()).loss
    loss.backward()
    alpha_grad = model.base_model.s3_alpha["default"].grad
    expert_gates = [i for i, c in enumerate(model.base_model.candidates()) if ".experts." in c.module]
    assert alpha_grad[expert_gates].abs().min() > 0
    with torch.no_grad():
        # Open the expert slices first, so the resolved structure holds some.
        model.base_model.s3_alpha["default"][expert_gates] += 5.0
    structure = resolve(model)
    chosen = [c for c in structure.candidates if ".experts." in c.module]
    assert chosen and structure.num_trainable_params <= structure.budget

    structure.save(tmp_path / "structure")
    retrain = apply_structure(_model(arch), SearchedStructure.load(tmp_path / "structure"))
    trainable = sum(p.numel() for n, p in retrain.named_parameters() if p.requires_grad)
    assert trainable == structure.num_trainable_params
    retrain(**_batch()).loss.backward()
    optimizer = torch.optim.SGD([p for p in retrain.parameters() if p.requires_grad], lr=0.5)
    optimizer.step()
    retrain.save_pretrained(tmp_path)
    reloaded = peft.PeftModel.from_pretrained(_model(arch), tmp_path)
    retrain.eval(), reloaded.eval()
    torch.testing.assert_close(reloaded(**_batch(1)).logits, retrain(**_batch(1)).logits)


def test_target_modules_can_name_expert_weights_and_exclude_modules_can_drop_them() -> None:
    only_experts = _search("mixtral", 400, target_modules=r".*experts\.down_proj", candidate_kinds=["lora"])
    assert {c.module.rpartition(".")[2] for c in only_experts.base_model.candidates()} == {"down_proj"}
    without = _search("mixtral", 800, exclude_modules=r".*experts\.gate_up_proj")
    assert not any(c.module.endswith("gate_up_proj") for c in without.base_model.candidates())
    with pytest.raises(ValueError, match="matches no linear module"):
        _search("mixtral", target_modules=["experts.no_such_weight"])


def test_lora_conversion_names_expert_slices_as_not_expressible() -> None:
    model = _search("mixtral", candidate_kinds=["lora"])
    with torch.no_grad():
        model.base_model.s3_alpha["default"].normal_(generator=torch.Generator().manual_seed(0))
        for index, candidate in enumerate(model.base_model.candidates()):
            if ".experts." in candidate.module:
                model.base_model.s3_alpha["default"][index] += 5.0
    structure = resolve(model)
    with pytest.raises(ValueError, match="fused expert"):
        structure.to_lora_config()
    dropped = structure.lora_conversion(policy="drop")
    assert all(".experts." in name for name in dropped.dropped)
    assert not any("experts" in str(module) for module in dropped.config.target_modules)

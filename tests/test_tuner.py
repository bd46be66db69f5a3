"""The S3 tuner on four tiny architectures: registration, search space, training signal, save/load, merge, errors."""

from __future__ import annotations

import contextlib
import copy
import importlib
from collections.abc import Iterator

import peft
import pytest
import torch
import torch.nn.functional as F
from conftest import NUM_LAYERS, TASK_TYPES, TINY_MODELS, make_batch
from peft import PeftConfig, PeftModel
from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING, PEFT_TYPE_TO_PREFIX_MAPPING, PEFT_TYPE_TO_TUNER_MAPPING
from peft.utils import PeftType
from torch import nn
from transformers import LlamaForCausalLM

import peft_s3
from peft_s3 import S3Model, S3SearchConfig
from peft_s3.tuner import S3Linear, S3Norm
from peft_s3.tuner.search_space import is_linear, is_norm, linear_features

ARCHS = list(TINY_MODELS)
DELTA_PARAMETERS = ("s3_lora_A", "s3_lora_B", "s3_bias", "s3_scale", "s3_adapter_down", "s3_adapter_up")

# Where the default Mix space must put its candidates on each tiny model.
LAYOUT = {
    "bert": {
        "stacks": {"bert.encoder.layer"},
        "adapters": {("bert.encoder.layer", "attention.output.dense"), ("bert.encoder.layer", "output.dense")},
        "norm_class": "LayerNorm",
        "bias_free_linears": False,
    },
    "t5": {
        "stacks": {"encoder.block", "decoder.block"},
        "adapters": {
            ("encoder.block", "layer.0.SelfAttention.o"),
            ("encoder.block", "layer.1.DenseReluDense.wo"),
            ("decoder.block", "layer.0.SelfAttention.o"),
            ("decoder.block", "layer.1.EncDecAttention.o"),
            ("decoder.block", "layer.2.DenseReluDense.wo"),
        },
        "norm_class": "T5LayerNorm",
        "bias_free_linears": True,
    },
    "gpt2": {
        "stacks": {"transformer.h"},
        "adapters": {("transformer.h", "attn.c_proj"), ("transformer.h", "mlp.c_proj")},
        "norm_class": "LayerNorm",
        "bias_free_linears": False,
    },
    "llama": {
        "stacks": {"model.layers"},
        "adapters": {("model.layers", "self_attn.o_proj"), ("model.layers", "mlp.down_proj")},
        "norm_class": "LlamaRMSNorm",
        "bias_free_linears": True,
    },
}

# A fixed structure per architecture that is fully mergeable: LoRA (rank 2 and 1), BitFit only where the base layer
# has a bias, LNFit (plus BitFit on LayerNorms that have a bias).
MERGEABLE_STRUCTURES = {
    "bert": {
        "bert.encoder.layer.0.attention.self.query": {"lora": 2, "bitfit": 1},
        "bert.encoder.layer.1.output.dense": {"lora": 1, "bitfit": 1},
        "bert.encoder.layer.0.output.LayerNorm": {"lnfit": 1, "bitfit": 1},
    },
    "t5": {
        "encoder.block.0.layer.0.SelfAttention.q": {"lora": 2},
        "decoder.block.1.layer.1.EncDecAttention.o": {"lora": 1},
        "decoder.block.0.layer.2.layer_norm": {"lnfit": 1},
    },
    "gpt2": {
        "transformer.h.0.attn.c_attn": {"lora": 2, "bitfit": 1},
        "transformer.h.1.mlp.c_proj": {"lora": 1, "bitfit": 1},
        "transformer.h.0.ln_2": {"lnfit": 1, "bitfit": 1},
    },
    "llama": {
        "model.layers.0.self_attn.q_proj": {"lora": 2},
        "model.layers.1.mlp.down_proj": {"lora": 1},
        "model.layers.0.input_layernorm": {"lnfit": 1},
    },
}

# One linear per architecture to restrict target_modules to.
TARGET_NAMES = {"bert": "query", "t5": "q", "gpt2": "c_attn", "llama": "q_proj"}


def search_model(arch: str, **config_kwargs) -> PeftModel:
    config_kwargs.setdefault("budget", 0.01)
    return peft.get_peft_model(TINY_MODELS[arch](), S3SearchConfig(task_type=TASK_TYPES[arch], **config_kwargs))


def fixed_model(arch: str, structure: dict[str, dict[str, int]], **config_kwargs) -> PeftModel:
    config = S3SearchConfig(structure=structure, task_type=TASK_TYPES[arch], **config_kwargs)
    return peft.get_peft_model(TINY_MODELS[arch](), config)


def eval_logits(model: nn.Module, arch: str) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**make_batch(arch)).logits


def s3_model(model: PeftModel) -> S3Model:
    assert isinstance(model.base_model, S3Model)
    return model.base_model


def block_modules(model: nn.Module, arch: str) -> dict[str, nn.Module]:
    """Every module inside the transformer block stacks of `model`, by path."""
    stacks = tuple(f"{stack}." for stack in LAYOUT[arch]["stacks"])
    return {path: module for path, module in model.named_modules() if path.startswith(stacks)}


def randomize_alphas(model: PeftModel, seed: int) -> None:
    alpha = s3_model(model).s3_alpha["default"]
    with torch.no_grad():
        alpha.copy_(torch.randn(len(alpha), generator=torch.Generator().manual_seed(seed)) * 2)


# ------------------------------------------------------------------------------------------------------ registration


def test_registration_is_complete_and_idempotent() -> None:
    assert PeftType.S3.value == "S3"
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.S3] is S3SearchConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.S3] is S3Model
    assert PEFT_TYPE_TO_PREFIX_MAPPING[PeftType.S3] == S3Model.prefix == "s3_"
    members = list(PeftType)

    importlib.reload(peft_s3)
    peft_s3._registration.register()
    peft_s3._registration.register()

    assert list(PeftType) == members
    assert PEFT_TYPE_TO_CONFIG_MAPPING[PeftType.S3] is S3SearchConfig
    assert PEFT_TYPE_TO_TUNER_MAPPING[PeftType.S3] is S3Model
    assert S3SearchConfig(budget=0.1).peft_type is PeftType.S3


# ---------------------------------------------------------------------------------------- forward, backward, counts


@pytest.mark.parametrize("arch", ARCHS)
def test_training_signal_reaches_alpha_and_every_delta(arch: str, capsys: pytest.CaptureFixture[str]) -> None:
    torch.manual_seed(0)
    # A rank-1 ReLU adapter is dead (zero gradient) when its one unit is negative on every token of a tiny batch.
    model = search_model(arch, init_weights=False, adapter_activation="tanh")
    model.train()
    loss = model(**make_batch(arch)).loss
    loss.backward()

    alpha = s3_model(model).s3_alpha["default"]
    assert alpha.grad is not None and (alpha.grad != 0).all()
    seen_kinds = set()
    for name, param in model.named_parameters():
        kind = next((kind for kind in DELTA_PARAMETERS if f".{kind}." in name), None)
        if kind is not None:
            seen_kinds.add(kind)
            assert param.requires_grad and param.grad is not None and param.grad.abs().sum() > 0, name
        elif "modules_to_save" not in name and "s3_alpha" not in name:
            assert not param.requires_grad and param.grad is None, name
    assert seen_kinds == set(DELTA_PARAMETERS)

    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert (head > 0) == (arch == "bert")
    candidates = s3_model(model).candidates()
    trainable, _ = model.get_nb_trainable_parameters()
    assert trainable == sum(c.num_params for c in candidates) + len(candidates) + head
    model.print_trainable_parameters()
    assert f"trainable params: {trainable:,}" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------------------ search space


@pytest.mark.parametrize("arch", ARCHS)
def test_default_mix_space_layout(arch: str) -> None:
    layout = LAYOUT[arch]
    model = search_model(arch)
    candidates = s3_model(model).candidates()
    base = TINY_MODELS[arch]()
    in_blocks = block_modules(base, arch)

    assert {c.kind for c in candidates} == set(peft_s3.MIX_SPACE)
    assert {c.stack for c in candidates} == layout["stacks"]

    adapters = [c for c in candidates if c.kind == "adapter"]
    assert {(c.stack, c.position) for c in adapters} == layout["adapters"]
    assert len(adapters) == len(layout["adapters"]) * NUM_LAYERS
    assert {(c.stack, c.position, c.layer) for c in adapters} == {
        (stack, position, layer) for stack, position in layout["adapters"] for layer in range(NUM_LAYERS)
    }

    linears = {path for path, module in in_blocks.items() if is_linear(module)}
    norms = {path for path, module in in_blocks.items() if is_norm(module)}
    assert {type(in_blocks[path]).__name__ for path in norms} == {layout["norm_class"]}
    assert {c.module for c in candidates if c.kind == "lora"} == linears
    assert {c.module for c in candidates if c.kind == "lnfit"} == norms
    assert {c.module for c in candidates if c.kind == "bitfit"} == linears | norms
    bias_free = {path for path in linears if getattr(in_blocks[path], "bias", None) is None}
    assert bool(bias_free) == layout["bias_free_linears"]

    for candidate in candidates:
        module = in_blocks[candidate.module]
        if candidate.kind == "lora":
            assert candidate.num_params == sum(linear_features(module))
        elif candidate.kind in ("bitfit", "lnfit") and is_norm(module):
            assert candidate.num_params == module.weight.shape[0]
        assert candidate.layer == int(candidate.module[len(candidate.stack) + 1 :].split(".")[0])


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_space_with_rank_slices(arch: str) -> None:
    candidates = s3_model(search_model(arch, candidate_kinds=["lora"], max_rank=4)).candidates()
    linears = [path for path, module in block_modules(TINY_MODELS[arch](), arch).items() if is_linear(module)]
    assert {c.kind for c in candidates} == {"lora"}
    assert len(candidates) == 4 * len(linears)
    assert sorted((c.module, c.slot) for c in candidates) == sorted((m, s) for m in linears for s in range(4))
    assert {c.name for c in candidates if c.slot == 3} == {f"{m}:lora[3]" for m in linears}


@pytest.mark.parametrize("arch", ARCHS)
def test_target_modules_restrict_linear_candidates(arch: str) -> None:
    target = TARGET_NAMES[arch]
    candidates = s3_model(search_model(arch, target_modules=[target])).candidates()
    modules = dict(TINY_MODELS[arch]().named_modules())
    linear_candidates = [c for c in candidates if c.kind != "adapter" and is_linear(modules[c.module])]
    assert len({c.module for c in linear_candidates}) >= NUM_LAYERS
    assert all(c.module.endswith(f".{target}") for c in linear_candidates)
    assert {c.kind for c in linear_candidates} == {"lora", "bitfit"}
    # Norms and adapters keep their default positions.
    assert {c.kind for c in candidates} == set(peft_s3.MIX_SPACE)


def test_target_modules_regex() -> None:
    candidates = s3_model(search_model("llama", target_modules=r".*layers\.1\..*_proj")).candidates()
    assert {c.layer for c in candidates if c.kind == "lora"} == {1}


# --------------------------------------------------------------------------------------------------------- save/load


@pytest.mark.parametrize("arch", ARCHS)
def test_search_round_trip(arch: str, tmp_path) -> None:
    model = search_model(arch, init_weights=False, max_rank=2)
    randomize_alphas(model, seed=1)
    expected = eval_logits(model, arch)
    assert not torch.allclose(expected, eval_logits(TINY_MODELS[arch](), arch))
    model.save_pretrained(tmp_path)

    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, S3SearchConfig)
    original = model.peft_config["default"].to_dict()
    loaded = loaded_config.to_dict()
    assert original.pop("inference_mode") is False and loaded.pop("inference_mode") is True
    assert loaded == original

    reloaded = PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    torch.testing.assert_close(
        s3_model(reloaded).s3_alpha["default"], s3_model(model).s3_alpha["default"], atol=0, rtol=0
    )
    torch.testing.assert_close(eval_logits(reloaded, arch), expected, atol=0, rtol=0)
    assert [c.name for c in s3_model(reloaded).candidates()] == [c.name for c in s3_model(model).candidates()]


@pytest.mark.parametrize("is_trainable", [True, False])
def test_reload_trains_alpha_only_when_trainable(is_trainable: bool, tmp_path) -> None:
    search_model("llama").save_pretrained(tmp_path)
    reloaded = PeftModel.from_pretrained(TINY_MODELS["llama"](), tmp_path, is_trainable=is_trainable)
    assert s3_model(reloaded).s3_alpha["default"].requires_grad is is_trainable
    assert (reloaded.get_nb_trainable_parameters()[0] > 0) is is_trainable


def test_second_adapter_is_planned_on_the_original_structure() -> None:
    torch.manual_seed(0)
    model = search_model("llama", init_weights=False)
    lora_only = {"budget": 0.05, "candidate_kinds": ["lora"], "init_weights": False}
    model.add_adapter("lora_only", S3SearchConfig(**lora_only))
    tuner = s3_model(model)
    assert tuner.candidates("lora_only") == s3_model(search_model("llama", **lora_only)).candidates()

    model.set_adapter("lora_only")
    assert not tuner.s3_alpha["default"].requires_grad and tuner.s3_alpha["lora_only"].requires_grad
    model.train()
    model(**make_batch("llama")).loss.backward()
    assert tuner.s3_alpha["lora_only"].grad.abs().sum() > 0 and tuner.s3_alpha["default"].grad is None

    model.delete_adapter("lora_only")
    assert list(tuner.s3_alpha) == ["default"] and tuner.s3_alpha["default"].requires_grad
    assert tuner.candidates() == s3_model(search_model("llama")).candidates()


def test_load_adapter_onto_an_adapted_model(tmp_path) -> None:
    saved = search_model("llama", max_rank=2)
    randomize_alphas(saved, seed=2)
    saved.save_pretrained(tmp_path)
    model = search_model("llama", max_rank=2)
    model.load_adapter(tmp_path, adapter_name="loaded")
    torch.testing.assert_close(s3_model(model).s3_alpha["loaded"], s3_model(saved).s3_alpha["default"], atol=0, rtol=0)


def test_generate_runs_the_encoder_with_current_eval_gates() -> None:
    """T5's generate() calls the encoder on its own, before any full forward pass of the model."""
    torch.manual_seed(0)
    model = search_model("t5", init_weights=False)
    batch = make_batch("t5")
    model.train()
    model(**batch)  # leaves sampled training gates behind
    model.eval()
    captured = []
    encoder = model.get_base_model().get_encoder()
    handle = encoder.register_forward_hook(lambda module, args, output: captured.append(output.last_hidden_state))
    try:
        with torch.no_grad():
            model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], max_new_tokens=2)
    finally:
        handle.remove()
    assert len(captured) == 1
    with torch.no_grad():
        expected = model(**batch).encoder_last_hidden_state
    torch.testing.assert_close(captured[0], expected)


def test_config_can_be_reused_on_another_model() -> None:
    config = S3SearchConfig(budget=0.05)
    first = peft.get_peft_model(TINY_MODELS["llama"](), config)
    second = peft.get_peft_model(TINY_MODELS["gpt2"](), config)
    assert config.search_space_signature is None
    signatures = {m.peft_config["default"].search_space_signature for m in (first, second)}
    assert len(signatures) == 2 and None not in signatures


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_structure_creates_exactly_the_structure(arch: str, tmp_path) -> None:
    structure = MERGEABLE_STRUCTURES[arch]
    model = fixed_model(arch, structure, init_weights=False)
    tuner = s3_model(model)
    expected_names = {
        f"{module}:{kind}[{slot}]" if kind == "lora" else f"{module}:{kind}"
        for module, kinds in structure.items()
        for kind, count in kinds.items()
        for slot in range(count)
    }
    assert {c.name for c in tuner.candidates()} == expected_names
    assert tuner.gate_bank() is None and tuner.budget() is None and len(tuner.s3_alpha) == 0
    torch.testing.assert_close(tuner.gate_probabilities(), torch.ones(len(expected_names)))
    assert all(row["alpha"] is None and row["p"] == 1.0 for row in tuner.gate_report())
    trainable, _ = model.get_nb_trainable_parameters()
    head = sum(p.numel() for n, p in model.named_parameters() if "modules_to_save" in n)
    assert trainable == sum(c.num_params for c in tuner.candidates()) + head

    expected = eval_logits(model, arch)
    model.save_pretrained(tmp_path)
    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, S3SearchConfig) and loaded_config.structure == structure
    reloaded = PeftModel.from_pretrained(TINY_MODELS[arch](), tmp_path)
    torch.testing.assert_close(eval_logits(reloaded, arch), expected, atol=0, rtol=0)


@pytest.mark.parametrize("arch", ARCHS)
def test_fixed_structure_gates_are_open(arch: str) -> None:
    """Each layer's output is its base output plus the full (ungated) deltas."""
    model = fixed_model(arch, MERGEABLE_STRUCTURES[arch], init_weights=False)
    generator = torch.Generator().manual_seed(0)
    layers = [m for m in model.modules() if isinstance(m, (S3Linear, S3Norm))]
    assert len(layers) == len(MERGEABLE_STRUCTURES[arch])
    for layer in layers:
        base = layer.get_base_layer()
        width = linear_features(base)[0] if isinstance(layer, S3Linear) else base.weight.shape[0]
        x = torch.randn(3, width, generator=generator)
        if isinstance(layer, S3Linear):
            expected = base(x)
            if "default" in layer.s3_lora_A:
                lora = F.linear(F.linear(x, layer.s3_lora_A["default"]), layer.s3_lora_B["default"])
                expected = expected + lora * layer.s3_scaling["default"]
        else:
            shifted = copy.deepcopy(base)
            with torch.no_grad():
                shifted.weight += layer.s3_scale["default"]
            expected = shifted(x)
        if "default" in layer.s3_bias:
            expected = expected + layer.s3_bias["default"]
        with torch.no_grad():
            torch.testing.assert_close(layer(x), expected)


# ------------------------------------------------------------------------------------------------------------- merge


@pytest.mark.parametrize("arch", ARCHS)
def test_merge_and_unload_keeps_outputs(arch: str) -> None:
    model = fixed_model(arch, MERGEABLE_STRUCTURES[arch], init_weights=False)
    expected = eval_logits(model, arch)
    base_logits = eval_logits(TINY_MODELS[arch](), arch)
    with model.disable_adapter():
        torch.testing.assert_close(eval_logits(model, arch), base_logits)
    assert not torch.allclose(expected, base_logits)

    merged = model.merge_and_unload()
    assert isinstance(merged, type(TINY_MODELS[arch]()))
    assert not any(isinstance(m, peft.tuners.tuners_utils.BaseTunerLayer) for m in merged.modules())
    torch.testing.assert_close(eval_logits(merged, arch), expected, atol=1e-5, rtol=0)


def test_merge_adapter_and_unmerge_round_trip() -> None:
    model = fixed_model("gpt2", MERGEABLE_STRUCTURES["gpt2"], init_weights=False)
    expected = eval_logits(model, "gpt2")
    model.merge_adapter()
    torch.testing.assert_close(eval_logits(model, "gpt2"), expected, atol=1e-5, rtol=0)
    model.unmerge_adapter()
    torch.testing.assert_close(eval_logits(model, "gpt2"), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    ("structure", "message"),
    [
        (None, "structure search with soft gates"),
        ({"model.layers.0.mlp.down_proj": {"adapter": 1}}, r"Cannot merge model\.layers\.0\.mlp\.down_proj.*adapter"),
        (
            {"model.layers.0.self_attn.q_proj": {"lora": 1}, "model.layers.1.self_attn.v_proj": {"bitfit": 1}},
            r"Cannot merge model\.layers\.1\.self_attn\.v_proj.*BitFit bias on a bias-free Linear",
        ),
    ],
    ids=["search", "adapter", "bitfit-on-bias-free"],
)
def test_unmergeable_adapters_are_refused_before_touching_the_model(structure, message: str) -> None:
    model = search_model("llama") if structure is None else fixed_model("llama", structure, init_weights=False)
    expected = eval_logits(model, "llama")
    layers_before = sum(isinstance(m, S3Linear) for m in model.modules())
    with pytest.raises(ValueError, match=message):
        model.merge_and_unload()
    with pytest.raises(ValueError, match=message):
        model.merge_adapter()
    assert sum(isinstance(m, S3Linear) for m in model.modules()) == layers_before
    torch.testing.assert_close(eval_logits(model, "llama"), expected, atol=0, rtol=0)


def test_disable_adapter_gives_base_outputs_in_search_mode() -> None:
    model = search_model("bert", init_weights=False)
    expected = eval_logits(TINY_MODELS["bert"](), "bert")
    with model.disable_adapter():
        # The freshly initialised classifier copy equals the base one: only the S3 deltas could differ.
        torch.testing.assert_close(eval_logits(model, "bert"), expected)
    assert not torch.allclose(eval_logits(model, "bert"), expected)


# ------------------------------------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0}, r"budget=0 .*> 0"),
        ({"budget": -0.5}, r"budget=-0\.5 "),
        ({"budget": 2.5}, r"budget=2\.5 .*whole"),
        ({"budget": True}, r"budget=True "),
        ({"budget": float("nan")}, r"budget=nan "),
        ({}, r"needs a `budget`"),
        ({"budget": 0.1, "candidate_kinds": ["lora", "prefix"]}, r"'prefix'.*'lora', 'bitfit', 'lnfit', 'adapter'"),
        ({"budget": 0.1, "candidate_kinds": []}, r"candidate_kinds=\[\]"),
        ({"budget": 0.1, "max_rank": 0}, r"max_rank=0 "),
        ({"budget": 0.1, "tau": 0.0}, r"tau=0\.0 "),
        ({"budget": 0.1, "lora_dropout": 1.0}, r"lora_dropout=1\.0 "),
        ({"budget": 0.1, "adapter_activation": "nope"}, r"adapter_activation='nope'"),
        ({"budget": 0.1, "structure": {"a": {"lora": 1}}}, r"either `budget`.*or `structure`"),
        ({"structure": {}}, r"structure=\{\} "),
        ({"structure": {"a.b": {"prefix": 1}}}, r"'a\.b'.*'prefix'"),
        ({"structure": {"a.b": {"lora": 0}}}, r"structure\['a\.b'\]\['lora'\]=0 .*int >= 1"),
        ({"structure": {"a.b": {"bitfit": 2}}}, r"structure\['a\.b'\]\['bitfit'\]=2 .*must be 1"),
    ],
)
def test_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        S3SearchConfig(**kwargs)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"budget": 0.99}, r"budget=0\.99 allows \d+ .*whole search space has only \d+"),
        ({"budget": 10**6}, r"budget=1000000 allows 1000000 .*whole search space"),
        ({"budget": 3}, r"budget=3 allows 3 .*smallest candidate \(8\)"),
        ({"budget": 1e-6}, r"budget=1e-06 allows 0 .*smallest candidate"),
        ({"budget": 0.1, "target_modules": ["nope"]}, r"target_modules=\['nope'\] matches no linear module.*q_proj"),
        ({"budget": 0.1, "norm_modules": ["nope"]}, r"norm_modules=\['nope'\] matches no normalisation.*layernorm"),
        ({"budget": 0.1, "adapter_modules": "nope.*"}, r"adapter_modules='nope\.\*' matches no module"),
        ({"structure": {"model.layers.9.mlp.down_proj": {"lora": 1}}}, r"does not have: \['model\.layers\.9\."),
        ({"structure": {"model.layers.0.input_layernorm": {"lora": 1}}}, r"input_layernorm:lora.*LoRA needs a linear"),
        ({"structure": {"model.layers.0.mlp.up_proj": {"lnfit": 1}}}, r"up_proj:lnfit.*LNFit a norm"),
    ],
)
def test_model_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        peft.get_peft_model(TINY_MODELS["llama"](), S3SearchConfig(**kwargs))


@pytest.mark.parametrize(
    "model",
    [nn.Sequential(nn.ReLU(), nn.Tanh()), nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))],
    ids=["no-linear", "no-block-stack"],
)
def test_model_without_candidates_is_refused(model: nn.Module) -> None:
    with pytest.raises(ValueError, match=r"No S3 candidates found in Sequential"):
        peft.get_peft_model(model, S3SearchConfig(budget=0.1))


@pytest.mark.parametrize(
    "change",
    [{"num_hidden_layers": NUM_LAYERS + 1}, {"hidden_size": 32, "intermediate_size": 64}],
    ids=["more-layers", "wider"],
)
def test_loading_into_another_model_size_is_refused(change: dict, tmp_path) -> None:
    search_model("llama").save_pretrained(tmp_path)
    saved = PeftConfig.from_pretrained(tmp_path).search_space_signature
    other_config = copy.deepcopy(TINY_MODELS["llama"]().config)
    for key, value in change.items():
        setattr(other_config, key, value)
    with pytest.raises(ValueError, match=rf"signature {saved}.*LlamaForCausalLM.*another architecture or model size"):
        PeftModel.from_pretrained(LlamaForCausalLM(other_config), tmp_path)


def test_loading_into_another_architecture_is_refused(tmp_path) -> None:
    search_model("llama").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"GPT2LMHeadModel.*another architecture"):
        PeftModel.from_pretrained(TINY_MODELS["gpt2"](), tmp_path)


# ----------------------------------------------------------------------------------------- dtype and checkpointing


def test_bf16_model_trains_with_fp32_adapters() -> None:
    torch.manual_seed(0)
    base = TINY_MODELS["llama"]().to(torch.bfloat16)
    model = peft.get_peft_model(base, S3SearchConfig(budget=0.05, init_weights=False))
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)
    model.train()
    output = model(**make_batch("llama"))
    assert output.logits.dtype == torch.bfloat16
    output.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in trainable)
    assert s3_model(model).s3_alpha["default"].grad.abs().sum() > 0


@contextlib.contextmanager
def count_forward_calls(module: nn.Module) -> Iterator[list[int]]:
    calls = [0]
    handle = module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    try:
        yield calls
    finally:
        handle.remove()


def test_gradient_checkpointing_matches_plain_run() -> None:
    torch.manual_seed(0)
    model = search_model("llama", budget=0.05, init_weights=False)
    model.train()
    batch = {**make_batch("llama"), "use_cache": False}
    alpha = s3_model(model).s3_alpha["default"]
    probe = model.get_base_model().model.layers[0].self_attn.o_proj
    runs = []
    with s3_model(model).frozen_gate_noise():
        for checkpointing in (False, True):
            if checkpointing:
                model.get_base_model().gradient_checkpointing_enable(
                    gradient_checkpointing_kwargs={"use_reentrant": False}
                )
            alpha.grad = None
            with count_forward_calls(probe) as calls:
                loss = model(**batch).loss
                loss.backward()
            runs.append((loss.detach(), alpha.grad.clone(), calls[0]))
    (plain_loss, plain_grad, plain_calls), (ckpt_loss, ckpt_grad, ckpt_calls) = runs
    # The checkpointed layer ran again in backward, yet saw the same gates.
    assert (plain_calls, ckpt_calls) == (1, 2)
    torch.testing.assert_close(ckpt_loss, plain_loss)
    torch.testing.assert_close(ckpt_grad, plain_grad)
    assert plain_grad.abs().sum() > 0


def test_config_does_not_share_the_callers_modules_to_save_list() -> None:
    heads = ["pooler"]
    model = peft.get_peft_model(
        TINY_MODELS["bert"](), S3SearchConfig(budget=0.05, modules_to_save=heads, task_type="SEQ_CLS")
    )
    assert heads == ["pooler"]
    assert "classifier" in model.peft_config["default"].modules_to_save

"""Retraining initialisations of a searched structure: fresh, data-driven (EVA), inherited, and peft's through LoRA."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import peft
import pytest
import torch
from conftest import HIDDEN_SIZE, TASK_TYPES, TINY_MODELS, make_batch
from peft.tuners.lora import initialize_lora_eva_weights
from test_moe import _batch as moe_batch
from test_moe import _model as moe_model
from test_moe import _search as moe_search
from torch.utils.data import DataLoader

import peft_s3
from peft_s3 import EvaInitConfig, S3SearchConfig, SearchedStructure, apply_structure, lora_eva_state_dict, resolve
from peft_s3.sharing import save_pretrained_with_structure
from peft_s3.structure import STRUCTURE_FILE


def _searched(arch: str, budget: float, seed: int = 0, **kwargs: Any) -> tuple[peft.PeftModel, SearchedStructure]:
    """A search on the tiny `arch` with random alphas (a structure of uneven ranks) and its resolved structure."""
    config = S3SearchConfig(budget=budget, task_type=TASK_TYPES[arch], **kwargs)
    search = peft.get_peft_model(TINY_MODELS[arch](), config)
    alpha = search.base_model.s3_alpha["default"]
    with torch.no_grad():
        alpha.copy_(torch.randn(alpha.shape, generator=torch.Generator().manual_seed(seed)))
    return search, resolve(search)


def _outputs(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


def _loader(arch: str, batches: int = 3) -> list[dict[str, torch.Tensor]]:
    return [make_batch(arch, batch_size=4, seq_len=12, seed=seed) for seed in range(batches)]


def _s3_layers(model: peft.PeftModel) -> dict[str, Any]:
    return {name: module for name, module in model.base_model.model.named_modules() if hasattr(module, "s3_lora_A")}


def _overlap(a: torch.Tensor, b: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between the row spaces of a and b (1: the same subspace)."""
    qa, qb = torch.linalg.qr(a.double().T)[0], torch.linalg.qr(b.double().T)[0]
    return torch.linalg.svdvals(qa.T @ qb).min().item()


def _principal_directions(rows: torch.Tensor, rank: int) -> torch.Tensor:
    centred = rows.double() - rows.double().mean(0)
    return torch.linalg.svd(centred, full_matrices=False)[2][:rank]


# --------------------------------------------------------------------------------------------------------- fresh


def test_fresh_is_the_default_bit_for_bit_and_is_recorded() -> None:
    _, structure = _searched("bert", 0.03)
    models = []
    for kwargs in ({}, {"init": "fresh"}):
        torch.manual_seed(0)
        models.append(apply_structure(TINY_MODELS["bert"](), structure, **kwargs))
    default, fresh = (model.state_dict() for model in models)
    assert default.keys() == fresh.keys() and all(torch.equal(default[k], fresh[k]) for k in default)
    assert models[1].peft_config["default"].retrain_init == "fresh"
    batch = make_batch("bert")
    torch.testing.assert_close(_outputs(models[1], batch), _outputs(TINY_MODELS["bert"](), batch), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------------------- eva


def _anisotropic_llama() -> torch.nn.Module:
    """The tiny Llama with norm scales halving from dimension to dimension: the inputs of the projections after the
    norms have clearly separated singular values, so their top directions are well defined."""
    model = TINY_MODELS["llama"]()
    scale = 2.0 ** (4 - torch.arange(HIDDEN_SIZE, dtype=torch.float32))
    with torch.no_grad():
        for layer in model.model.layers:
            layer.input_layernorm.weight.copy_(scale)
            layer.post_attention_layernorm.weight.copy_(scale)
    return model


def test_eva_on_a_lora_structure_starts_as_the_base_and_spans_peft_eva_subspaces() -> None:
    # The projections that read a norm's output, where the anisotropic norms fix the top directions; elsewhere
    # near-equal singular values leave them to the estimator (peft's incremental PCA, truncated at the rank, lands
    # far from the exact ones there on tiny data).
    targets = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]
    _, structure = _searched("llama", 0.05, max_rank=4, candidate_kinds=["lora"], target_modules=targets)
    assert max(kinds["lora"] for kinds in structure.structure.values()) > 1
    loader = _loader("llama")
    base_output = _outputs(_anisotropic_llama(), loader[0])
    model = apply_structure(_anisotropic_llama(), structure, init="eva", init_dataloader=loader)
    assert model.peft_config["default"].retrain_init == "eva"
    # B = 0: the first forward pass is the base model's.
    torch.testing.assert_close(_outputs(model, loader[0]), base_output, rtol=0, atol=1e-6)

    lora = peft.get_peft_model(_anisotropic_llama(), structure.to_lora_config(init_lora_weights="eva"))
    initialize_lora_eva_weights(lora, loader, show_progress_bar=False)
    layers = _s3_layers(model)
    assert set(layers) == set(structure.structure)
    for name, layer in layers.items():
        ours = layer.s3_lora_A["default"].detach()
        theirs = lora.base_model.model.get_submodule(name).lora_A["default"].weight.detach()
        assert ours.shape == (structure.structure[name]["lora"], layer.in_features)
        torch.testing.assert_close(ours @ ours.T, torch.eye(len(ours)), rtol=0, atol=1e-5)
        # peft's EVA, even at rho=1, gives modules that read one input (q/k/v) the largest rank among them and takes
        # it from other modules, so its rank may differ; directions come in order of singular value either way.
        # Up to sign and rotation within equal singular values: the same subspace, not the same rows.
        rank = min(len(ours), len(theirs))
        assert _overlap(ours[:rank], theirs[:rank]) > 0.99, name

    # With peft_s3's state dict, peft's EVA keeps the structure's ranks and gets the directions of apply_structure.
    kept = peft.get_peft_model(_anisotropic_llama(), structure.to_lora_config(init_lora_weights="eva"))
    initialize_lora_eva_weights(kept, eva_state_dict=lora_eva_state_dict(kept, loader))
    for name, layer in layers.items():
        lora_a = kept.base_model.model.get_submodule(name).lora_A["default"].weight
        torch.testing.assert_close(lora_a, layer.s3_lora_A["default"], rtol=0, atol=1e-6)
    torch.testing.assert_close(_outputs(kept, loader[0]), base_output, rtol=0, atol=1e-6)


def test_eva_on_a_mix_structure_uses_inputs_for_lora_and_outputs_for_adapters() -> None:
    _, structure = _searched("bert", 0.08, seed=1, max_rank=2)
    kinds = {kind for kinds in structure.structure.values() for kind in kinds}
    assert {"lora", "adapter", "bitfit", "lnfit"} <= kinds
    loader = _loader("bert", 2)
    base = TINY_MODELS["bert"]()
    activations: dict[str, list[torch.Tensor]] = {}
    hooks = [
        base.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: activations.setdefault(name, []).append(
                (args[0], output if isinstance(output, torch.Tensor) else output[0])
            )
        )
        for name in structure.structure
    ]
    base_output = _outputs(base, loader[0])
    for batch in loader[1:]:
        _outputs(base, batch)
    for hook in hooks:
        hook.remove()

    model = apply_structure(TINY_MODELS["bert"](), structure, init="eva", init_dataloader=loader)
    torch.testing.assert_close(_outputs(model, loader[0]), base_output, rtol=0, atol=1e-6)
    checked = set()
    for name, layer in _s3_layers(model).items():
        inputs = torch.cat([x.reshape(-1, x.shape[-1]) for x, _ in activations[name]])
        outputs = torch.cat([y.reshape(-1, y.shape[-1]) for _, y in activations[name]])
        if "default" in layer.s3_lora_A:
            lora_a = layer.s3_lora_A["default"].detach()
            assert _overlap(lora_a, _principal_directions(inputs, len(lora_a))) > 0.99, name
            checked.add("lora")
        if "default" in layer.s3_adapter_down:
            down = layer.s3_adapter_down["default"].detach()
            assert _overlap(down, _principal_directions(outputs, len(down))) > 0.99, name
            assert not layer.s3_adapter_up["default"].any()
            checked.add("adapter")
        for deltas in (layer.s3_bias, layer.s3_scale):
            if "default" in deltas:
                assert not deltas["default"].any()
                checked.add("zero")
    assert checked == {"lora", "adapter", "zero"}


def test_eva_leaves_out_padding_and_masked_labels() -> None:
    _, structure = _searched("llama", 0.05, max_rank=2, candidate_kinds=["lora"])
    batch = make_batch("llama", batch_size=4, seq_len=10)
    # Appended tokens with -100 labels, then right padding: positions that EVA must not see. Causal attention leaves
    # the earlier positions as they are, so the directions must not change.
    extra = torch.full((4, 4), 5)
    padded = {
        "input_ids": torch.cat([batch["input_ids"], extra], dim=1),
        "attention_mask": torch.cat([batch["attention_mask"], torch.tensor([[1, 1, 0, 0]] * 4)], dim=1),
        "labels": torch.cat([batch["labels"], torch.full((4, 4), -100)], dim=1),
    }
    results = []
    for data in ([batch], [padded]):
        model = apply_structure(TINY_MODELS["llama"](), structure, init="eva", init_dataloader=data)
        results.append([layer.s3_lora_A["default"].detach() for layer in _s3_layers(model).values()])
    for plain, masked in zip(*results, strict=True):
        assert _overlap(plain, masked) > 0.9999


def test_eva_refuses_what_it_cannot_do() -> None:
    _, structure = _searched("llama", 0.05, max_rank=2, candidate_kinds=["lora"])
    with pytest.raises(ValueError, match="init='eva' needs data: pass init_dataloader="):
        apply_structure(TINY_MODELS["llama"](), structure, init="eva")
    with pytest.raises(ValueError, match="empty dataloader"):
        apply_structure(TINY_MODELS["llama"](), structure, init="eva", init_dataloader=[])
    with pytest.raises(ValueError, match="mappings of model inputs.*got a Tensor"):
        apply_structure(TINY_MODELS["llama"](), structure, init="eva", init_dataloader=[torch.ones(2, 3)])
    with pytest.raises(ValueError, match=r"got no batch with at least \d+ usable token positions"):
        one_token = {"input_ids": torch.tensor([[5]])}
        apply_structure(TINY_MODELS["llama"](), structure, init="eva", init_dataloader=[one_token])
    with pytest.raises(ValueError, match="pass a peft_s3.retrain_init.EvaInitConfig"):
        apply_structure(
            TINY_MODELS["llama"](),
            structure,
            init="eva",
            init_dataloader=_loader("llama"),
            eva_config=peft.EvaConfig(),
        )
    with pytest.raises(ValueError, match=r"\['init_dataloader'\] do not apply to init='fresh'"):
        apply_structure(TINY_MODELS["llama"](), structure, init_dataloader=_loader("llama"))
    with pytest.raises(ValueError, match="num_batches=0 is not allowed"):
        EvaInitConfig(num_batches=0)

    search = moe_search("mixtral", candidate_kinds=["lora"])
    with torch.no_grad():
        search.base_model.s3_alpha["default"].normal_(generator=torch.Generator().manual_seed(0))
        for index, candidate in enumerate(search.base_model.candidates()):
            search.base_model.s3_alpha["default"][index] += 5.0 * (".experts." in candidate.module)
    base = moe_model("mixtral")
    with pytest.raises(ValueError, match="cannot initialise the LoRA slices on fused expert weights"):
        apply_structure(base, resolve(search), init="eva", init_dataloader=[moe_batch()])
    # Refused before get_peft_model: the base is left unwrapped.
    peft_s3.tuner.model.check_unwrapped_base(base)


def test_eva_num_batches_takes_the_first_batches() -> None:
    _, structure = _searched("llama", 0.05, max_rank=2, candidate_kinds=["lora"])
    loader = _loader("llama", 3)
    # A torch DataLoader collating the first batch's rows, and a one-shot iterator over all three batches.
    rows = [{key: value[row] for key, value in loader[0].items()} for row in range(4)]
    first = apply_structure(TINY_MODELS["llama"](), structure, init="eva", init_dataloader=DataLoader(rows, 4))
    capped = apply_structure(
        TINY_MODELS["llama"](),
        structure,
        init="eva",
        init_dataloader=iter(loader),
        eva_config=EvaInitConfig(num_batches=1),
    )
    for name in first.state_dict():
        assert torch.equal(first.state_dict()[name], capped.state_dict()[name]), name


# ------------------------------------------------------------------------------------------------------ inherit


def test_inherit_reproduces_the_resolved_search() -> None:
    search, structure = _searched("bert", 0.08, seed=2, max_rank=3, init_weights=False)
    # Some module keeps a later slot without an earlier one, so slots must map in order, not from 0.
    slots = {}
    for candidate in structure.candidates:
        slots.setdefault((candidate.module, candidate.kind), []).append(candidate.slot)
    assert any(kind == "lora" and chosen != list(range(len(chosen))) for (_, kind), chosen in slots.items())
    batch = make_batch("bert")
    mask = torch.tensor([candidate.selected for candidate in structure.search_space], dtype=torch.float32)
    search.eval()
    with search.base_model.fixed_eval_gates(mask), torch.no_grad():
        expected = search(**batch).logits
    # Given the search model, apply_structure inherits by default.
    model = apply_structure(TINY_MODELS["bert"](), structure, init_from=search)
    assert model.peft_config["default"].retrain_init == "inherit"
    torch.testing.assert_close(_outputs(model, batch), expected, rtol=0, atol=1e-6)
    assert apply_structure(TINY_MODELS["bert"](), structure).peft_config["default"].retrain_init == "fresh"
    # The inherited deltas do act: the base's output is far outside that tolerance.
    assert (_outputs(TINY_MODELS["bert"](), batch) - expected).abs().max() > 1e-4


@pytest.mark.parametrize("arch", ["t5", "gpt2", "llama"])
def test_eva_and_inherit_on_mix_structures_of_other_architectures(arch: str) -> None:
    # T5: cross-attention reads the encoder's states; GPT-2: Conv1D projections stored transposed.
    search, structure = _searched(arch, 0.08, seed=3, max_rank=2, init_weights=False)
    assert {"lora", "adapter", "bitfit"} <= {kind for kinds in structure.structure.values() for kind in kinds}
    batch = make_batch(arch)
    eva = apply_structure(TINY_MODELS[arch](), structure, init="eva", init_dataloader=_loader(arch, 2))
    torch.testing.assert_close(_outputs(eva, batch), _outputs(TINY_MODELS[arch](), batch), rtol=0, atol=1e-6)
    mask = torch.tensor([candidate.selected for candidate in structure.search_space], dtype=torch.float32)
    search.eval()
    with search.base_model.fixed_eval_gates(mask), torch.no_grad():
        expected = search(**batch).logits
    inherited = apply_structure(TINY_MODELS[arch](), structure, init="inherit", init_from=search)
    torch.testing.assert_close(_outputs(inherited, batch), expected, rtol=1e-5, atol=1e-5)


def test_inherit_takes_expert_slices() -> None:
    search = moe_search("mixtral", init_weights=False, candidate_kinds=["lora"])
    with torch.no_grad():
        search.base_model.s3_alpha["default"].normal_(generator=torch.Generator().manual_seed(0))
        for index, candidate in enumerate(search.base_model.candidates()):
            search.base_model.s3_alpha["default"][index] += 5.0 * (".experts." in candidate.module)
    structure = resolve(search)
    assert any(".experts." in candidate.module for candidate in structure.candidates)
    mask = torch.tensor([candidate.selected for candidate in structure.search_space], dtype=torch.float32)
    search.eval()
    with search.base_model.fixed_eval_gates(mask), torch.no_grad():
        expected = search(**moe_batch()).logits
    model = apply_structure(moe_model("mixtral"), structure, init="inherit", init_from=search)
    torch.testing.assert_close(_outputs(model, moe_batch()), expected, rtol=0, atol=1e-5)


def test_inherit_refuses_another_search_or_base() -> None:
    search, structure = _searched("bert", 0.05)
    with pytest.raises(ValueError, match="init='inherit' needs init_from="):
        apply_structure(TINY_MODELS["bert"](), structure, init="inherit")
    with pytest.raises(ValueError, match="needs init_from= the PeftModel .* got a BertForSequenceClassification"):
        apply_structure(TINY_MODELS["bert"](), structure, init="inherit", init_from=TINY_MODELS["bert"]())
    lora_only, _ = _searched("bert", 0.05, candidate_kinds=["lora"])
    with pytest.raises(ValueError, match="has the search space .* but the structure was resolved from"):
        apply_structure(TINY_MODELS["bert"](), structure, init="inherit", init_from=lora_only)
    structure.search_space_signature = None  # a structure file from before signatures: candidates are checked
    with pytest.raises(ValueError, match="does not hold .* selected candidates"):
        apply_structure(TINY_MODELS["bert"](), structure, init="inherit", init_from=lora_only)
    other = TINY_MODELS["bert"]()
    with torch.no_grad():
        other.bert.encoder.layer[0].attention.self.query.weight.add_(1.0)
        other.bert.encoder.layer[1].attention.self.query.weight.add_(1.0)
    with pytest.raises(ValueError, match="The base model differs from the search's"):
        apply_structure(other, structure, init="inherit", init_from=search)
    peft_s3.tuner.model.check_unwrapped_base(other)


# ----------------------------------------------------------------------------------------------- peft's inits


def test_peft_inits_go_through_the_lora_config() -> None:
    _, structure = _searched("llama", 0.05, max_rank=2, candidate_kinds=["lora"])
    with pytest.raises(
        ValueError,
        match=r"retrain_init='pissa' \(apply_structure's init\) is not allowed: choose one of \['fresh', 'eva', ",
    ):
        apply_structure(TINY_MODELS["llama"](), structure, init="pissa")
    with pytest.raises(ValueError, match=r"retrain_init='eva' is not allowed for a search"):
        S3SearchConfig(budget=0.01, retrain_init="eva")

    eva = structure.to_lora_config(init_lora_weights="eva")
    assert eva.init_lora_weights == "eva" and eva.eva_config.rho == 1.0
    with pytest.raises(ValueError, match=r"eva_config.rho=2.0 is not allowed"):
        structure.to_lora_config(init_lora_weights="eva", eva_config=peft.EvaConfig(rho=2.0))
    for bad in ("fresh", "pissa_niter_x", 1):
        with pytest.raises(ValueError, match=f"init_lora_weights={bad!r} is not allowed"):
            structure.to_lora_config(init_lora_weights=bad)
    with pytest.raises(ValueError, match=r"\['r'\] are not allowed here"):
        structure.to_lora_config(init_lora_weights="pissa", r=8)

    batch = make_batch("llama")
    base_output = _outputs(TINY_MODELS["llama"](), batch)
    for init in ("pissa", "olora", "pissa_niter_2", "gaussian"):
        config = structure.to_lora_config(init_lora_weights=init)
        model = peft.get_peft_model(TINY_MODELS["llama"](), config)
        ranks = {
            name: module.r["default"]
            for name, module in model.base_model.model.named_modules()
            if hasattr(module, "r")
        }
        assert ranks == {name: kinds["lora"] for name, kinds in structure.structure.items()}, init
        # PiSSA and OLoRA move the principal part of W into the adapter, leaving the output unchanged.
        if init != "gaussian":
            torch.testing.assert_close(_outputs(model, batch), base_output, rtol=0, atol=1e-4)


# ------------------------------------------------------------------------------------------------- persistence


def test_the_recorded_init_survives_save_and_load(tmp_path: Path) -> None:
    _, structure = _searched("bert", 0.05)
    loader = _loader("bert", 1)
    model = apply_structure(TINY_MODELS["bert"](), structure, init="eva", init_dataloader=loader)
    save_pretrained_with_structure(model, tmp_path, structure, figure=False)
    assert structure.retrain_init == "fresh"  # the caller's object is left alone
    assert json.loads((tmp_path / "adapter_config.json").read_text())["retrain_init"] == "eva"
    assert peft.PeftConfig.from_pretrained(tmp_path).retrain_init == "eva"
    assert SearchedStructure.load(tmp_path).retrain_init == "eva"
    assert "initialised for retraining with `eva`" in (tmp_path / "README.md").read_text()
    reloaded = peft.PeftModel.from_pretrained(TINY_MODELS["bert"](), tmp_path)
    assert reloaded.peft_config["default"].retrain_init == "eva"
    torch.testing.assert_close(_outputs(reloaded, loader[0]), _outputs(model, loader[0]), rtol=0, atol=0)

    # Files written before the field existed load as "fresh".
    for name in ("adapter_config.json", STRUCTURE_FILE):
        data = json.loads((tmp_path / name).read_text())
        del data["retrain_init"]
        (tmp_path / name).write_text(json.dumps(data))
    assert peft.PeftConfig.from_pretrained(tmp_path).retrain_init == "fresh"
    assert SearchedStructure.load(tmp_path).retrain_init == "fresh"

    lora = peft.get_peft_model(TINY_MODELS["bert"](), structure.to_lora_config("drop", init_lora_weights="olora"))
    save_pretrained_with_structure(lora, tmp_path / "lora", structure, figure=False)
    assert SearchedStructure.load(tmp_path / "lora").retrain_init == "olora"

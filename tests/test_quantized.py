"""Search, resolve and retrain on bitsandbytes 4-bit and 8-bit bases (QLoRA-style), on CPU."""

from __future__ import annotations

from pathlib import Path

import peft
import pytest
import torch
from conftest import TINY_MODELS, make_batch
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, TrainingArguments

from peft_s3 import LORA_SPACE, S3SearchConfig, S3SearchTrainer, apply_structure, resolve

pytest.importorskip("bitsandbytes")
pytestmark = pytest.mark.filterwarnings("ignore:MatMul8bitLt")

QUANTIZATION = {
    4: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32),
    8: BitsAndBytesConfig(load_in_8bit=True),
}
QUANTIZED_LINEAR = {4: "Linear4bit", 8: "Linear8bitLt"}


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny-llama")
    TINY_MODELS["llama"]().save_pretrained(path)
    return path


def quantized_base(path: Path, bits: int) -> torch.nn.Module:
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=QUANTIZATION[bits], device_map="cpu")
    assert type(model.model.layers[0].self_attn.q_proj).__name__ == QUANTIZED_LINEAR[bits]
    # In eval mode on CPUs with AVX512-BF16, bitsandbytes repacks 4-bit weights, which needs output widths divisible
    # by 32 (the tiny config's are not); these are training passes anyway.
    return peft.prepare_model_for_kbit_training(model, use_gradient_checkpointing=False).train()


class _Batches(torch.utils.data.Dataset):
    def __init__(self, count: int) -> None:
        self.rows = [{k: v[0] for k, v in make_batch("llama", batch_size=1, seed=i).items()} for i in range(count)]

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.rows[index]


def _trainable(model: torch.nn.Module, prefix: str) -> int:
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and prefix in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_search_resolve_and_retrain_on_a_quantized_base(llama_dir: Path, bits: int, tmp_path: Path) -> None:
    model = peft.get_peft_model(quantized_base(llama_dir, bits), S3SearchConfig(budget=100, task_type="CAUSAL_LM"))
    frozen = model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight.detach().clone()
    alpha = model.base_model.s3_alpha["default"].detach().clone()
    args = TrainingArguments(
        str(tmp_path), per_device_train_batch_size=2, max_steps=3, learning_rate=1e-2, report_to=[], use_cpu=True
    )
    S3SearchTrainer(model=model, args=args, train_dataset=_Batches(12)).train()
    assert not torch.equal(model.base_model.s3_alpha["default"].detach(), alpha)
    assert torch.equal(model.base_model.model.model.layers[0].self_attn.q_proj.get_base_layer().weight, frozen)

    structure = resolve(model)
    retrain = apply_structure(quantized_base(llama_dir, bits), structure)
    assert _trainable(retrain, "s3_") == structure.num_trainable_params
    loss = retrain(**make_batch("llama")).loss
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in retrain.named_parameters() if p.requires_grad and "s3_" in n)


@pytest.mark.parametrize("bits", [4, 8])
def test_lora_config_of_a_structure_loads_on_the_quantized_base_with_plain_peft(llama_dir: Path, bits: int) -> None:
    search = peft.get_peft_model(
        quantized_base(llama_dir, bits), S3SearchConfig(budget=100, candidate_kinds=LORA_SPACE, task_type="CAUSAL_LM")
    )
    with torch.no_grad():
        search.base_model.s3_alpha["default"].normal_(generator=torch.Generator().manual_seed(bits))
    structure = resolve(search)
    lora = peft.get_peft_model(quantized_base(llama_dir, bits), structure.to_lora_config())
    assert _trainable(lora, "lora_") == structure.num_trainable_params
    assert torch.isfinite(lora(**make_batch("llama")).loss)

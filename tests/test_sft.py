"""Structure search inside TRL's SFTTrainer: token-weighted levels, completion-only loss, packing, clean metrics."""

from __future__ import annotations

import math

import peft
import pytest
import torch
import transformers
from conftest import TINY_MODELS, VOCAB_SIZE, tiny_qwen2
from datasets import Dataset

from peft_s3 import S3SearchConfig, resolve
from peft_s3.estimators import first_order_alpha_gradient, second_order_alpha_gradient

trl = pytest.importorskip("trl")
from peft_s3.sft import S3SFTTrainer  # noqa: E402

WORDS = [f"w{i}" for i in range(VOCAB_SIZE - 4)]


DECODERS = {"llama": TINY_MODELS["llama"], "qwen2": tiny_qwen2}


def _tokenizer() -> transformers.PreTrainedTokenizerFast:
    import tokenizers

    vocab = {"[PAD]": 0, "[BOS]": 1, "[EOS]": 2, "[UNK]": 3} | {word: i + 4 for i, word in enumerate(WORDS)}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = tokenizers.pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="[PAD]", bos_token="[BOS]", eos_token="[EOS]", unk_token="[UNK]"
    )


def _prompt_completion(count: int, seed: int = 0) -> Dataset:
    """Prompts and completions of very different lengths, so token weighting and equal weighting differ."""
    generator = torch.Generator().manual_seed(seed)

    def words(low: int, high: int) -> str:
        length = int(torch.randint(low, high, (1,), generator=generator))
        return " ".join(WORDS[int(i)] for i in torch.randint(len(WORDS), (length,), generator=generator))

    return Dataset.from_list([{"prompt": words(2, 6), "completion": " " + words(1, 14)} for _ in range(count)])


def _config(tmp_path, config_class: type | None = None, **overrides) -> trl.SFTConfig:
    settings = dict(
        output_dir=str(tmp_path),
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        max_steps=3,
        learning_rate=1e-2,
        max_length=24,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=3,
    )
    return (config_class or trl.SFTConfig)(**(settings | overrides))


def _trainer(tmp_path, bilevel: str = "first_order", arch: str = "llama", **overrides) -> S3SFTTrainer:
    return S3SFTTrainer(
        model=DECODERS[arch](),
        args=_config(tmp_path, **overrides),
        train_dataset=_prompt_completion(24),
        processing_class=_tokenizer(),
        peft_config=S3SearchConfig(budget=400, task_type="CAUSAL_LM"),
        bilevel=bilevel,
    )


def _token_weighted_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    """Summed next-token cross-entropy over every completion token of `batches`, over their count."""
    total, count = 0.0, 0
    for batch in batches:
        logits = model(input_ids=batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
        labels = batch["labels"][:, 1:]
        total = total + torch.nn.functional.cross_entropy(
            logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=-100, reduction="sum"
        )
        count += int((labels != -100).sum())
    return total / count


def _equally_weighted_loss(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return sum(_token_weighted_loss(model, [batch]) for batch in batches) / len(batches)


def _step_batches(trainer: S3SFTTrainer) -> tuple[list, list]:
    trainer.create_optimizer_and_scheduler(num_training_steps=trainer.args.max_steps)
    loader = iter(trainer.get_train_dataloader())
    delta_batches = [next(loader) for _ in range(2)]
    search_batches = [trainer.search_controller.next_search_batch() for _ in range(2)]
    lengths = [int((batch["labels"] != -100).sum()) for batch in search_batches]
    assert lengths[0] != lengths[1], "the test needs micro-batches with different numbers of completion tokens"
    return delta_batches, search_batches


@pytest.mark.parametrize("arch", list(DECODERS))
def test_alpha_gradient_is_the_token_weighted_one(tmp_path, arch: str) -> None:
    trainer = _trainer(tmp_path, arch=arch)
    model = trainer.model
    delta_batches, search_batches = _step_batches(trainer)
    alpha, deltas = trainer.search_controller.alpha, trainer.search_controller.delta_parameters
    with torch.no_grad():
        for delta in deltas:  # away from the zero initialisation, so every gate matters to the loss
            delta.normal_(std=0.2, generator=torch.Generator().manual_seed(0))
    model.train()
    with model.base_model.frozen_gate_noise():
        with torch.no_grad():
            model(**delta_batches[0])  # draws the gate sample every pass below shares
        (token_weighted,) = torch.autograd.grad(_token_weighted_loss(model, search_batches), alpha)
        (equally_weighted,) = torch.autograd.grad(_equally_weighted_loss(model, search_batches), alpha)
        items = trainer._get_num_items_in_batch(search_batches, trainer.args.device)
        first_order_alpha_gradient(trainer._loss_shares(model, search_batches, items), alpha, deltas, search_batches)
        first_order, alpha.grad = alpha.grad.clone(), None
        # Second order with xi = 0 is first order: the same closures drive both levels of the unrolled step.
        delta_items = trainer._get_num_items_in_batch(delta_batches, trainer.args.device)
        _, delta_gradient, delta_losses, _ = second_order_alpha_gradient(
            trainer._loss_shares(model, delta_batches, delta_items, recorded_passes=2),
            trainer._loss_shares(model, search_batches, items),
            alpha,
            deltas,
            delta_batches,
            search_batches,
            step_seed=0,
            xi=0.0,
        )
        expected_delta_loss = _token_weighted_loss(model, delta_batches)
        expected_delta_gradient = torch.autograd.grad(expected_delta_loss, deltas, allow_unused=True)

    assert (token_weighted - equally_weighted).norm() > 0.05 * token_weighted.norm()
    torch.testing.assert_close(first_order, token_weighted, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(alpha.grad, token_weighted, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.stack(delta_losses).sum(), expected_delta_loss.detach(), rtol=1e-5, atol=1e-6)
    for got, want in zip(delta_gradient, expected_delta_gradient, strict=True):
        torch.testing.assert_close(got, torch.zeros_like(got) if want is None else want, rtol=1e-4, atol=1e-6)


def _search(tmp_path, bilevel: str) -> tuple[S3SFTTrainer, list[int]]:
    """Three search steps; returns the trainer and how many micro-batches each log's token accuracy averages."""
    trainer = _trainer(tmp_path / bilevel, bilevel=bilevel)
    assert isinstance(trainer.model, peft.PeftModel)
    alpha = trainer.model.base_model.s3_alpha["default"].detach().clone()
    averaged: list[int] = []
    log = trl.SFTTrainer.log

    def counting_log(self, logs, *args, **kwargs):
        if "loss" in logs:
            averaged.append(len(self._metrics["train"]["mean_token_accuracy"]))
        return log(self, logs, *args, **kwargs)

    trl.SFTTrainer.log = counting_log
    try:
        trainer.train()
    finally:
        trl.SFTTrainer.log = log
    assert not torch.equal(trainer.model.base_model.s3_alpha["default"].detach(), alpha)
    return trainer, averaged


def test_search_runs_in_sft_with_completion_only_loss_and_clean_metrics(tmp_path) -> None:
    first, first_averaged = _search(tmp_path, "first_order")
    second, second_averaged = _search(tmp_path, "second_order")
    for trainer in (first, second):
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        assert len(logs) == 3 and all(math.isfinite(entry["loss"]) and "s3/alpha_loss" in entry for entry in logs)
        assert all(0.0 <= entry["mean_token_accuracy"] <= 1.0 for entry in logs)
        assert resolve(trainer.model).num_trainable_params <= 400
    # Each log averages the step's own 2 delta micro-batches, however many passes the search adds (4 or 8 a step),
    # and both modes count the same trained tokens: the same D_delta batches, none of D_alpha's.
    assert first_averaged == second_averaged == [2, 2, 2]
    assert first.state.log_history[-2]["num_tokens"] == second.state.log_history[-2]["num_tokens"]
    assert first._total_train_tokens == second._total_train_tokens > 0


def test_search_dataset_is_prepared_like_the_training_data_and_packing_works(tmp_path) -> None:
    trainer = S3SFTTrainer(
        model=TINY_MODELS["llama"](),
        args=_config(tmp_path, packing=True, max_length=16, max_steps=2),
        train_dataset=_prompt_completion(16, seed=1),
        search_dataset=_prompt_completion(16, seed=2),
        processing_class=_tokenizer(),
        peft_config=S3SearchConfig(budget=400, task_type="CAUSAL_LM"),
    )
    assert "input_ids" in trainer.search_dataset.column_names
    assert "prompt" not in trainer.search_dataset.column_names
    trainer.train()
    assert all(math.isfinite(entry["loss"]) for entry in trainer.state.log_history if "loss" in entry)


def test_search_options_come_from_an_s3_sft_config_and_keywords_take_precedence(tmp_path) -> None:
    from peft_s3.arguments import S3SFTConfig

    trainer = S3SFTTrainer(
        model=TINY_MODELS["llama"](),
        args=_config(tmp_path, S3SFTConfig, bilevel="first_order", alpha_update_interval=2, search_split=0.25),
        train_dataset=_prompt_completion(16),
        processing_class=_tokenizer(),
        peft_config=S3SearchConfig(budget=400, task_type="CAUSAL_LM"),
        alpha_update_interval=3,
    )
    options = trainer.search_options
    assert (options.bilevel, options.alpha_update_interval, options.search_split) == ("first_order", 3, 0.25)
    assert (len(trainer.search_dataset), len(trainer.train_dataset)) == (4, 12)

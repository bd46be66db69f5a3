"""quality.py --search-cache (benchmarks/search_cache.py) on a tiny BERT: a search loaded from the cache gives the row
of the run that searched it, for every retraining init; other search settings miss; damaged entries are refused."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from test_quality_report import _tiny_grid, quality

from peft_s3 import resolve
from peft_s3.recipes import fresh_classifier

# quality.py imports benchmarks/search_cache.py by name, as test_quality_report puts benchmarks/ on the path.
search_cache = sys.modules[quality.SearchCache.__module__]
SearchCache = search_cache.SearchCache
PER_RUN = {"wall_seconds", "cpu_seconds", "train_seconds"}
"""Row fields measured anew by every run."""
SPEC = quality.RunSpec("s3pet-l", "amazon_food", 0.02, 0)
"""The one run of `_tiny_grid` here: S3PET-L, whose LoRA slices start differently under each init."""


def _row(model_dir: Path, output_dir: Path, init: str, cache: Optional[Path], *extra: str) -> dict[str, Any]:
    """The row of `_tiny_grid`'s run of SPEC with --retrain-init `init`, and --search-cache `cache` when given."""
    options = [] if cache is None else ["--search-cache", str(cache)]
    quality.main([*_tiny_grid(model_dir, output_dir, init, SPEC.method), *options, *extra])
    (run,) = json.loads((output_dir / quality.RESULTS_FILE).read_text())["runs"]
    return run


def _without(run: dict[str, Any], *fields: str) -> dict[str, Any]:
    return {name: value for name, value in run.items() if name not in {*PER_RUN, *fields}}


def _entries(cache: Path) -> list[str]:
    return sorted(path.name for path in cache.iterdir())


def test_a_search_from_the_cache_gives_the_row_of_the_run_that_searched_for_every_init(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    searched_fresh = _row(tiny_model_dir, tmp_path / "fresh", "fresh", cache)
    (entry,) = _entries(cache)
    assert searched_fresh["search_cached"] is False
    loaded_fresh = _row(tiny_model_dir, tmp_path / "fresh_again", "fresh", cache)
    assert loaded_fresh["search_cached"] is True
    assert _without(loaded_fresh, "search_cached") == _without(searched_fresh, "search_cached")
    for init in ("inherit", "eva"):
        # --retrain-init is not part of the key: these runs load the fresh run's search.
        loaded = _row(tiny_model_dir, tmp_path / init, init, cache)
        assert loaded["search_cached"] is True
        assert loaded["search_seconds"] == searched_fresh["search_seconds"]
        # Without the cache a row is as before (no search_cached), with the same numbers but its own search time.
        searched = _row(tiny_model_dir, tmp_path / f"{init}_uncached", init, None)
        assert "search_cached" not in searched
        assert _without(loaded, "search_cached", "search_seconds") == _without(searched, "search_seconds")
        # The init shows in the retraining: the comparison above is not of two fresh starts.
        assert loaded["train_loss"] != searched_fresh["train_loss"]
        written = [quality.structure_path(tmp_path / name, *SPEC.key).read_text() for name in ("fresh", init)]
        assert written[0] == written[1]
    assert _entries(cache) == [entry]


def test_the_cached_search_model_resolves_to_the_cached_structure(tiny_model_dir, tmp_path):
    args = quality.parse_args(_tiny_grid(tiny_model_dir, tmp_path, "fresh", SPEC.method))
    benchmark = quality.Benchmark(quality.settings_from(args), tmp_path, [], [], SearchCache(tmp_path / "cache"))
    task = benchmark.task(SPEC.dataset, SPEC.seed)
    structure, _, searched = benchmark.structure_for(SPEC, task, tmp_path / "scratch")
    state = torch.random.get_rng_state()
    label = quality.structure_path(tmp_path, SPEC.method, SPEC.dataset, SPEC.budget, SPEC.seed).stem
    cached = benchmark.search_cache.load(label, benchmark.search_key(SPEC), lambda: fresh_classifier(task, SPEC.seed))
    assert torch.equal(torch.random.get_rng_state(), state)  # as right after the search, although loading drew
    assert cached.structure == structure == resolve(cached.model)
    loaded = dict(cached.model.named_parameters())
    assert any("s3_alpha" in name for name in loaded)
    for name, parameter in searched.named_parameters():
        assert torch.equal(loaded[name], parameter), name


def test_other_search_settings_miss_the_cache(tiny_model_dir, tmp_path):
    cache = tmp_path / "cache"
    _row(tiny_model_dir, tmp_path / "first", "fresh", cache)
    # A repeated option replaces the grid's.
    assert _row(tiny_model_dir, tmp_path / "budget", "fresh", cache, "--budgets", "0.03")["search_cached"] is False
    option = _row(tiny_model_dir, tmp_path / "option", "fresh", cache, "--search-options", '{"alpha_warmup_steps": 1}')
    assert option["search_cached"] is False
    assert len(_entries(cache)) == 3


@pytest.mark.parametrize(
    "change, same",
    [
        ({"retrain_init": "eva"}, True),
        ({"epochs": 3.0}, True),
        ({"transfer_budget": 1e-3}, True),
        ({"search_epochs": 3.0}, False),
        ({"max_train": 33}, False),
        ({"learning_rate": 1e-3}, False),
        ({"config_options": {"tau": 0.5}}, False),
        ({"splits": {"amazon_food": {"validation_size": 400}}}, False),
    ],
)
def test_the_key_holds_the_settings_that_reach_the_search(tiny_model_dir, tmp_path, change, same):
    def key(**overrides: Any) -> dict[str, Any]:
        args = quality.parse_args(_tiny_grid(tiny_model_dir, tmp_path, "fresh", SPEC.method))
        for name, value in overrides.items():
            setattr(args, name, value)
        args.split_table = quality.split_table(args.splits)
        return quality.Benchmark(quality.settings_from(args), tmp_path, [], []).search_key(SPEC)

    assert (key(**change) == key()) is same


def test_the_key_needs_the_model_files(tmp_path):
    args = quality.parse_args(["--model", "org/hub-id", "--datasets", "amazon_food"])
    benchmark = quality.Benchmark(quality.settings_from(args), tmp_path, [], [])
    with pytest.raises(ValueError, match="--model must be a local directory or one of .*; got 'org/hub-id'"):
        benchmark.search_key(SPEC)


def test_the_code_fingerprint_follows_the_contents_of_the_python_files(tmp_path):
    package = tmp_path / "package"
    package.mkdir()
    (package / "module.py").write_text("A = 1\n")
    (package / "notes.txt").write_text("not code")
    before = search_cache.files_fingerprint([package], suffix=".py")
    (package / "notes.txt").write_text("still not code")
    assert search_cache.files_fingerprint([package], suffix=".py") == before
    (package / "module.py").write_text("A = 2\n")
    assert search_cache.files_fingerprint([package], suffix=".py") != before


@pytest.fixture
def stored(tiny_model_dir, tmp_path) -> tuple[SearchCache, dict[str, Any], Any, Path]:
    """A cache with one entry of the tiny search: the cache, the key, a base factory and the entry."""
    cache = tmp_path / "cache"
    _row(tiny_model_dir, tmp_path / "run", "fresh", cache)
    args = quality.parse_args(_tiny_grid(tiny_model_dir, tmp_path / "run", "fresh", SPEC.method))
    benchmark = quality.Benchmark(quality.settings_from(args), tmp_path, [], [])
    task = benchmark.task(SPEC.dataset, SPEC.seed)
    (entry,) = cache.iterdir()
    return SearchCache(cache), benchmark.search_key(SPEC), lambda: fresh_classifier(task, SPEC.seed), entry


def test_damaged_entries_are_refused_naming_their_path(stored):
    cache, key, base, entry = stored
    label = entry.name.rpartition("-")[0]
    weights = entry / "adapter" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8])
    with pytest.raises(ValueError, match=f"{re.escape(str(entry))}.* corrupt: adapter/adapter_model.safetensors"):
        cache.load(label, key, base)
    (entry / search_cache.MANIFEST_FILE).unlink()
    with pytest.raises(ValueError, match=f"{re.escape(str(entry))}.* incomplete: it has no manifest.json"):
        cache.load(label, key, base)


def test_an_entry_of_another_key_is_refused(stored):
    cache, key, base, entry = stored
    label = entry.name.rpartition("-")[0]
    other = {**key, "seed": 1}
    entry.rename(cache.entry(label, other))
    with pytest.raises(ValueError, match="another search's"):
        cache.load(label, other, base)


def test_an_interrupted_write_leaves_no_entry(stored):
    cache, key, base, entry = stored
    cached = cache.load(entry.name.rpartition("-")[0], key, base)
    other = {**key, "seed": 1}
    # A model that cannot be saved fails the write after the first files are written.
    with pytest.raises(AttributeError, match="save_pretrained"):
        cache.store("other", other, torch.nn.Linear(1, 1), cached.structure, cached.stats)
    assert _entries(cache.root) == [entry.name]

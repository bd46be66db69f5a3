"""Pulling a shared structure: from a folder, or from the Hub through huggingface_hub's cache, offline."""

from __future__ import annotations

import shutil
from pathlib import Path

import huggingface_hub
import pytest
from conftest import TINY_MODELS
from peft import get_peft_model

from peft_s3 import S3SearchConfig, SearchedStructure, apply_structure, resolve

REPO_ID = "someone/s3-bert-structure"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def structure() -> SearchedStructure:
    return resolve(get_peft_model(TINY_MODELS["bert"](), S3SearchConfig(budget=300, task_type="SEQ_CLS")))


@pytest.fixture
def offline_hub_cache(tmp_path: Path, structure: SearchedStructure, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A cache holding REPO_ID at COMMIT, laid out as huggingface_hub lays it out, with the Hub unreachable."""
    cache = tmp_path / "hub"
    repo = cache / f"models--{REPO_ID.replace('/', '--')}"
    written = structure.save(tmp_path / "pushed")
    blob = repo / "blobs" / "structure-blob"
    blob.parent.mkdir(parents=True)
    shutil.copy(written, blob)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    (snapshot / written.name).symlink_to(Path("../../blobs") / blob.name)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


def test_from_pretrained_reads_a_local_folder_or_file(tmp_path: Path, structure: SearchedStructure) -> None:
    file = structure.save(tmp_path)
    assert SearchedStructure.from_pretrained(tmp_path) == structure
    assert SearchedStructure.from_pretrained(str(file)) == structure


@pytest.mark.parametrize("revision", [None, "main", COMMIT])
def test_from_pretrained_reads_the_hub_cache_offline(
    offline_hub_cache: Path, structure: SearchedStructure, revision: str
) -> None:
    assert SearchedStructure.from_pretrained(REPO_ID, revision=revision) == structure


def test_apply_structure_takes_a_repo_id(offline_hub_cache: Path, structure: SearchedStructure) -> None:
    model = apply_structure(TINY_MODELS["bert"](), REPO_ID)
    from_object = apply_structure(TINY_MODELS["bert"](), structure)
    assert model.base_model.candidates() == from_object.base_model.candidates()
    trainable = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "s3_" in n)
    assert trainable == structure.num_trainable_params


def test_a_repo_missing_from_the_offline_cache_says_so(offline_hub_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        SearchedStructure.from_pretrained("someone/never-fetched")
    with pytest.raises(FileNotFoundError, match="not in the local Hugging Face cache"):
        SearchedStructure.from_pretrained(REPO_ID, revision="v2")


def test_neither_path_nor_repo_id_is_named(offline_hub_cache: Path) -> None:
    with pytest.raises(ValueError, match="neither an existing local path nor a valid Hub repo id"):
        SearchedStructure.from_pretrained("no/such/folder")


def test_revision_with_a_structure_object_is_refused(structure: SearchedStructure) -> None:
    with pytest.raises(ValueError, match="revision='main' applies to a structure given by repo id or path"):
        apply_structure(TINY_MODELS["bert"](), structure, revision="main")


@pytest.mark.parametrize("path", ["out/x.json", "out/s3_structure.json"])
def test_a_missing_local_json_path_is_not_taken_for_a_repo_id(offline_hub_cache: Path, path: str) -> None:
    with pytest.raises(FileNotFoundError, match=rf"No searched structure at '{path}': no such file or directory"):
        SearchedStructure.from_pretrained(path)


def test_a_missing_path_that_looks_like_a_repo_id_names_both_readings(offline_hub_cache: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"There is no local path 'out/x', and as a Hub repo id .*typo"):
        SearchedStructure.from_pretrained("out/x")

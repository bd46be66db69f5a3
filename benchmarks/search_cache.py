"""A cache of the quality benchmark's structure searches (quality.py --search-cache DIR).

Runs that differ only in how the searched structure starts its retraining (--retrain-init fresh / eva / inherit) run
the very same search, which is most of their cost. An entry DIR/<label>-<hash>/ holds what the rest of a run needs
from one search:

* adapter/: the search PeftModel's `save_pretrained` (alpha, every candidate's trained weights, the trained head),
  enough for `apply_structure(init="inherit", init_from=...)` and `peft_s3.resolve`;
* structure.json: the structure the run retrains (`SearchedStructure.save`);
* search.json: the search statistics the run row records;
* rng_state.pt: the Python, NumPy and torch CPU random states right after the search, restored after loading, so
  that what follows does not depend on whether the search ran;
* key.json: everything that determines the search (its SHA-256 names the entry);
* manifest.json: the SHA-256 of every other file, written last: an entry without it, or whose files do not match
  it, is refused.

An entry is written into a temporary directory of DIR and renamed into place, so an interrupted run leaves no half
entry (only a `.tmp-*` directory, which is never read).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Optional

import numpy
import torch
from peft import PeftModel

from peft_s3.structure import SearchedStructure

KEY_FILE = "key.json"
STRUCTURE_FILE = "structure.json"
STATS_FILE = "search.json"
RNG_FILE = "rng_state.pt"
ADAPTER_DIR = "adapter"
MANIFEST_FILE = "manifest.json"
TEMPORARY_PREFIX = ".tmp-"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def files_fingerprint(paths: Iterable[Path], suffix: str = "") -> str:
    """SHA-256 over the names and contents of `paths`: files as given, directories by their files ending in `suffix`
    (recursively). Names are relative to the directory given, so the fingerprint does not depend on where the
    checkout lies."""
    named: dict[str, Path] = {}
    for path in paths:
        if path.is_dir():
            named.update(
                {f"{path.name}/{file.relative_to(path).as_posix()}": file for file in path.rglob(f"*{suffix}")}
            )
        elif path.is_file():
            named[path.name] = path
        else:
            raise FileNotFoundError(f"{path} does not exist: it cannot be part of a search cache fingerprint.")
    digest = hashlib.sha256()
    for name in sorted(named):
        if named[name].is_file():
            digest.update(f"{name}\0{_sha256(named[name])}\n".encode())
    return digest.hexdigest()


def key_hash(key: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()


def _rng_state() -> dict[str, Any]:
    kind, keys, position, has_gauss, gauss = numpy.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (kind, keys.tolist(), position, has_gauss, gauss),
        "torch": torch.random.get_rng_state(),
    }


def _restore_rng_state(state: dict[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, gauss = state["numpy"]
    numpy.random.set_state((kind, numpy.array(keys, dtype=numpy.uint32), position, has_gauss, gauss))
    torch.random.set_rng_state(state["torch"])


@dataclass
class CachedSearch:
    """A search loaded from the cache: its model (the search PeftModel rebuilt on a fresh base), the structure the
    run retrains and the statistics it records."""

    model: PeftModel
    structure: SearchedStructure
    stats: dict[str, Any]


class SearchCache:
    """The entries of one cache directory, each named by a label (for people) and the hash of its key."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry(self, label: str, key: dict[str, Any]) -> Path:
        return self.root / f"{label}-{key_hash(key)[:16]}"

    def load(
        self, label: str, key: dict[str, Any], base_model: Callable[[], torch.nn.Module]
    ) -> Optional[CachedSearch]:
        """The search of `key`, its adapter loaded onto `base_model()` (the base the search ran on, built afresh);
        None when the cache has no entry for it. The random states are those right after the search."""
        path = self.entry(label, key)
        if not path.exists():
            return None
        self._check(path, key)
        model = PeftModel.from_pretrained(base_model(), path / ADAPTER_DIR)
        structure = SearchedStructure.load(path / STRUCTURE_FILE)
        stats = json.loads((path / STATS_FILE).read_text())
        _restore_rng_state(torch.load(path / RNG_FILE, weights_only=True))
        return CachedSearch(model, structure, stats)

    def _check(self, path: Path, key: dict[str, Any]) -> None:
        """Refuse an entry that is incomplete, altered, or another key's (a hash prefix shared by chance)."""

        def refuse(problem: str) -> NoReturn:
            raise ValueError(
                f"Search cache entry {path} is {problem}. Delete it (the search then runs again and rewrites it), or "
                "use another --search-cache."
            )

        manifest = path / MANIFEST_FILE
        if not manifest.is_file():
            refuse(f"incomplete: it has no {MANIFEST_FILE}")
        try:
            files = json.loads(manifest.read_text())
        except json.JSONDecodeError:
            refuse(f"corrupt: {MANIFEST_FILE} is not JSON")
        if not isinstance(files, dict):
            refuse(f"corrupt: {MANIFEST_FILE} is not a JSON object")
        required = {KEY_FILE, STRUCTURE_FILE, STATS_FILE, RNG_FILE, f"{ADAPTER_DIR}/adapter_config.json"}
        if not required <= set(files):
            refuse(f"incomplete: its {MANIFEST_FILE} lacks {sorted(required - set(files))}")
        for name, digest in files.items():
            if not (path / name).is_file():
                refuse(f"incomplete: {name} is missing")
            if _sha256(path / name) != digest:
                refuse(f"corrupt: {name} does not match its checksum in {MANIFEST_FILE}")
        if json.loads((path / KEY_FILE).read_text()) != key:
            refuse("another search's (its key.json differs from this run's key)")

    def store(
        self,
        label: str,
        key: dict[str, Any],
        model: PeftModel,
        structure: SearchedStructure,
        stats: dict[str, Any],
    ) -> Path:
        """Write the entry of a search that has just ended (the random states are taken now). An entry that another
        run wrote meanwhile is kept, and this one dropped: both hold the same search."""
        rng_state = _rng_state()
        path = self.entry(label, key)
        self.root.mkdir(parents=True, exist_ok=True)
        temporary = Path(tempfile.mkdtemp(prefix=f"{TEMPORARY_PREFIX}{path.name}-", dir=self.root))
        try:
            (temporary / KEY_FILE).write_text(json.dumps(key, indent=1, sort_keys=True))
            structure.save(temporary / STRUCTURE_FILE)
            (temporary / STATS_FILE).write_text(json.dumps(stats, indent=1))
            torch.save(rng_state, temporary / RNG_FILE)
            model.save_pretrained(temporary / ADAPTER_DIR)
            files = sorted(p for p in temporary.rglob("*") if p.is_file())
            manifest = {file.relative_to(temporary).as_posix(): _sha256(file) for file in files}
            (temporary / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1))
            try:
                os.rename(temporary, path)
            except OSError:
                if not path.is_dir():
                    raise
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
        return path

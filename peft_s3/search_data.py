"""The data of a structure search: D_alpha and D_delta (`search_and_delta_data`, `split_search_data`), and the
endless, resumable stream of D_alpha batches (`SearchBatches`)."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any, Optional

import torch
from torch.utils.data import Dataset, Subset
from transformers.trainer_utils import has_length

# The share of train_dataset split off as D_alpha when search_split is None, as in the paper.
DEFAULT_SEARCH_SPLIT = 0.5


def search_and_delta_data(
    train_dataset: Optional[Dataset], search_dataset: Optional[Dataset], search_split: Optional[float], seed: int
) -> tuple[Dataset, Optional[Dataset]]:
    """(D_alpha, D_delta): `search_dataset` and `train_dataset` as given, or, without a `search_dataset`, the share
    `search_split` of `train_dataset` split off as D_alpha (`split_search_data`) and the rest."""
    if search_dataset is None:
        fraction = DEFAULT_SEARCH_SPLIT if search_split is None else search_split
        return split_search_data(train_dataset, fraction, seed)
    if search_split is not None:
        raise ValueError(
            f"Pass either search_dataset (an explicit D_alpha) or search_split={search_split!r} (the fraction of "
            "train_dataset to split off as D_alpha), not both."
        )
    if has_length(search_dataset) and len(search_dataset) == 0:
        raise ValueError("search_dataset is empty; D_alpha needs at least one example.")
    return search_dataset, train_dataset


def split_search_data(dataset: Optional[Dataset], fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(D_alpha, D_delta): a share `fraction` of `dataset` and the rest, by a permutation seeded with `seed`."""
    if dataset is None or not has_length(dataset):
        raise ValueError(
            "S3SearchTrainer splits train_dataset into D_alpha and D_delta, which needs a dataset with a length; "
            f"got {type(dataset).__name__}. Pass search_dataset explicitly for iterable datasets."
        )
    size = len(dataset)
    num_search = round(size * fraction)
    if not 0 < num_search < size:
        raise ValueError(
            f"search_split={fraction} of a train_dataset of {size} examples leaves {num_search} for D_alpha and "
            f"{size - num_search} for D_delta; both need at least one example (use a larger dataset)."
        )
    order = torch.randperm(size, generator=torch.Generator().manual_seed(seed)).tolist()
    parts = (sorted(order[:num_search]), sorted(order[num_search:]))
    if hasattr(dataset, "select"):
        # A datasets.Dataset keeps its type, so the Trainer can still drop the columns the model does not take.
        return tuple(dataset.select(indices) for indices in parts)
    return tuple(Subset(dataset, indices) for indices in parts)


class SearchBatches:
    """Endless stream of D_alpha batches, epoch after epoch, that leaves the global CPU RNG untouched.

    Creating a DataLoader iterator draws from the global RNG (and a collator may too), so a stream created anew on
    resume would shift the gate noise of the resumed run. Every draw here runs in a forked RNG seeded from
    (seed, epoch, batch), which makes the stream reproducible from its position alone.
    """

    def __init__(self, dataloader: Iterable, seed: int, epoch: int = 0, batches_in_epoch: int = 0) -> None:
        self.dataloader = dataloader
        self.seed = seed
        self.epoch = epoch
        self.batches_in_epoch = batches_in_epoch
        self._iterator: Optional[Iterator] = None

    def _reseed(self, index: int) -> None:
        # Only the CPU generator: torch.manual_seed would also reseed CUDA, whose state the fork does not restore.
        torch.default_generator.manual_seed(((self.seed * 1_000_003 + self.epoch) * 1_000_003 + index) % 2**63)

    def __next__(self) -> Any:
        with torch.random.fork_rng(devices=[]):
            for _ in range(2):
                if self._iterator is None:
                    self._reseed(-1)
                    if hasattr(self.dataloader, "set_epoch"):
                        self.dataloader.set_epoch(self.epoch)
                    self._iterator = iter(self.dataloader)
                    # Resuming mid-epoch replays the iterator (loading data only), which also replays the state of
                    # any dataloader workers.
                    for _ in range(self.batches_in_epoch):
                        next(self._iterator)
                self._reseed(self.batches_in_epoch)
                try:
                    batch = next(self._iterator)
                except StopIteration:
                    self.epoch += 1
                    self.batches_in_epoch = 0
                    self._iterator = None
                    continue
                self.batches_in_epoch += 1
                return batch
        raise ValueError("The structure-search dataloader (D_alpha) yields no batches; give it at least one example.")

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "batches_in_epoch": self.batches_in_epoch}

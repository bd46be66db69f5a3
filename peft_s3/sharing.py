"""Sharing a retrained structure: save or push the adapter with s3_structure.json, its heatmap and a model card."""

from __future__ import annotations

import dataclasses
import importlib.util
import re
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

from peft import LoraConfig, PeftModel

from .plotting import plot_structure
from .structure import STRUCTURE_FILE, SearchedStructure
from .tuner.config import S3SearchConfig

STRUCTURE_FIGURE = "s3_structure.png"
MODEL_CARD_HEADING = "## S3 searched structure"
_MODEL_CARD_END = "<!-- end of S3 searched structure -->"


def write_model_card(save_directory: Union[str, Path], structure: SearchedStructure) -> Path:
    """Add (or replace) the "S3 searched structure" section of `save_directory/README.md`; returns the file.

    The section shows the heatmap `save_directory/s3_structure.png` when that file exists.
    """
    path = Path(save_directory) / "README.md"
    section = "\n".join(
        [
            MODEL_CARD_HEADING,
            "",
            "The structure of this adapter was found by Sparse Structure Search for Parameter-Efficient Tuning "
            "(S3PET) with `peft-s3`.",
            "",
            structure.to_markdown(),
            "",
            *(
                [f"![S3 searched structure: selected candidates per layer and position]({STRUCTURE_FIGURE})", ""]
                if (Path(save_directory) / STRUCTURE_FIGURE).is_file()
                else []
            ),
            f"The adapter was initialised for retraining with `{structure.retrain_init}` "
            "(`retrain_init` in the structure file).",
            "",
            f'`{STRUCTURE_FILE}` holds it: `peft_s3.apply_structure(base_model, "<this repo id or folder>")` '
            "builds it afresh on a base model for retraining, and "
            '`peft_s3.SearchedStructure.from_pretrained("<this repo id or folder>")` reads it.',
            _MODEL_CARD_END,
        ]
    )
    text = path.read_text(encoding="utf8") if path.exists() else ""
    start = text.find(MODEL_CARD_HEADING)
    if start == -1:
        text = f"{text.rstrip()}\n\n{section}\n" if text.strip() else f"{section}\n"
    else:
        end = text.find(_MODEL_CARD_END, start)
        if end == -1:
            # A section edited by hand may have lost its end marker; it then ends at the next level-2 heading.
            following = re.search(r"^## ", text[start + len(MODEL_CARD_HEADING) :], flags=re.MULTILINE)
            end = len(text) if following is None else start + len(MODEL_CARD_HEADING) + following.start()
        else:
            end += len(_MODEL_CARD_END)
        text = text[:start] + section + text[end:]
    path.write_text(text, encoding="utf8")
    return path


def retrain_init_of(peft_model: PeftModel, default: str = "fresh") -> str:
    """How the active adapter of `peft_model` was initialised: an S3 adapter's `retrain_init`, or a LoraConfig's
    `init_lora_weights` ('fresh' for peft's default True, 'random' for False); `default` for other adapters."""
    config = peft_model.peft_config[peft_model.active_adapter]
    if isinstance(config, S3SearchConfig):
        return config.retrain_init
    if isinstance(config, LoraConfig):
        init = config.init_lora_weights
        return init if isinstance(init, str) else ("fresh" if init else "random")
    return default


def save_pretrained_with_structure(
    peft_model: PeftModel,
    save_directory: Union[str, Path],
    structure: SearchedStructure,
    figure: bool = True,
    **kwargs: Any,
) -> None:
    """`peft_model.save_pretrained(save_directory, **kwargs)`, plus s3_structure.json and the model-card section.

    Both record how the adapter was initialised for retraining (`retrain_init_of(peft_model)`), the model's
    `retrain_init` or `init_lora_weights`; `structure` itself is left as it is.

    With `figure` (and matplotlib installed: `pip install peft-s3[plot]`) it also draws the structure's heatmap to
    s3_structure.png, which the model card shows.
    """
    peft_model.save_pretrained(str(save_directory), **kwargs)
    structure = dataclasses.replace(structure, retrain_init=retrain_init_of(peft_model, structure.retrain_init))
    structure.save(save_directory)
    if figure and importlib.util.find_spec("matplotlib") is not None:
        import matplotlib.pyplot as plt

        plt.close(plot_structure(structure, value="selected", path=Path(save_directory) / STRUCTURE_FIGURE))
    write_model_card(save_directory, structure)


def push_to_hub_with_structure(
    peft_model: PeftModel,
    repo_id: str,
    structure: SearchedStructure,
    *,
    api: Any = None,
    private: Optional[bool] = None,
    token: Optional[str] = None,
    commit_message: str = "Upload S3 searched structure and adapter",
    revision: Optional[str] = None,
    **kwargs: Any,
) -> Any:
    """Save like `save_pretrained_with_structure` into a temporary folder and upload it to the Hub repo `repo_id`.

    The repository is created if needed. `api` defaults to `huggingface_hub.HfApi(token=token)`; anything with the
    same `create_repo` and `upload_folder` methods works, e.g. a client of a private Hub mirror. `kwargs` go to
    `save_pretrained`. Returns what `upload_folder` returns (a `CommitInfo` for HfApi).
    """
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id=repo_id, private=private, exist_ok=True, repo_type="model")
    with tempfile.TemporaryDirectory() as folder:
        save_pretrained_with_structure(peft_model, folder, structure, **kwargs)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, revision=revision, repo_type="model"
        )

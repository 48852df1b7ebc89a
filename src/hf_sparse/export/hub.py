"""`push_to_hub`: upload an hf_sparse checkpoint through huggingface_hub (the usual token handling applies)."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from .card import CardInfo
from .reader import SparseCheckpoint
from .save import save_sparse


def push_to_hub(
    model_or_folder: Any,
    repo_id: str,
    config=None,
    *,
    token: str | bool | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
    tokenizer: Any = None,
    card: CardInfo | dict | None = None,
    **options,
):
    """Upload to the Hub repository `repo_id` (created if needed) and return huggingface_hub's CommitInfo.

    `model_or_folder` is either a pruned model, saved first with `save_sparse(model, ..., config, tokenizer=...,
    card=..., **options)` into a temporary folder (the card's usage snippet then names `repo_id`), or the folder of
    a checkpoint `save_sparse` wrote, which is fully validated before anything is uploaded.
    `token`: a Hub token; None uses the `HF_TOKEN` environment variable or the cached `hf auth login` token.
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    if isinstance(model_or_folder, (str, os.PathLike)):
        if config is not None or tokenizer is not None or card is not None or options:
            raise TypeError(
                "push_to_hub(folder, ...) uploads the folder as saved; config, tokenizer, card and export options "
                "apply when pushing a model"
            )
        folder = Path(model_or_folder)
        SparseCheckpoint(folder).validate()
        return _upload(api, folder, repo_id, private, revision, commit_message, create_pr)
    with tempfile.TemporaryDirectory(prefix="hf_sparse_push_") as tmp:
        folder = Path(tmp) / repo_id.split("/")[-1]
        save_sparse(
            model_or_folder,
            folder,
            config,
            tokenizer=tokenizer,
            card=CardInfo.from_any(card).with_repo_id(repo_id),
            **options,
        )
        return _upload(api, folder, repo_id, private, revision, commit_message, create_pr)


def _upload(api, folder: Path, repo_id: str, private, revision, commit_message, create_pr):
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None:
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    return api.upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=commit_message or "Upload hf_sparse checkpoint",
        revision=revision,
        create_pr=create_pr,
    )

"""push_to_hub, with huggingface_hub's network calls intercepted: exactly what would be uploaded, and where."""

from __future__ import annotations

import shutil

import pytest
from huggingface_hub import HfApi, ModelCard

from hf_sparse import SparseConfig
from hf_sparse.export import CheckpointError, SparseCheckpoint, push_to_hub, save_sparse
from tests.export.conftest import pruned_bert


class FakeHub:
    """Records create_repo / create_branch / upload_folder calls and snapshots the folder being uploaded."""

    def __init__(self, monkeypatch, tmp_path):
        self.calls = []
        self.snapshot = tmp_path / "uploaded"
        hub = self

        def create_repo(api, repo_id, **kwargs):
            hub.calls.append(("create_repo", repo_id, kwargs, api.token))
            return type("RepoUrl", (), {"repo_id": repo_id})()

        def create_branch(api, repo_id, **kwargs):
            hub.calls.append(("create_branch", repo_id, kwargs, api.token))

        def upload_folder(api, **kwargs):
            hub.calls.append(("upload_folder", kwargs["repo_id"], kwargs, api.token))
            shutil.copytree(kwargs["folder_path"], hub.snapshot)
            return "commit-info"

        monkeypatch.setattr(HfApi, "create_repo", create_repo)
        monkeypatch.setattr(HfApi, "create_branch", create_branch)
        monkeypatch.setattr(HfApi, "upload_folder", upload_folder)


def test_push_a_model(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    model, recipe = pruned_bert("4-block")
    result = push_to_hub(
        model, "org/tiny-sparse", recipe, token="hf_test", private=True, weight_dtype="int8", card={"license": "mit"}
    )
    assert result == "commit-info"
    assert [c[0] for c in hub.calls] == ["create_repo", "upload_folder"]
    _, repo_id, kwargs, token = hub.calls[0]
    assert repo_id == "org/tiny-sparse" and kwargs == {"private": True, "exist_ok": True} and token == "hf_test"
    _, repo_id, kwargs, token = hub.calls[1]
    assert repo_id == "org/tiny-sparse" and token == "hf_test"
    assert kwargs["commit_message"] == "Upload hf_sparse checkpoint" and kwargs["revision"] is None
    assert kwargs["create_pr"] is False

    uploaded = sorted(p.name for p in hub.snapshot.iterdir())
    assert uploaded == ["README.md", "config.json", "model.safetensors", "sparse_config.json"]
    checkpoint = SparseCheckpoint(hub.snapshot)
    checkpoint.validate()
    assert checkpoint.quantization.weights.dtype == "int8"
    assert SparseConfig.from_pretrained(hub.snapshot) == recipe
    card = ModelCard.load(hub.snapshot / "README.md")
    assert card.data.license == "mit" and card.data.model_name == "tiny-sparse"
    assert 'BertForSequenceClassification.from_pretrained("org/tiny-sparse")' in card.text


def test_push_a_saved_folder_to_a_branch(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    model, recipe = pruned_bert("2:4")
    folder = save_sparse(model, tmp_path / "ckpt", recipe)
    push_to_hub(folder, "org/nm", revision="v1", commit_message="2:4 model", create_pr=True)
    assert [c[0] for c in hub.calls] == ["create_repo", "create_branch", "upload_folder"]
    assert hub.calls[1][2] == {"branch": "v1", "exist_ok": True}
    upload = hub.calls[2][2]
    assert upload["revision"] == "v1" and upload["commit_message"] == "2:4 model" and upload["create_pr"] is True
    assert hub.calls[2][3] is None  # no token given: huggingface_hub falls back to HF_TOKEN or the cached login
    assert {p.name: p.read_bytes() for p in hub.snapshot.iterdir()} == {
        p.name: p.read_bytes() for p in folder.iterdir()
    }


def test_a_broken_folder_is_never_uploaded(tmp_path, monkeypatch):
    hub = FakeHub(monkeypatch, tmp_path)
    model, recipe = pruned_bert("4-block")
    folder = save_sparse(model, tmp_path / "ckpt", recipe)
    data = (folder / "model.safetensors").read_bytes()
    (folder / "model.safetensors").write_bytes(data[:-100])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        push_to_hub(folder, "org/broken")
    assert hub.calls == []
    with pytest.raises(TypeError, match="uploads the folder as saved"):
        push_to_hub(folder, "org/x", weight_dtype="int8")

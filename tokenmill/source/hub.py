"""Models named by a HF hub id: downloaded (or found in the local HF cache) through huggingface_hub."""

from __future__ import annotations

import glob
import os

_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]
_PT_PATTERNS = ["pytorch_model*.bin", "*.pt"]  # a repository without safetensors: its PyTorch pickles


def download_model(repo_id: str, revision: str | None = None) -> str:
    """The local snapshot directory of `repo_id`; a clear error if the hub cannot be reached."""
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS)
        if not glob.glob(os.path.join(path, "*.safetensors")):
            path = snapshot_download(repo_id, revision=revision, allow_patterns=_PATTERNS + _PT_PATTERNS)
        return path
    except Exception as exc:  # huggingface_hub raises many types: offline, 404, auth, network
        raise RuntimeError(
            f"could not get model {repo_id!r} from the Hugging Face hub ({type(exc).__name__}: {exc}). "
            "Pass a local directory or .gguf file instead, or check the network / HF_TOKEN.") from exc

"""Optional text conditioning: a pretrained text encoder loaded from a local folder.

Text is off by default (``DiTConfig.text_dim = 0``). When a model is built with
``text_dim = D``, its ``text`` input is [B, L, D] token embeddings (mean-pooled into
the adaLN conditioning vector) or [B, D] pooled embeddings; ``load_text_encoder``
turns prompts into such tensors. Nothing is downloaded: the encoder must already be on
disk, saved with Hugging Face ``save_pretrained`` (the ``transformers`` package is then
needed, and imported only here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

TextEncoder = Callable[[list[str]], torch.Tensor]


def load_text_encoder(path: str | Path, device: torch.device | str = "cpu", max_length: int = 77) -> TextEncoder:
    """prompts -> [B, L, D] embeddings from the encoder saved at ``path``; clear errors for a missing path."""
    root = Path(path).expanduser()
    if not root.exists():
        raise FileNotFoundError(
            f"text encoder not found at {root}: pass the local folder of a pretrained text encoder "
            f"(saved with save_pretrained, containing config.json), or leave text conditioning off (text_dim=0)")
    if not (root / "config.json").is_file():
        raise ValueError(f"{root} holds no config.json; save the encoder and its tokenizer there with save_pretrained")
    try:
        from transformers import AutoModel, AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("loading a text encoder needs the 'transformers' package; install it or set text_dim=0") from e
    tokenizer = AutoTokenizer.from_pretrained(root)
    model = AutoModel.from_pretrained(root)
    encoder = model.get_encoder() if hasattr(model, "get_encoder") else model  # T5: the encoder half only
    encoder = encoder.to(device).eval().requires_grad_(False)

    @torch.no_grad()
    def encode(prompts: list[str]) -> torch.Tensor:
        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        return encoder(**{k: v.to(device) for k, v in batch.items()}).last_hidden_state

    return encode

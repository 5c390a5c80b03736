"""Optional text conditioning: a pretrained text encoder loaded from a local folder.

Text is off by default (``DiTConfig.text_dim = 0``). When a model is built with
``text_dim = D``, its ``text`` input is [B, L, D] token embeddings (pooled over the
real tokens into the adaLN conditioning vector) or [B, D] pooled embeddings;
``load_text_encoder`` turns prompts into such tensors and their padding mask. Nothing is downloaded: the encoder must already be on
disk, saved with Hugging Face ``save_pretrained`` (the ``transformers`` package is then
needed, and imported only here).
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

TextEncoder = Callable[[list[str]], tuple[torch.Tensor, torch.Tensor]]


def load_text_encoder(path: str | Path, device: torch.device | str = "cpu", max_length: int = 77) -> TextEncoder:
    """prompts -> ([B, L, D] embeddings, [B, L] mask of real tokens) from the encoder saved at ``path``.

    The mask goes with the embeddings into ``VideoDiT(..., text=emb, text_mask=mask)``: padded to
    ``max_length``, a short prompt is mostly padding, which a plain mean would average in.
    """
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
    def encode(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer(prompts, padding="max_length", truncation=True, max_length=max_length, return_tensors="pt")
        batch = {k: v.to(device) for k, v in batch.items()}
        return encoder(**batch).last_hidden_state, batch["attention_mask"].bool()

    return encode

"""Tokenizers: a checkpoint's own (through transformers), or a byte-level one for dummy weights."""
from __future__ import annotations

from pathlib import Path

from .errors import OffloadgenError


class HFTokenizer:
    """A thin wrapper so the engine needs only encode / decode / eos / pad / chat template."""

    def __init__(self, tok, cfg):
        self._tok = tok
        eos = tok.eos_token_id if tok.eos_token_id is not None else cfg.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
        if isinstance(cfg.eos_token_id, list):
            self.eos_token_ids |= set(cfg.eos_token_id)
        self.pad_token_id = next(x for x in (tok.pad_token_id, cfg.pad_token_id, min(self.eos_token_ids, default=0))
                                 if x is not None)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True)

    def apply_chat_template(self, messages: list[dict]) -> str:
        if not getattr(self._tok, "chat_template", None):
            raise OffloadgenError("this model's tokenizer has no chat template; give a plain 'prompt'")
        return self._tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def load_hf_tokenizer(folder: Path, cfg) -> HFTokenizer:
    if not any((folder / f).is_file() for f in ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")):
        raise OffloadgenError(f"{folder}: no tokenizer files (tokenizer.json, tokenizer.model or vocab.json)")
    from transformers import AutoTokenizer
    try:
        tok = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    except Exception as e:
        raise OffloadgenError(f"{folder}: cannot load its tokenizer ({e})") from None
    return HFTokenizer(tok, cfg)


class ByteTokenizer:
    """UTF-8 bytes shifted past the special ids: dummy weights have no vocabulary of their own,
    and every model's vocabulary is larger than 256 + 3."""

    OFFSET = 3

    def __init__(self, cfg):
        eos = cfg.eos_token_id if cfg.eos_token_id is not None else 2
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos])
        self.pad_token_id = cfg.pad_token_id if cfg.pad_token_id is not None else min(self.eos_token_ids)

    def encode(self, text: str) -> list[int]:
        return [b + self.OFFSET for b in text.encode()]

    def decode(self, ids: list[int]) -> str:
        return bytes(i - self.OFFSET for i in ids if self.OFFSET <= i < 256 + self.OFFSET).decode(errors="replace")

    def apply_chat_template(self, messages: list[dict]) -> str:
        return "\n".join(f"{m['role']}: {m['content']}" for m in messages) + "\nassistant:"

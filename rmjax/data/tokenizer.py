"""Tokenisers behind one tiny interface: ``encode(text) -> list[int]``, ``pad_id``, ``vocab_size``."""
from __future__ import annotations


class ByteTokenizer:
  """UTF-8 bytes; id 0 (NUL) is padding, so text must not contain NUL."""
  vocab_size = 256
  pad_id = 0

  def encode(self, text: str) -> list[int]:
    ids = list(text.encode("utf-8"))
    if self.pad_id in ids:
      raise ValueError(f"text contains a NUL byte (the pad id): {text[:60]!r}")
    return ids

  def decode(self, ids) -> str:
    return bytes(int(i) for i in ids if i != self.pad_id).decode("utf-8", errors="replace")

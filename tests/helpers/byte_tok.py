"""A tokenizer of bytes (id = byte + 3; 0 pad, 1 BOS, 2 EOS): independent of ours and trivially
correct, for harness tests with tiny models."""

from __future__ import annotations


class ByteTok:
    bos_id, eos_id, vocab_size, name = 1, 2, 259, "bytes"

    def encode(self, text):
        return [b + 3 for b in text.encode()]

    def decode(self, ids):
        return bytes(i - 3 for i in ids if 3 <= i < 259).decode("utf-8", "replace")


TOK = ByteTok()

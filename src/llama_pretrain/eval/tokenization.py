"""One small tokenizer interface for the harness, over SentencePiece models and HF tokenizers.

The harness needs: ``encode(text)`` without special tokens, ``decode(ids)`` that ignores ids it
does not know (a model's vocabulary may be padded past the tokenizer's), ``bos_id`` (or None),
``eos_id`` (or None) and ``add_bos``: whether the tokenizer itself starts a text with BOS, so the
harness does so only then, as lm-evaluation-harness does (SmolLM2's tokenizer adds none).
"""

from __future__ import annotations

import os
from pathlib import Path

from ..errors import UserError


class TokenizerText:
    """Our ``Tokenizer``: a SentencePiece model file (Meta's or one trained by this project) or a
    Hugging Face tokenizer.json."""

    def __init__(self, path: str | Path):
        from ..tokenizer import Tokenizer

        self.tok = Tokenizer(path)
        self.name = str(path)
        self.bos_id = self.tok.bos_id if self.tok.bos_id >= 0 else None
        self.eos_id = self.tok.eos_id if self.tok.eos_id >= 0 else None
        self.add_bos = self.tok.add_bos and self.bos_id is not None
        self.vocab_size = self.tok.vocab_size

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, bos=False, eos=False)

    def decode(self, ids) -> str:
        ids = [i for i in ids if 0 <= i < self.vocab_size]
        if self.tok.kind == "hf":  # as HFText: special tokens dropped, as SentencePiece drops <s>
            return self.tok.decode(ids, skip_special_tokens=True)  # type: ignore[call-arg]
        return self.tok.decode(ids)


class HFText:
    """A ``transformers`` tokenizer (``AutoTokenizer.from_pretrained``)."""

    def __init__(self, name_or_path: str | Path):
        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise UserError("scoring a Hugging Face model needs `transformers` "
                            "(pip install 'llama-pretrain[eval]')") from None
        local = Path(name_or_path).is_dir()
        if local:
            from ..interop.model_dir import check_transformers_dir
            check_transformers_dir(Path(name_or_path))
        try:  # never code shipped with the tokenizer; a local dir is read, not looked up on the Hub
            self.tok = AutoTokenizer.from_pretrained(str(name_or_path), trust_remote_code=False,
                                                     local_files_only=local)
        except Exception as e:  # noqa: BLE001 - a local dir's files may make transformers raise anything
            if not (local or isinstance(e, (OSError, ValueError))):
                raise
            detail = (str(e).splitlines() or [""])[0][:300]
            raise UserError(f"cannot load a tokenizer from {name_or_path}: {type(e).__name__}: {detail}") from None
        self.name = str(name_or_path)
        self.bos_id = self.tok.bos_token_id
        self.eos_id = self.tok.eos_token_id
        self.vocab_size = len(self.tok)
        plain = self.tok.encode("a", add_special_tokens=False)
        full = self.tok.encode("a")
        self.add_bos = self.bos_id is not None and len(full) > len(plain) and full[0] == self.bos_id

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False)

    def decode(self, ids) -> str:
        # one sequence of ids decodes to a str; the annotation also covers a batch
        return self.tok.decode([i for i in ids if 0 <= i < self.vocab_size],  # type: ignore[return-value]
                               skip_special_tokens=True)


def load_tokenizer(path: str | Path, native: bool = False):
    """A SentencePiece ``.model`` or ``tokenizer.json`` file, a checkpoint dir holding one, or an HF
    dir/name. An HF dir goes to transformers' ``AutoTokenizer`` unless ``native`` (our model scores
    it): then its tokenizer.model or tokenizer.json is read by our ``Tokenizer``."""
    p = Path(path)
    if p.is_file():
        return TokenizerText(p)
    if p.is_dir():
        from ..interop import find_tokenizer
        from ..interop.hf import is_hf_dir

        hf = is_hf_dir(p) and any(os.path.lexists(p / f) for f in ("tokenizer.json", "tokenizer_config.json"))
        if hf and not native:
            return HFText(p)
        ours = find_tokenizer(p, check=False)  # TokenizerText loads it (once)
        if ours is not None:
            return TokenizerText(ours)
        if hf:
            return HFText(p)
        raise UserError(f"{p}: no tokenizer found (tokenizer.model or an HF tokenizer); pass --tokenizer")
    return HFText(path)  # a hub name

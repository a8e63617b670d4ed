"""Export to GGUF, llama.cpp's file format, through llama.cpp's own writer (the ``gguf`` package).

What is written follows llama.cpp's ``convert_hf_to_gguf.py`` for a SentencePiece Llama: the
``llama`` architecture's hyperparameters, the vocabulary as its "llama" tokenizer (pieces,
scores, token types) and its tensor names. A Hugging Face byte-level BPE tokenizer.json becomes its
"gpt2" tokenizer (tokens, token types, merges, and the pre-tokenizer name llama.cpp knows it by;
one it does not know is refused). No q/k permutation: the converter permutes Hugging
Face's half-split rows back to Meta's interleaved RoPE pairs, which is the layout we keep.
Norms stay float32 in every file type, as the converter keeps them; a matrix whose rows are not a
whole number of q8_0 blocks falls back to f16, as there. A tied model's state holds no
``output.weight``, so the file has no ``output`` tensor: llama.cpp then reads the head from
``token_embd``, as for the tied models its converter writes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import atomic_file
from ..model import rope_frequencies

GGUF_DTYPES = ("f32", "f16", "bf16", "q8_0")

_TOP_NAMES = {"tok_embeddings.weight": "token_embd.weight", "norm.weight": "output_norm.weight",
              "output.weight": "output.weight", "rope_freqs.weight": "rope_freqs.weight"}
_LAYER_NAMES = {  # ours (inside layers.N.) -> llama.cpp's (inside blk.N.)
    "attention_norm.weight": "attn_norm.weight",
    "attention.wq.weight": "attn_q.weight",
    "attention.wk.weight": "attn_k.weight",
    "attention.wv.weight": "attn_v.weight",
    "attention.wo.weight": "attn_output.weight",
    "ffn_norm.weight": "ffn_norm.weight",
    "feed_forward.w1.weight": "ffn_gate.weight",
    "feed_forward.w2.weight": "ffn_down.weight",
    "feed_forward.w3.weight": "ffn_up.weight",
}


def _gguf():
    try:
        import gguf
    except ImportError as e:  # pragma: no cover - a declared dependency
        raise UserError("export-gguf needs the gguf package (pip install gguf)") from e
    return gguf


def gguf_name(name: str) -> str:
    """llama.cpp's name for our tensor ``name``."""
    if name in _TOP_NAMES:
        return _TOP_NAMES[name]
    _, idx, rest = name.split(".", 2)
    return f"blk.{idx}.{_LAYER_NAMES[rest]}"


def _qtype(name: str, shape: tuple[int, ...], dtype: str):
    """The tensor's GGML type: norms and RoPE frequency factors float32; q8_0 only for rows a
    whole number of blocks long."""
    q = _gguf().GGMLQuantizationType
    if name.endswith(("norm.weight", "rope_freqs.weight")) or dtype == "f32":
        return q.F32
    qtype = {"f16": q.F16, "bf16": q.BF16, "q8_0": q.Q8_0}[dtype]
    block, _ = _gguf().GGML_QUANT_SIZES[qtype]
    return qtype if shape[-1] % block == 0 else q.F16


def _nbytes(shape: tuple[int, ...], qtype) -> int:
    block, size = _gguf().GGML_QUANT_SIZES[qtype]
    return int(np.prod(shape)) // block * size


def _add_hparams(writer, cfg: ModelConfig, name: str, dtype: str) -> None:
    gguf = _gguf()
    writer.add_name(name)
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "bf16": gguf.LlamaFileType.MOSTLY_BF16, "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_vocab_size(cfg.vocab_size)
    writer.add_context_length(cfg.max_seq_len)
    writer.add_embedding_length(cfg.dim)
    writer.add_feed_forward_length(cfg.hidden_dim)
    writer.add_block_count(cfg.n_layers)
    writer.add_head_count(cfg.n_heads)
    writer.add_head_count_kv(cfg.kv_heads)
    writer.add_rope_dimension_count(cfg.head_dim)
    writer.add_rope_freq_base(float(cfg.rope_theta))
    writer.add_layer_norm_rms_eps(float(cfg.norm_eps))


def vocabulary(tokenizer_model: Path) -> dict:
    """The SentencePiece model as llama.cpp's "llama" tokenizer: pieces, scores, token types,
    special ids and the normaliser's dummy-prefix flag; a tokenizer.json as its "gpt2" one."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb

    from ..tokenizer import Tokenizer

    tok = Tokenizer(tokenizer_model)
    if tok.kind == "hf":
        return _gpt2_vocabulary(tok)  # type: ignore[arg-type]
    sp: SentencePieceProcessor = tok.sp
    types = _gguf().TokenType
    pieces, scores, kinds = [], [], []
    for i in range(sp.get_piece_size()):
        pieces.append(sp.id_to_piece(i).encode("utf-8"))
        scores.append(sp.get_score(i))
        kinds.append(types.UNKNOWN if sp.is_unknown(i) else types.CONTROL if sp.is_control(i)
                     else types.UNUSED if sp.is_unused(i) else types.BYTE if sp.is_byte(i) else types.NORMAL)
    proto = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf makes the classes at import
    proto.ParseFromString(Path(tokenizer_model).read_bytes())
    return {"model": "llama", "pre": "default", "pieces": pieces, "scores": scores, "types": kinds,
            "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(), "pad": sp.pad_id(),
            "add_bos": True, "add_eos": False,  # as our generate and eval encode prompts
            "add_space_prefix": proto.normalizer_spec.add_dummy_prefix}


def _add_vocabulary(writer, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab["model"])
    writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["pieces"])
    if vocab["model"] == "llama":
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types([int(t) for t in vocab["types"]])
    if vocab["model"] == "gpt2":
        writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if vocab[key] >= 0:
            add(vocab[key])
    writer.add_add_bos_token(bool(vocab["add_bos"]))
    writer.add_add_eos_token(bool(vocab["add_eos"]))
    if vocab["model"] == "llama":
        writer.add_add_space_prefix(bool(vocab["add_space_prefix"]))


# llama.cpp's names for byte-level BPE pre-tokenizers. Its converter knows them by a hash of the
# ids of a probe text; here by the tokenizer.json's own steps, with the BPE model's ignore_merges
# (llama.cpp's llama-bpe takes a word that is in the vocabulary whole, without merging).
_LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
GGUF_PRE_TOKENIZERS: dict[tuple, str] = {
    ((("ByteLevel", True),), False): "gpt-2",
    ((("Digits", True), ("ByteLevel", True)), False): "smollm",
    ((("Split", _LLAMA3_SPLIT, "Isolated", False), ("ByteLevel", False)), True): "llama-bpe",
}


def _pre_steps(pre: Any) -> tuple | None:
    """A tokenizer.json pre-tokenizer as comparable steps; None where a step is none of the above."""
    steps = pre.get("pretokenizers") if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    out: list[tuple] = []
    st: Any
    for st in steps if isinstance(steps, list) else [None]:
        kind = st.get("type") if isinstance(st, dict) else None
        if kind == "ByteLevel" and not st.get("add_prefix_space"):
            out.append(("ByteLevel", bool(st.get("use_regex", True))))
        elif kind == "Digits":
            out.append(("Digits", bool(st.get("individual_digits"))))
        elif kind == "Split" and isinstance(st.get("pattern"), dict):
            out.append(("Split", st["pattern"].get("Regex"), st.get("behavior"), bool(st.get("invert"))))
        else:
            return None
    return tuple(out)


def gguf_pre_tokenizer(spec: dict, where) -> str:
    """llama.cpp's name for a tokenizer.json's pre-tokenizer; a one-line UserError when it has none."""
    model, decoder = spec.get("model") or {}, spec.get("decoder")
    key = (_pre_steps(spec.get("pre_tokenizer")), bool(model.get("ignore_merges", False)))
    name = GGUF_PRE_TOKENIZERS.get(key) if key[0] is not None else None
    byte_level = (model.get("type") == "BPE" and spec.get("normalizer") is None
                  and isinstance(decoder, dict) and decoder.get("type") == "ByteLevel")
    if name is None or not byte_level:
        raise UserError(f"{where}: llama.cpp knows no tokenizer like this one (export-gguf takes byte-level BPE "
                        f"with the pre-tokenizer of {', '.join(sorted(GGUF_PRE_TOKENIZERS.values()))})")
    return name


def _gpt2_vocabulary(tok) -> dict:
    """A tokenizer.json as llama.cpp's "gpt2" tokenizer, as its converter writes it: tokens in id
    order, special added tokens (and ones that look special, <|...|>) CONTROL, other added tokens
    USER_DEFINED, merges as "a b"."""
    types = _gguf().TokenType
    pre = gguf_pre_tokenizer(tok.spec, tok.path)
    added = tok.hf.get_added_tokens_decoder()
    pieces, kinds = [], []
    for i in range(tok.vocab_size):
        piece = tok.hf.id_to_token(i)
        pieces.append(piece if piece is not None else f"[PAD{i}]")
        a = added.get(i)
        kinds.append(types.UNUSED if piece is None else types.NORMAL if a is None
                     else types.CONTROL if a.special or (piece.startswith("<|") and piece.endswith("|>"))
                     else types.USER_DEFINED)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok.spec["model"].get("merges", [])]
    return {"model": "gpt2", "pre": pre, "pieces": pieces, "types": kinds, "merges": merges,
            "bos": tok.bos_id, "eos": tok.eos_id, "unk": tok.unk_id, "pad": tok.pad_id,
            "add_bos": tok.add_bos, "add_eos": tok.add_eos}


def rope_freqs(cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama 3.1's RoPE scaling as llama.cpp takes it: ``rope_freqs.weight``, by how much each
    frequency is divided (as its converter writes it for ``rope_type: llama3``); none unscaled."""
    if cfg.rope_scaling is None:
        return {}
    return {"rope_freqs.weight": rope_frequencies(cfg, scaled=False) / rope_frequencies(cfg)}


def save_gguf(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path, tokenizer_model: Path,
              dtype: str = "f32", name: str = "llama-pretrain") -> Path:
    """Write ``state`` (Meta names) as one GGUF file that llama.cpp's ``llama`` architecture loads."""
    if dtype not in GGUF_DTYPES:
        raise UserError(f"GGUF dtype {dtype!r}: expected one of {', '.join(GGUF_DTYPES)}")
    vocab = vocabulary(tokenizer_model)
    if len(vocab["pieces"]) != cfg.vocab_size:
        raise UserError(f"tokenizer {tokenizer_model} has {len(vocab['pieces'])} pieces but the model's "
                        f"vocab_size is {cfg.vocab_size}")
    state = {**state, **rope_freqs(cfg)}
    out = Path(out)
    writer = _gguf().GGUFWriter(path=None, arch="llama")
    _add_hparams(writer, cfg, name, dtype)
    _add_vocabulary(writer, vocab)
    qtypes = {key: _qtype(key, tuple(w.shape), dtype) for key, w in state.items()}
    for key, w in state.items():  # the table first; each tensor is converted as it is written
        writer.add_tensor_info(gguf_name(key), tuple(w.shape), np.dtype(np.float32),
                               _nbytes(tuple(w.shape), qtypes[key]), raw_dtype=qtypes[key])
    with atomic_file(out) as fh:
        # The writer opens files by path: give it the temporary file's descriptor by name, so the
        # bytes land in atomic_file's sibling and appear under ``out`` only once complete.
        writer.write_header_to_file(Path(f"/dev/fd/{fh.fileno()}"))
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for key, w in state.items():
            data = w.detach().to(torch.float32).cpu().numpy()
            writer.write_tensor_data(_gguf().quants.quantize(data, qtypes[key]))
        writer.close()
    return out

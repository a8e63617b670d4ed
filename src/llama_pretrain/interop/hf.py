"""Conversion between Meta's parameter layout (ours) and Hugging Face ``LlamaForCausalLM``.

Meta's RoPE rotates interleaved pairs (x[2i], x[2i+1]); Hugging Face's rotates the two halves of
each head (x[i], x[i + D/2]). The two are the same model once the rows of ``wq`` and ``wk`` are
permuted within each head, which is what ``_to_hf_rows`` / ``_from_hf_rows`` do. Everything else is
a rename. Weights are written as safetensors with a ``config.json`` that transformers loads.

Tied embeddings (``_tied``): a checkpoint whose config sets ``tie_word_embeddings``, or that has
no ``lm_head.weight``, is tied; a head written beside a tied embedding must equal it (transformers
would silently untie a head that differs; that is refused here). A tied model is written with
``tie_word_embeddings: true`` and no ``lm_head.weight``.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import torch

from ..config import ModelConfig
from ..errors import UserError
from ..fsutil import Owned, atomic_dir
from ..tokenizer import Tokenizer, is_hf_tokenizer, tokenizer_files
from .checks import check_shapes, model_config
from .model_dir import check_file_tensors, check_transformers_dir, model_file, read_model_json, weight_files
from .torch_files import check_backed, read_torch_file, torch_file_tensors

_LAYER_MAP = {  # ours (inside layers.N.) -> HF (inside model.layers.N.)
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
}
_TOP_MAP = {
    "tok_embeddings.weight": "model.embed_tokens.weight",
    "norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def _to_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, rows // n_heads // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def _from_hf_rows(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    rows, cols = w.shape
    return w.view(n_heads, 2, rows // n_heads // 2, cols).transpose(1, 2).reshape(rows, cols)


def to_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF names and row order; a tied model has no ``lm_head.weight`` (``tie_word_embeddings``)."""
    out = {}
    for name, w in state.items():
        if name == "output.weight" and cfg.tie_embeddings:
            continue
        if name in _TOP_MAP:
            out[_TOP_MAP[name]] = w
            continue
        _, idx, rest = name.split(".", 2)
        if rest == "attention.wq.weight":
            w = _to_hf_rows(w, cfg.n_heads)
        elif rest == "attention.wk.weight":
            w = _to_hf_rows(w, cfg.kv_heads)
        out[f"model.layers.{idx}.{_LAYER_MAP[rest]}"] = w
    return out


def _our_name(name: str, where: str) -> str | None:
    """Our name for the HF tensor ``name``; None for a buffer we recompute (rotary_emb.inv_freq)."""
    top = {v: k for k, v in _TOP_MAP.items()}
    layer = {v: k for k, v in _LAYER_MAP.items()}
    if name in top:
        return top[name]
    parts = name.split(".", 3)
    if len(parts) != 4 or parts[:2] != ["model", "layers"] or parts[3] not in layer:
        if name.endswith("rotary_emb.inv_freq"):
            return None
        raise UserError(f"{where}: unexpected tensor {name!r} for a Llama model")
    return f"layers.{parts[2]}.{layer[parts[3]]}"


def _renamed(state: dict, where: str) -> dict:
    """``state`` (tensors or shapes) under our names."""
    return {new: v for name, v in state.items() if (new := _our_name(name, where)) is not None}


def _tied(cfg: ModelConfig, shapes: dict, where) -> tuple[ModelConfig, dict]:
    """(``cfg``, ``shapes``) with the embeddings tied where the checkpoint is: its config says so
    (``tie_word_embeddings``), or it has no head (the head is then the embedding, the only reading
    under which the checkpoint is a whole model). A tied checkpoint's written head must have the
    embedding's shape; it is dropped here, and compared with the embedding once read
    (``_check_written_head``)."""
    cfg = dataclasses.replace(cfg, tie_embeddings=cfg.tie_embeddings or "output.weight" not in shapes)
    if not cfg.tie_embeddings or "output.weight" not in shapes:
        return cfg, shapes
    head, embedding = tuple(shapes["output.weight"]), tuple(shapes.get("tok_embeddings.weight", ()))
    if head != embedding:
        raise UserError(f"{where}: the config ties the embeddings, but lm_head.weight has shape {head} "
                        f"and embed_tokens.weight {embedding}")
    return cfg, {k: v for k, v in shapes.items() if k != "output.weight"}


def _check_written_head(state: dict[str, torch.Tensor], where) -> None:
    """A tied checkpoint that writes its head as well: it must be the embedding (transformers would
    silently untie the two; here the config is taken at its word or refused)."""
    head = state.get("output.weight")
    if head is not None and not torch.equal(head, state["tok_embeddings.weight"]):
        raise UserError(f"{where}: config.json ties the embeddings (tie_word_embeddings) but lm_head.weight "
                        f"differs from embed_tokens.weight; set tie_word_embeddings to false to keep both")


def from_hf_state_dict(state: dict[str, torch.Tensor], cfg: ModelConfig,
                       where: str = "HF checkpoint") -> dict[str, torch.Tensor]:
    """Our names and row order; a tied ``cfg`` keeps the shared matrix once (no ``output.weight``)."""
    out = _renamed(state, where)
    if cfg.tie_embeddings:
        _check_written_head(out, where)
        out.pop("output.weight", None)
    for name, w in out.items():
        if name.endswith("attention.wq.weight"):
            out[name] = _from_hf_rows(w, cfg.n_heads)
        elif name.endswith("attention.wk.weight"):
            out[name] = _from_hf_rows(w, cfg.kv_heads)
    return out


def hf_config_dict(cfg: ModelConfig, dtype: torch.dtype = torch.float32) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.hidden_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_parameters": _rope_parameters(cfg),
        "rope_scaling": _rope_parameters(cfg) if cfg.rope_scaling else None,  # where transformers 4 reads it
        "tie_word_embeddings": cfg.tie_embeddings,
        "attention_bias": False,
        "mlp_bias": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "initializer_range": 0.02,
        "torch_dtype": str(dtype).removeprefix("torch."),
        "use_cache": True,
    }


def _rope_parameters(cfg: ModelConfig) -> dict:
    """``rope_parameters`` as transformers 5 writes it (Llama 3.1's ``rope_scaling`` keys)."""
    out: dict = {"rope_type": cfg.rope_scaling or "default", "rope_theta": cfg.rope_theta}
    if cfg.rope_scaling == "llama3":
        out.update(factor=cfg.rope_factor, low_freq_factor=cfg.rope_low_freq_factor,
                   high_freq_factor=cfg.rope_high_freq_factor,
                   original_max_position_embeddings=cfg.rope_original_max_seq_len)
    return out


def _rope_fields(data: dict, where: str) -> dict:
    """ModelConfig's RoPE fields from an HF config, read as transformers 5 reads them:
    ``rope_scaling`` (older configs) before ``rope_parameters``, the dict's ``rope_theta`` before
    the top-level one, a top-level ``original_max_position_embeddings`` before the dict's. Types
    ``default`` and ``llama3``; any other is one line."""
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    if not isinstance(rope, dict):
        raise UserError(f"{where}: rope_parameters must be an object, got {rope!r}")
    kind = rope.get("rope_type", rope.get("type", "default"))
    partial = rope.get("partial_rotary_factor", data.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise UserError(f"{where}: partial rotary embeddings (partial_rotary_factor {partial!r}) are not supported")
    fields = {"rope_theta": float(rope.get("rope_theta", data.get("rope_theta", 10000.0)))}
    if kind in ("default", None):
        return fields
    if kind != "llama3":
        raise UserError(f"{where}: RoPE scaling {kind!r} is not supported (only Llama 3.1's llama3)")
    missing = [k for k in ("factor", "low_freq_factor", "high_freq_factor") if k not in rope]
    if missing:
        raise UserError(f"{where}: llama3 RoPE scaling without {missing[0]!r}")
    original = data.get("original_max_position_embeddings", rope.get(
        "original_max_position_embeddings", data.get("max_position_embeddings", 4096)))
    return {**fields, "rope_scaling": "llama3", "rope_factor": rope["factor"],
            "rope_low_freq_factor": rope["low_freq_factor"], "rope_high_freq_factor": rope["high_freq_factor"],
            "rope_original_max_seq_len": original}


def _ffn_shape(dim: int, intermediate: int) -> tuple[int, float | None]:
    """(multiple_of, ffn_dim_multiplier) that reproduce ``intermediate`` under Meta's rule."""
    probe = ModelConfig.__new__(ModelConfig)  # unvalidated: only hidden_dim is used
    probe.dim = dim
    for multiple_of, mult in [(256, None), (256, 1.0), (4096, 1.3), (1024, None), (512, None),
                              (128, None), (64, None), (32, None), (16, None), (8, None)]:
        probe.multiple_of, probe.ffn_dim_multiplier = multiple_of, mult
        if probe.hidden_dim == intermediate:
            return multiple_of, mult
    base = int(2 * (4 * dim) / 3)
    return (intermediate, None) if base <= intermediate else (intermediate, intermediate / base)


def config_from_hf(data: dict, where: str) -> ModelConfig:
    arch = data.get("architectures") or []
    if data.get("model_type") != "llama" and "LlamaForCausalLM" not in arch:
        raise UserError(
            f"{where}: not a Llama model (model_type={data.get('model_type')!r}, architectures={arch})"
        )
    try:
        dim = data["hidden_size"]
        n_heads = data["num_attention_heads"]
        head_dim = data.get("head_dim") or dim // n_heads
        if head_dim * n_heads != dim:
            raise UserError(f"{where}: head_dim {head_dim} x {n_heads} heads != hidden_size {dim}")
        multiple_of, mult = _ffn_shape(dim, data["intermediate_size"])
        return model_config(dict(
            dim=dim, n_layers=data["num_hidden_layers"], n_heads=n_heads,
            n_kv_heads=data.get("num_key_value_heads") or n_heads, vocab_size=data["vocab_size"],
            multiple_of=multiple_of, ffn_dim_multiplier=mult, norm_eps=data.get("rms_norm_eps", 1e-5),
            max_seq_len=data.get("max_position_embeddings", 4096), **_rope_fields(data, where),
            tie_embeddings=data.get("tie_word_embeddings", False),
        ), where)
    except KeyError as e:
        raise UserError(f"{where}: missing field {e.args[0]!r}") from None
    except (TypeError, ValueError, ZeroDivisionError, AttributeError) as e:  # a field of the wrong type
        raise UserError(f"{where}: malformed Llama config ({type(e).__name__}: {e})") from None


def is_hf_dir(path: Path) -> bool:
    if model_file(path, "config.json", required=False) is None:
        return False
    try:
        data = read_model_json(path, "config.json")
    except UserError:  # not JSON: not recognised as an HF dir
        return False
    return data.get("format") != "llama-pretrain" and ("model_type" in data or "architectures" in data)


def load_hf(path: str | Path) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """Read an HF Llama directory: the weight files transformers would read (``weight_files``),
    safetensors or torch files, whose declared shapes are checked against the config before any
    tensor is read."""
    from .native import read_safetensors

    path = Path(path)
    cfg = config_from_hf(read_model_json(path, "config.json"), str(path / "config.json"))
    files = weight_files(path)
    cfg = _checked_config(path, cfg, _declared_shapes(files, backed=True))
    state: dict[str, torch.Tensor] = {}
    for f, _ in files:
        state.update(read_safetensors(f) if f.suffix == ".safetensors" else read_torch_file(f))
    return cfg, from_hf_state_dict(state, cfg, where=str(path))


def _checked_config(path: Path, cfg: ModelConfig, shapes: dict) -> ModelConfig:
    """``cfg`` of an HF Llama dir tied as ``_tied`` says, its weights' declared ``shapes`` (HF
    names) checked against it."""
    cfg, ours = _tied(cfg, _renamed(shapes, str(path)), path)
    check_shapes(cfg, ours, path)
    return cfg


def _declared_shapes(files, backed: bool) -> dict[str, tuple[int, ...]]:
    """Name -> shape over ``weight_files``, from safetensors headers and torch files' pickles (no
    tensor read), each file holding exactly the tensors its index names; ``backed``: a torch
    file's tensors must not share bytes (see ``check_backed``)."""
    from .native import safetensors_shapes

    shapes: dict[str, tuple[int, ...]] = {}
    for f, names in files:
        if f.suffix == ".safetensors":
            found = safetensors_shapes(f)
        else:
            tensors = torch_file_tensors(f)
            if backed:
                check_backed(f, tensors)
            found = {name: t.shape for name, t in tensors.items()}
        check_file_tensors(f, names, found)
        shapes.update(found)
    return shapes


def check_hf_dir(path: Path) -> None:
    """For a local directory handed to transformers: no code (``check_transformers_dir``), the weight
    files ``load_hf`` would read, well formed, and for a Llama config their shapes, all before
    transformers allocates the config's model; other architectures' shapes are transformers' to check."""
    check_transformers_dir(path)
    data = read_model_json(path, "config.json")
    llama = data.get("model_type") == "llama"
    shapes = _declared_shapes(weight_files(path), backed=llama)
    if llama:
        _checked_config(path, config_from_hf(data, str(path / "config.json")), shapes)


def save_hf(state: dict[str, torch.Tensor], cfg: ModelConfig, out: str | Path,
            tokenizer_model: str | Path | None = None, dtype: torch.dtype | None = None) -> Path:
    """Write an HF directory that ``LlamaForCausalLM.from_pretrained`` and (with a tokenizer)
    ``AutoTokenizer.from_pretrained`` load."""
    from safetensors.torch import save_file

    out = Path(out)
    hf_state = to_hf_state_dict(state, cfg)
    if dtype is not None:
        hf_state = {k: v.to(dtype) for k, v in hf_state.items()}
    sample = next(iter(hf_state.values()))
    with atomic_dir(out, OUTPUT) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in hf_state.items()},
                  str(tmp / "model.safetensors"), metadata={"format": "pt"})
        special = _special_ids(tokenizer_model)
        config = {**hf_config_dict(cfg, sample.dtype), **special}
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(special, indent=2) + "\n")
        if tokenizer_model is not None:
            write_hf_tokenizer(tokenizer_model, tmp)
    return out


def _is_our_hf_config(cfg: dict) -> bool:
    """config.json as save_hf writes it: a Llama config with no key hf_config_dict lacks."""
    return (cfg.get("architectures") == ["LlamaForCausalLM"] and cfg.get("model_type") == "llama"
            and set(cfg) <= set(hf_config_dict(ModelConfig())))


# What save_hf writes: a directory holding only these files, its config.json ours, it may replace.
OUTPUT = Owned("export-hf", frozenset({"model.safetensors", "config.json", "generation_config.json",
                                       "tokenizer.model", "tokenizer.json", "tokenizer_config.json",
                                       "special_tokens_map.json"}), "config.json", _is_our_hf_config)


def _special_ids(tokenizer_model: str | Path | None) -> dict:
    """config.json's and generation_config.json's start and end ids: a tokenizer.json's (its
    generation stop ids, one or several), else SentencePiece Llama's <s> and </s>."""
    if tokenizer_model is None or not is_hf_tokenizer(tokenizer_model):
        return {"bos_token_id": 1, "eos_token_id": 2}
    tok = Tokenizer(tokenizer_model)
    stops = tok.stop_ids
    return {"bos_token_id": tok.bos_id if tok.bos_id >= 0 else None,
            "eos_token_id": stops[0] if len(stops) == 1 else (stops or None)}


def write_hf_tokenizer(tokenizer_model: str | Path, out_dir: Path) -> None:
    """Copy a Hugging Face tokenizer's files (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json) as they are; or copy a SentencePiece model and describe it for
    ``AutoTokenizer``.

    A ``tokenizer.json`` that reproduces SentencePiece exactly is written when the ``tokenizers``
    package is present, and the config points at the generic fast tokenizer so it is loaded as
    is: transformers 5's ``LlamaTokenizer`` rebuilds its pipeline with a Metaspace pre-tokenizer
    that skips the dummy-prefix space before text that already starts with one (" hi" gives
    different ids than SentencePiece). Special-token strings in text are split like ordinary
    text, as SentencePiece does.
    """
    if is_hf_tokenizer(tokenizer_model):  # generation_config.json is save_hf's to write
        for name, src in tokenizer_files(tokenizer_model).items():
            if name != "generation_config.json":
                shutil.copyfile(src, out_dir / name)
        return
    shutil.copyfile(tokenizer_model, out_dir / "tokenizer.model")
    fast = _sentencepiece_to_tokenizers(Path(tokenizer_model))
    if fast is not None:
        fast.save(str(out_dir / "tokenizer.json"))
    tok_cfg: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast" if fast is not None else "LlamaTokenizer",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": None,
        "add_bos_token": True, "add_eos_token": False, "legacy": True,
        "add_prefix_space": None, "clean_up_tokenization_spaces": False,
        "split_special_tokens": True,
        "sp_model_kwargs": {}, "model_max_length": 1000000000000000019884624838656,
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2) + "\n")
    (out_dir / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}, indent=2) + "\n")


def _sentencepiece_to_tokenizers(model_path: Path):
    """A ``tokenizers.Tokenizer`` equal to a SentencePiece BPE model (None if not possible).

    SentencePiece BPE merges the adjacent pair whose concatenation is the highest-scored piece;
    as ranked merges that is every split (a, b) of a normal piece into two normal pieces, ordered
    by the piece's id. Text goes through SentencePiece's own normalisation for identity models:
    the dummy "▁" prefix and spaces as "▁", with no pre-tokenizer (it encodes whole lines).
    """
    try:
        from sentencepiece import sentencepiece_model_pb2 as pb
        from tokenizers import AddedToken, Tokenizer, decoders, normalizers, processors
        from tokenizers.models import BPE
    except ImportError:
        return None
    from google.protobuf.message import DecodeError

    proto = pb.ModelProto()  # type: ignore[attr-defined]  # protobuf makes the classes at import
    try:
        proto.ParseFromString(model_path.read_bytes())
    except DecodeError as e:
        raise UserError(f"{model_path}: not a SentencePiece model ({e})") from None
    bpe = pb.TrainerSpec.BPE  # type: ignore[attr-defined]  # protobuf makes the classes at import
    if proto.trainer_spec.model_type != bpe or proto.normalizer_spec.name not in ("identity", ""):
        return None  # unigram or NFKC models: leave it to transformers' own conversion
    NORMAL, UNKNOWN, CONTROL, USER = 1, 2, 3, 4
    vocab = {p.piece: i for i, p in enumerate(proto.pieces)}
    normal = {p.piece: i for i, p in enumerate(proto.pieces) if p.type == NORMAL}
    merges = []
    for piece, pid in normal.items():
        for k in range(1, len(piece)):
            a, b = piece[:k], piece[k:]
            if a in normal and b in normal:
                merges.append((pid, normal[a], normal[b], a, b))
    merges.sort()
    unk = next((p.piece for p in proto.pieces if p.type == UNKNOWN), None)
    tok = Tokenizer(BPE(vocab=vocab, merges=[(a, b) for *_, a, b in merges], unk_token=unk,
                        fuse_unk=True, byte_fallback=proto.trainer_spec.byte_fallback))
    dummy = proto.normalizer_spec.add_dummy_prefix
    tok.normalizer = normalizers.Sequence(
        ([normalizers.Prepend("▁")] if dummy else []) + [normalizers.Replace(" ", "▁")])
    tok.pre_tokenizer = None
    tok.decoder = decoders.Sequence(
        [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
        + ([decoders.Strip(content=" ", left=1, right=0)] if dummy else []))
    tok.add_special_tokens([AddedToken(p.piece, special=True, normalized=False)
                            for p in proto.pieces if p.type in (UNKNOWN, CONTROL)])
    tok.add_tokens([AddedToken(p.piece, special=False, normalized=False)
                    for p in proto.pieces if p.type == USER])
    bos_id, bos = proto.trainer_spec.bos_id, proto.trainer_spec.bos_piece
    if bos_id >= 0:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos}:0 $A:0", pair=f"{bos}:0 $A:0 {bos}:1 $B:1", special_tokens=[(bos, bos_id)])
    return tok

"""`llama-pretrain import-hf` / `export-hf`: lossless conversion to and from Hugging Face;
`export-gguf`: a GGUF file for llama.cpp."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..devices import DTYPE_CHOICES



def register(sub: argparse._SubParsersAction) -> None:
    imp = sub.add_parser("import-hf", help="convert a Hugging Face Llama dir to a llama-pretrain checkpoint",
                         description="Reads config.json + safetensors (or pytorch_model*.bin), undoes HF's "
                                     "q/k RoPE permutation, and writes model.safetensors + config.json "
                                     "(+ its tokenizer: tokenizer.model, or tokenizer.json with its "
                                     "config files). Meta-layout dirs "
                                     "(params.json + consolidated.*.pth) are accepted too.")
    imp.add_argument("hf_dir")
    imp.add_argument("--out", required=True, help="checkpoint dir to write")
    imp.add_argument("--force", action="store_true", help="replace --out if it exists")
    imp.set_defaults(func=run_import)

    exp = sub.add_parser("export-hf", help="convert a checkpoint to a Hugging Face Llama dir",
                         description="Writes model.safetensors + config.json that "
                                     "transformers.LlamaForCausalLM.from_pretrained loads, and the "
                                     "tokenizer when the checkpoint has one (tokenizer.model + "
                                     "tokenizer_config.json, or a tokenizer.json with its config "
                                     "files as they are).")
    exp.add_argument("ckpt_dir", help="llama-pretrain checkpoint dir (or a Meta / HF dir)")
    exp.add_argument("--out", required=True, help="HF dir to write")
    exp.add_argument("--dtype", choices=DTYPE_CHOICES, metavar="{fp32,bf16,fp16}",
                     help="cast weights (default: keep)")
    exp.add_argument("--tokenizer", help="SentencePiece .model or tokenizer.json to include "
                                         "(default: the checkpoint's)")
    exp.add_argument("--force", action="store_true", help="replace --out if it exists")
    exp.set_defaults(func=run_export)

    gg = sub.add_parser("export-gguf", help="convert a checkpoint to a GGUF file for llama.cpp / Ollama",
                        description="Writes one GGUF file (llama.cpp's `llama` architecture: its "
                                    "hyperparameters, a SentencePiece vocabulary as its `llama` "
                                    "tokenizer or a byte-level BPE tokenizer.json as its `gpt2` one, "
                                    "its tensor names) through the gguf package. Norms stay "
                                    "f32 in every --dtype.")
    gg.add_argument("ckpt_dir", help="llama-pretrain checkpoint dir (or a Meta / HF dir)")
    gg.add_argument("--out", required=True, help="the .gguf file to write")
    gg.add_argument("--dtype", choices=["f32", "f16", "bf16", "q8_0"], default="f32",
                    help="tensor type of the weight matrices (default f32)")
    gg.add_argument("--tokenizer", help="SentencePiece .model or tokenizer.json to include "
                                        "(default: the checkpoint's)")
    gg.add_argument("--force", action="store_true", help="replace --out if it exists")
    gg.set_defaults(func=run_export_gguf)


def check_out(out: str, force: bool, fmt: str = "native") -> Path:
    """``--out`` for a checkpoint (``fmt`` native) or HF dir, refused before any work unless it is
    new, empty, or (with ``force``) exactly that format's earlier output."""
    from ..fsutil import check_output_dir
    from ..interop import hf, native

    owned = native.OUTPUT if fmt == "native" else hf.OUTPUT
    return check_output_dir(out, owned.foreign, owned.what, force=force)


def run_import(args) -> int:
    from ..interop import find_tokenizer, load_checkpoint, save_native

    out = check_out(args.out, args.force)
    cfg, state, fmt = load_checkpoint(args.hf_dir)
    save_native(state, cfg, out, tokenizer_model=find_tokenizer(args.hf_dir),
                extra={"source": {"format": fmt, "path": str(Path(args.hf_dir).resolve())}})
    print(f"wrote {out} ({fmt} -> llama-pretrain, {sum(t.numel() for t in state.values()):,} parameters)")
    return 0


def run_export(args) -> int:
    from ..devices import parse_dtype
    from ..interop import find_tokenizer, load_checkpoint, save_hf

    out = check_out(args.out, args.force, "hf")
    cfg, state, _ = load_checkpoint(args.ckpt_dir)
    if args.tokenizer:  # check it before anything is written
        from ..errors import UserError
        from ..tokenizer import Tokenizer

        n = Tokenizer(args.tokenizer).vocab_size
        if n != cfg.vocab_size:
            raise UserError(f"--tokenizer {args.tokenizer} has {n} pieces but the model's vocab_size is "
                            f"{cfg.vocab_size}")
    tok = args.tokenizer or find_tokenizer(args.ckpt_dir)
    save_hf(state, cfg, out, tokenizer_model=tok, dtype=parse_dtype(args.dtype))
    print(f"wrote {out} (Hugging Face LlamaForCausalLM{', with tokenizer' if tok else ''})")
    return 0


def run_export_gguf(args) -> int:
    from ..errors import UserError
    from ..interop import find_tokenizer, load_checkpoint
    from ..interop.gguf import save_gguf

    out = Path(args.out)
    if out.is_dir():
        raise UserError(f"--out {out} is a directory; give the .gguf file to write")
    if out.exists() and not args.force:
        raise UserError(f"{out} already exists; pass --force to replace it")
    cfg, state, _ = load_checkpoint(args.ckpt_dir)
    tok = args.tokenizer or find_tokenizer(args.ckpt_dir)
    if tok is None:
        raise UserError(f"{args.ckpt_dir} has no tokenizer.model or tokenizer.json and llama.cpp needs "
                        "the vocabulary; pass --tokenizer PATH")
    save_gguf(state, cfg, out, Path(tok), dtype=args.dtype, name=Path(args.ckpt_dir).resolve().name)
    print(f"wrote {out} (GGUF, llama, {args.dtype}, {sum(t.numel() for t in state.values()):,} parameters)")
    return 0

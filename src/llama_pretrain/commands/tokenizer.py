"""`llama-pretrain tokenizer train|encode|decode`: Llama's SentencePiece BPE tokenizer."""

from __future__ import annotations

import argparse
import sys

# SentencePiece trainer / normalizer options accepted as `--name VALUE` (name as in trainer_spec,
# with - or _). Listed here rather than read from sentencepiece's protobuf so `--help` imports
# nothing heavy; tests/test_tokenizer_cli.py checks the list against the protobuf descriptor.
SPEC_OPTIONS: dict[str, type] = {
    "model_type": str, "character_coverage": float, "shuffle_input_sentence": bool,
    "seed_sentencepiece_size": int, "shrinking_factor": float, "max_sentence_length": int,
    "num_threads": int, "num_sub_iterations": int, "max_sentencepiece_length": int,
    "split_by_unicode_script": bool, "split_by_number": bool, "split_by_whitespace": bool,
    "treat_whitespace_as_suffix": bool, "allow_whitespace_only_pieces": bool, "split_digits": bool,
    "pretokenization_delimiter": str, "control_symbols": str, "user_defined_symbols": str,
    "required_chars": str, "byte_fallback": bool, "vocabulary_output_piece_score": bool,
    "hard_vocab_limit": bool, "use_all_vocab": bool, "unk_id": int, "bos_id": int, "eos_id": int,
    "pad_id": int, "unk_piece": str, "bos_piece": str, "eos_piece": str, "pad_piece": str,
    "unk_surface": str, "seed_sentencepieces_file": str, "auto_character_coverage": bool,
    "accept_language": str, "self_test_sample_size": int, "mining_sentence_size": int,
    "training_sentence_size": int, "train_extremely_large_corpus": bool,
    "enable_differential_privacy": bool, "differential_privacy_noise_level": float,
    "differential_privacy_clipping_threshold": int,
    # normalizer_spec
    "normalization_rule_name": str, "normalization_rule_tsv": str, "add_dummy_prefix": bool,
    "remove_extra_whitespaces": bool,
}


def _bool(value: str) -> bool:
    v = value.strip().lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, got {value!r}")


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("tokenizer", help="train and use Llama's SentencePiece BPE tokenizer",
                       description="Train a SentencePiece BPE tokenizer with Llama 2's exact settings, "
                                   "or encode/decode with any SentencePiece .model (Meta's included).")
    tsub = p.add_subparsers(dest="tokenizer_command", metavar="SUBCOMMAND", required=True)

    t = tsub.add_parser(
        "train", help="train a tokenizer on text files, JSONL, Parquet or a data config",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Train SentencePiece BPE with Llama 2's trainer_spec and normalizer_spec: digits "
                    "split, byte fallback, identity normalisation, whitespace kept, character "
                    "coverage 0.99995, ids <unk>=0 <s>=1 </s>=2, no pad piece. Documents are split "
                    "into lines and up to --input-sentences lines are reservoir-sampled (memory "
                    "bounded, deterministic for --seed). Writes FILE.model and FILE.json (spec, "
                    "input summary, sha256).",
        epilog="Any SentencePiece trainer option can be overridden, e.g. --character-coverage 1.0 "
               "--split-digits false --user-defined-symbols '<tab>,<code>'.\n"
               "Options: " + ", ".join("--" + k.replace("_", "-") for k in SPEC_OPTIONS))
    t.add_argument("--input", nargs="+", action="extend", default=[], metavar="PATH",
                   help="text files, directories, .jsonl/.jsonl.gz (--text-field) or .parquet; globs ok")
    t.add_argument("--data-config", metavar="FILE.toml",
                   help="train on the sources of a data-pipeline config (source weights are ignored: "
                        "every source's lines go into one sample)")
    t.add_argument("--text-field", default="text", help="JSONL/Parquet field holding the text (default: text)")
    t.add_argument("--vocab-size", type=int, required=True, help="vocabulary size (Llama 2: 32000)")
    t.add_argument("--out", required=True, metavar="FILE.model", help="output model path")
    t.add_argument("--input-sentences", type=int, default=None, metavar="N",
                   help="lines sampled from the corpus for training (default: 5,000,000)")
    t.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    spec = t.add_argument_group("SentencePiece trainer options (default: Llama 2's)")
    for name, typ in SPEC_OPTIONS.items():
        flags = ["--" + name.replace("_", "-")] + (["--" + name] if "_" in name else [])
        spec.add_argument(*flags, dest=f"spec_{name}", type=_bool if typ is bool else typ,
                          default=None, metavar="BOOL" if typ is bool else typ.__name__.upper(),
                          help=argparse.SUPPRESS)
    t.set_defaults(func=run_train)

    e = tsub.add_parser("encode", help="print the token ids of a text",
                        description="Encode TEXT (or standard input when TEXT is omitted) and print "
                                    "the ids, space-separated.")
    e.add_argument("--model", required=True, metavar="FILE", help="SentencePiece .model or tokenizer.json")
    e.add_argument("text", nargs="?", metavar="TEXT", help="text to encode (default: read stdin)")
    e.add_argument("--no-bos", action="store_true",
                   help="no start token (default: as the tokenizer adds it; SentencePiece: <s>)")
    e.add_argument("--eos", action="store_true", help="append the end token (</s>)")
    e.add_argument("--pieces", action="store_true", help="print the pieces next to the ids")
    e.set_defaults(func=run_encode)

    d = tsub.add_parser("decode", help="print the text of token ids",
                        description="Decode ids (separated by spaces or commas) back to text.")
    d.add_argument("--model", required=True, metavar="FILE", help="SentencePiece .model or tokenizer.json")
    d.add_argument("ids", nargs="*", metavar="ID", help="token ids (default: read stdin)")
    d.set_defaults(func=run_decode)


def _parse_ids(words: list[str]) -> list[int]:
    from ..errors import UserError

    ids = []
    for w in words:
        for part in w.replace(",", " ").replace("[", " ").replace("]", " ").split():
            try:
                ids.append(int(part))
            except ValueError:
                raise UserError(f"not a token id: {part!r}") from None
    return ids


def _documents(sources, skipped: dict):
    """Texts of every source via the data pipeline's readers; an unreadable or corrupt file is an error,
    other bad records (invalid UTF-8, missing field, ...) are counted in ``skipped``."""
    from ..data.sources import expand_paths, iter_records
    from ..errors import UserError

    for src in sources:
        for path in expand_paths(src.paths):
            for rec in iter_records(path, src.text_field, src.url_field):
                if rec.error is None:
                    yield rec.text
                elif rec.error in ("unreadable_file", "corrupt_file"):
                    raise UserError(f"cannot read {rec.loc}: {rec.error.replace('_', ' ')}")
                else:
                    skipped[rec.error] = skipped.get(rec.error, 0) + 1


def run_train(args) -> int:
    from ..data.sources import SourceConfig, expand_paths, load_data_config
    from ..errors import UserError
    from ..tokenizer import DEFAULT_INPUT_SENTENCES, Tokenizer, train_tokenizer

    sources = []
    if args.input:
        sources.append(SourceConfig(name="input", paths=list(args.input), text_field=args.text_field))
    if args.data_config:
        sources.extend(load_data_config(args.data_config).sources)
    if not sources:
        raise UserError("give --input PATH... and/or --data-config FILE.toml")
    skipped: dict[str, int] = {}
    summary: dict = {"sources": [], "skipped_records": skipped}
    for src in sources:
        files = expand_paths(src.paths)  # a missing path fails here, before any reading
        summary["sources"].append({"name": src.name, "paths": [str(p) for p in src.paths],
                                   "files": len(files), "text_field": src.text_field})
    if args.data_config:
        summary["data_config"] = str(args.data_config)

    overrides = {name: getattr(args, f"spec_{name}") for name in SPEC_OPTIONS
                 if getattr(args, f"spec_{name}") is not None}
    num_threads = overrides.pop("num_threads", None)
    out = train_tokenizer(
        _documents(sources, skipped), args.out, args.vocab_size,
        input_sentences=args.input_sentences or DEFAULT_INPUT_SENTENCES, seed=args.seed,
        num_threads=num_threads, progress=not args.no_progress, input_summary=summary, **overrides)
    tok = Tokenizer(out)
    print(f"wrote {out} (vocab {tok.vocab_size}, sha256 {tok.sha256[:16]}) and {out.with_suffix('.json')}")
    return 0


def _stdin_text() -> str:
    """Standard input as UTF-8; invalid bytes are a one-line error, not a decoding traceback."""
    from ..errors import UserError

    data = sys.stdin.buffer.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"standard input is not valid UTF-8: byte 0x{data[e.start]:02X} "
                        f"at offset {e.start}") from None


def run_encode(args) -> int:
    from ..tokenizer import Tokenizer, check_text

    if args.text is not None:
        check_text(args.text, "TEXT")
    tok = Tokenizer(args.model)
    text = args.text if args.text is not None else _stdin_text()
    ids = tok.encode(text, bos=False if args.no_bos else None, eos=True if args.eos else None)
    if args.pieces:
        for i in ids:
            print(f"{i}\t{tok.id_to_piece(i)}")
    else:
        print(" ".join(map(str, ids)))
    return 0


def run_decode(args) -> int:
    from ..tokenizer import Tokenizer

    tok = Tokenizer(args.model)
    ids = _parse_ids(args.ids if args.ids else _stdin_text().split())
    sys.stdout.write(tok.decode(ids) + "\n")
    return 0

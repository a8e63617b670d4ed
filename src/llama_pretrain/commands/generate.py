"""`llama-pretrain generate MODEL --prompt TEXT`: sample a continuation with the KV cache."""

from __future__ import annotations

import argparse
import os


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("generate", help="continue a prompt with a trained model",
                       description="Greedy decoding by default; --temperature > 0 samples, --top-p "
                                   "restricts sampling to the nucleus. The same --seed gives the same text.")
    p.add_argument("model", help="checkpoint dir (llama-pretrain, Hugging Face or Meta layout)")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--tokenizer", help="SentencePiece .model or Hugging Face tokenizer.json "
                                       "(default: MODEL/tokenizer.model, else MODEL/tokenizer.json)")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (default 1.0 = off)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..devices import resolve_device
    from ..errors import UserError
    from ..generate import generate
    from ..interop import find_tokenizer, load_model
    from ..tokenizer import Tokenizer, check_text

    check_text(args.prompt, "--prompt")
    if args.max_new_tokens < 1:
        raise UserError("--max-new-tokens must be at least 1")
    if args.temperature < 0:
        raise UserError("--temperature must be >= 0")
    if not 0 < args.top_p <= 1:
        raise UserError("--top-p must be in (0, 1]")
    if not os.path.lexists(args.model):  # before the tokenizer, whose absence would be the wrong reason
        raise UserError(f"{args.model}: no such checkpoint (the path does not exist)")
    tok_path = args.tokenizer or find_tokenizer(args.model)
    if tok_path is None:
        raise UserError(f"{args.model}: no tokenizer.model or tokenizer.json in the checkpoint; "
                        "pass --tokenizer FILE")
    tokenizer = Tokenizer(tok_path)
    device = resolve_device(args.device)
    model = load_model(args.model, device=device)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise UserError(f"tokenizer has {tokenizer.vocab_size} pieces but the model's vocab_size is "
                        f"{model.config.vocab_size}")
    n_prompt = len(tokenizer.encode(args.prompt, eos=False))
    if n_prompt == 0:
        raise UserError("--prompt is empty and the tokenizer adds no start token: give some text")
    if n_prompt >= model.config.max_seq_len:
        raise UserError(f"the prompt is {n_prompt} tokens; the model's context is {model.config.max_seq_len}, "
                        f"which leaves no room to generate")
    text = generate(model, tokenizer, args.prompt, max_new_tokens=args.max_new_tokens,
                    temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    print(args.prompt + text)
    return 0

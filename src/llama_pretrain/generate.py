"""Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling.

The prompt is processed in one forward pass that fills the cache; each new token then costs one
single-position forward pass. Sampling draws from a ``torch.Generator`` seeded by the caller, so a
given seed always gives the same text.
"""

from __future__ import annotations

import torch

from .model import Transformer


def sample_next(logits: torch.Tensor, temperature: float, top_p: float,
                generator: torch.Generator | None) -> torch.Tensor:
    """Next token ids [B] from the last-position logits [B, V]."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = probs.sort(dim=-1, descending=True)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
        sorted_probs = sorted_probs.masked_fill(outside, 0.0)
        choice = torch.multinomial(sorted_probs.cpu(), 1, generator=generator).to(order.device)
        return order.gather(-1, choice).squeeze(-1)
    return torch.multinomial(probs.cpu(), 1, generator=generator).squeeze(-1).to(logits.device)


@torch.inference_mode()
def generate_ids(model: Transformer, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | None = None,
                 use_cache: bool = True) -> list[int]:
    """Token ids that continue ``prompt`` (the prompt itself is not included).

    Stops after ``max_new_tokens``, at ``eos_id`` (not included), or at the model's context.
    ``use_cache=False`` recomputes the whole sequence each step (the reference the cache is tested
    against).
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    device = model.output.weight.device
    max_len = model.config.max_seq_len
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the {max_len}-token context")
    budget = min(max_new_tokens, max_len - len(prompt))
    generator = None
    if seed is not None:
        generator = torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=device)
    out: list[int] = []
    if use_cache:
        model.setup_cache(batch=1, max_len=len(prompt) + budget)
    try:
        logits = model(tokens)[:, -1]
        pos = len(prompt)
        for _ in range(budget):
            nxt = sample_next(logits, temperature, top_p, generator)
            tok = int(nxt.item())
            if eos_id is not None and tok == eos_id:
                break
            out.append(tok)
            if len(out) == budget:
                break
            if use_cache:
                logits = model(nxt.view(1, 1), start_pos=pos)[:, -1]
            else:
                tokens = torch.cat([tokens, nxt.view(1, 1)], dim=1)
                logits = model(tokens)[:, -1]
            pos += 1
    finally:
        if use_cache:
            model.clear_cache()
    return out


def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> str:
    """Text continuing ``prompt``: encoded with BOS, decoded without the prompt; stops at EOS."""
    ids = tokenizer.encode(prompt, bos=True, eos=False)
    new = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, eos_id=tokenizer.eos_id)
    # Decode prompt + continuation together so a word split across the boundary keeps its spacing.
    full = tokenizer.decode(ids + new)
    head = tokenizer.decode(ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)

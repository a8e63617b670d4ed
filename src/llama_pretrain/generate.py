"""Autoregressive decoding with a KV cache: greedy, temperature and nucleus (top-p) sampling.

``decode`` is the one decoding loop, for ``generate`` here and the evaluation harness: the prompt
is processed in one forward pass that fills the cache; each new token then costs one
single-position forward pass. It drives any model through a step function, so the harness runs it
over our ``Transformer`` and over transformers' models alike. Sampling draws from a
``torch.Generator`` seeded by the caller, so a given seed always gives the same text.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Optional, Sequence

import torch

from .model import Transformer

# step(new tokens [B, T], mask [B, columns] or None, cache or None at the first call)
#   -> (logits [B, T or 1, vocab], cache to pass to the next call)
Step = Callable[[torch.Tensor, Optional[torch.Tensor], Any], tuple[torch.Tensor, Any]]


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
def decode(step: Step, tokens: torch.Tensor, mask: torch.Tensor | None, budgets: Sequence[int], *,
           temperature: float = 0.0, top_p: float = 1.0, generator: torch.Generator | None = None,
           eos_id: int | Collection[int] | None = None,
           stop: Callable[[int, list[int]], bool] | None = None) -> list[list[int]]:
    """New token ids for each row of the prompts ``tokens`` [B, T] (prompts not included).

    ``mask`` marks the real tokens of left-padded prompts (None: no padding) and gains a column per
    step. Row r stops after ``budgets[r]`` tokens, at ``eos_id`` (one id or several, e.g.
    generation_config.json's; not included) or once ``stop(r, its ids)`` is true; rows that stop
    early ride along until every row has.
    """
    stops = {eos_id} if isinstance(eos_id, int) else set(eos_id or ())
    B = tokens.shape[0]
    new: list[list[int]] = [[] for _ in range(B)]
    done = [b <= 0 for b in budgets]
    if all(done):
        return new
    logits, cache = step(tokens, mask, None)
    while True:
        nxt = sample_next(logits[:, -1], temperature, top_p, generator)
        for r, t in enumerate(nxt.tolist()):
            if done[r]:
                continue
            if t in stops:
                done[r] = True
                continue
            new[r].append(t)
            done[r] = len(new[r]) >= budgets[r] or (stop is not None and stop(r, new[r]))
        if all(done):
            return new
        if mask is not None:
            mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        logits, cache = step(nxt[:, None], mask, cache)


def cached_step(model: Transformer, max_len: int) -> Step:
    """A ``decode`` step over unpadded prompts with our KV cache, allocated once for ``max_len`` columns."""
    def step(tokens, mask, cache):
        if cache is None:
            cache = model.new_cache(tokens.shape[0], max_len)
        return model(tokens, cache=cache, last_only=True), cache
    return step


def recompute_step(model: Transformer) -> Step:
    """A ``decode`` step without a cache: the whole sequence again each time (the cache's reference)."""
    def step(tokens, mask, seen):
        seen = tokens if seen is None else torch.cat([seen, tokens], dim=1)
        return model(seen, last_only=True), seen
    return step


def generate_ids(model: Transformer, prompt: list[int], max_new_tokens: int = 64, temperature: float = 0.0,
                 top_p: float = 1.0, seed: int | None = None, eos_id: int | Collection[int] | None = None,
                 use_cache: bool = True) -> list[int]:
    """Token ids that continue ``prompt`` (the prompt itself is not included).

    Stops after ``max_new_tokens``, at ``eos_id`` (not included), or at the model's context.
    ``use_cache=False`` recomputes the whole sequence each step (the reference the cache is tested
    against).
    """
    if not prompt:
        raise ValueError("the prompt must hold at least one token (e.g. BOS)")
    max_len = model.config.max_seq_len
    if len(prompt) >= max_len:
        raise ValueError(f"prompt of {len(prompt)} tokens leaves no room in the {max_len}-token context")
    budget = min(max_new_tokens, max_len - len(prompt))
    generator = None if seed is None else torch.Generator().manual_seed(seed)
    tokens = torch.tensor([prompt], dtype=torch.long, device=model.output.weight.device)
    step = cached_step(model, len(prompt) + budget) if use_cache else recompute_step(model)
    return decode(step, tokens, None, [budget], temperature=temperature, top_p=top_p, generator=generator,
                  eos_id=eos_id)[0]


def generate(model: Transformer, tokenizer, prompt: str, max_new_tokens: int = 64, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None) -> str:
    """Text continuing ``prompt``: encoded as the tokenizer encodes it (with BOS where it adds one),
    decoded without the prompt; stops at the tokenizer's ``stop_ids``."""
    ids = tokenizer.encode(prompt, eos=False)
    new = generate_ids(model, ids, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                       seed=seed, eos_id=tokenizer.stop_ids)
    # Decode prompt + continuation together so a word split across the boundary keeps its spacing.
    full = tokenizer.decode(ids + new)
    head = tokenizer.decode(ids)
    return full[len(head):] if full.startswith(head) else tokenizer.decode(new)

"""The harness core: what every benchmark asks of a model, over one backend interface.

Three requests, as in lm-evaluation-harness:

- ``loglikelihood([(context, continuation), ...])`` -> ``[(log p(continuation | context), greedy)]``.
  A backend with ``packed_hidden`` (the native one) gets the requests as one token tree packed
  into rows (``packing``): every token that requests share runs once. Otherwise requests that
  share a context (the choices of one question) run the context once: a batch of distinct
  contexts is prefilled, its key/value cache is repeated once per continuation, and the
  continuations are scored in one extension step.
- ``loglikelihood_rolling([text, ...])`` -> total log-likelihood of each text (perplexity), in
  windows of the model's context length, each token predicted exactly once.
- ``generate([(context, until, max_new_tokens), ...])`` -> greedy continuations cut at the first
  stop sequence, in left-padded batches, decoded by ``generate.decode`` (the loop ``generate`` uses).

A backend is anything with ``forward(tokens, mask, cache) -> (logits, cache)``, ``select(cache,
rows)`` and ``max_length``: ``tokens`` [B, T] are new tokens, ``mask`` [B, past + T] marks real
(non-pad) positions so positions and attention follow from it. ``NativeBackend`` runs our
``Transformer``'s own forward and KV cache; ``HFBackend`` any ``transformers`` causal LM.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence, TypeVar

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

# --------------------------------------------------------------------------------------------
# backends


def _positions(mask: torch.Tensor, new: int) -> torch.Tensor:
    """Position ids of the last ``new`` columns: the count of real tokens before each one."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -new:]


class NativeBackend:
    """Our ``Transformer``: per-row positions and the padding mask go into its forward and its cache."""

    def __init__(self, model):
        self.model = model.eval()
        self.max_length = model.config.max_seq_len
        self.device = model.output.weight.device
        self.name = "llama-pretrain"

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cache=None, last_only: bool = False):
        if cache is None:  # grown per call: how many columns a request ends with is not known here
            cache = self.model.new_cache(tokens.shape[0])
        logits = self.model(tokens, positions=_positions(mask, tokens.shape[1]), mask=mask, cache=cache,
                            last_only=last_only)
        return logits, cache

    @staticmethod
    def select(cache, rows: torch.Tensor):
        return cache.select(rows)

    @torch.no_grad()
    def packed_hidden(self, tokens: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Final-normed hidden states [B, T, dim] of rows whose attention ``mask`` [B, 1, T, T] is
        given whole (a context and several continuations that each see it but not one another)."""
        m = self.model
        top = int(positions.max()) + 1
        if top > m.rope_cos.shape[0]:
            m.init_rope(top)
        cos, sin = m.rope_cos[positions], m.rope_sin[positions]
        h = m.tok_embeddings(tokens)
        for layer in m.layers.values():
            h = layer(h, cos, sin, mask, None)
        return m.norm(h)

    @torch.no_grad()
    def head(self, h: torch.Tensor) -> torch.Tensor:
        return self.model.output(h)


class HFBackend:
    """Any ``transformers`` causal LM (``AutoModelForCausalLM``), with its own cache object."""

    def __init__(self, model, max_length: int | None = None):
        self.model = model.eval()
        cfg = model.config
        self.max_length = max_length or next(
            (getattr(cfg, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len",
                                       "seq_length") if getattr(cfg, k, None)), 2048)
        self.device = next(model.parameters()).device
        self.name = "hf"
        import inspect
        # transformers >= 5.2x renamed the cache argument from past_key_values to cache.
        params = inspect.signature(model.forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self._keep_arg = next((k for k in ("logits_to_keep", "num_logits_to_keep") if k in params), None)

    @torch.no_grad()
    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, cache=None, last_only: bool = False):
        extra = {self._keep_arg: 1} if last_only and self._keep_arg else {}
        out = self.model(input_ids=tokens, attention_mask=mask.long(),
                         position_ids=_positions(mask, tokens.shape[1]),
                         use_cache=True, **{self._cache_arg: cache}, **extra)
        return out.logits, getattr(out, self._cache_arg)

    @staticmethod
    def select(cache, rows: torch.Tensor):
        if hasattr(cache, "batch_select_indices"):
            cache.batch_select_indices(rows)  # in place; repeated rows are allowed
            return cache
        return tuple(tuple(t[rows] for t in layer) for layer in cache)  # legacy tuple caches


# --------------------------------------------------------------------------------------------
# requests


@dataclass
class GenRequest:
    context: str
    until: Sequence[str] = ("\n",)
    max_new_tokens: int = 128


_T = TypeVar("_T")
BOS_CHOICES = ("auto", "always", "never")


def _answered(results: list[_T | None]) -> list[_T]:
    """``results`` once every request has its answer."""
    done = [r for r in results if r is not None]
    if len(done) < len(results):  # never: every request is in exactly one batch
        raise RuntimeError("a request got no answer")
    return done


class CausalLM:
    """Scores text with a backend and a tokenizer (see the module docstring).

    ``batch_size`` bounds the rows of every forward pass (continuations in the log-likelihood
    extension step, prompts in generation). A BOS token starts every sequence where the tokenizer
    itself adds one (``add_bos``: Llama's SentencePiece, Llama 3's tokenizer.json; not SmolLM2's),
    as lm-evaluation-harness does; an empty context is then its BOS, else its EOS. ``bos``
    "always" or "never" overrides the tokenizer's choice (lm-eval's ``add_bos_token``).
    """

    def __init__(self, backend, tokenizer, batch_size: int = 16, progress: bool = False, bos: str = "auto"):
        from ..errors import UserError

        if bos not in BOS_CHOICES:
            raise UserError(f"--bos {bos!r}: choose {', '.join(BOS_CHOICES)}")
        if bos == "always" and tokenizer.bos_id is None:
            raise UserError("--bos always: the tokenizer has no start (BOS) token")
        self.bos = bos
        self.backend = backend
        self.tok = tokenizer
        self.batch_size = max(1, int(batch_size))
        self.progress = progress
        self.max_length = backend.max_length
        self.device = backend.device
        self.pad_id = tokenizer.eos_id if tokenizer.eos_id is not None else 0

    def _adds_bos(self) -> bool:
        if self.bos != "auto":
            return self.bos == "always"
        return getattr(self.tok, "add_bos", True) and self.tok.bos_id is not None

    @property
    def start_token(self) -> int | None:
        """The id that starts every request, None where requests start with the text itself."""
        return self.tok.bos_id if self._adds_bos() else None

    def _start_id(self) -> int:
        """lm-eval's ``prefix_token_id``: what an empty context is (BOS, else EOS)."""
        return self.tok.bos_id if self.tok.bos_id is not None else self.pad_id

    def _prefix(self, ids: list[int]) -> list[int]:
        """``ids`` after BOS where the tokenizer adds one and they do not start with it (never
        twice); an empty context is ``_start_id`` alone."""
        if self._adds_bos() and ids[:1] != [self.tok.bos_id]:
            ids = [self.tok.bos_id] + ids
        return ids or [self._start_id()]

    def _bar(self, total: int, desc: str):
        return tqdm(total=total, desc=desc, disable=not self.progress, leave=False, unit="req")

    # -- tokenisation as lm-evaluation-harness does it ----------------------------------------
    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids; trailing spaces of the context move to the continuation,
        and the split is taken from the joint encoding so the tokens are what the model would see."""
        n = len(context) - len(context.rstrip())
        if n:
            context, continuation = context[:-n], context[-n:] + continuation
        whole = self.tok.encode(context + continuation)
        ctx = self.tok.encode(context) if context else []
        cont = whole[len(ctx):]
        if not cont:  # the joint encoding swallowed the continuation into the context
            cont = self.tok.encode(continuation)
            ctx = whole[:len(whole) - len(cont)] if whole[len(whole) - len(cont):] == cont else ctx
        return self._prefix(ctx), cont

    # -- log-likelihood ----------------------------------------------------------------------
    def loglikelihood(self, requests: Sequence[tuple[str, str]]) -> list[tuple[float, bool]]:
        pairs = [self.encode_pair(c, x) for c, x in requests]
        return self.loglikelihood_tokens(pairs)

    def loglikelihood_tokens(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        contexts = [tuple(self._truncate(i, ctx, cont)) for i, (ctx, cont) in enumerate(pairs)]
        if hasattr(self.backend, "packed_hidden"):
            return self._loglikelihood_packed(contexts, pairs)
        groups: dict[tuple, list[int]] = {}
        for i, key in enumerate(contexts):
            groups.setdefault(key, []).append(i)
        # A context's requests, shortest continuation first, in chunks of at most batch_size rows:
        # every forward pass stays within the cap however many requests share one context.
        chunks: list[tuple[tuple, list[int]]] = []
        for key, members in groups.items():
            members = sorted(members, key=lambda i: len(pairs[i][1]))
            chunks += [(key, members[s:s + self.batch_size]) for s in range(0, len(members), self.batch_size)]
        # Longest first (memory peaks early), sorted by what holds most of the tokens (contexts, or
        # continuations as in PIQA's long solutions), so the padding that dominates stays small.
        by_context = sum(len(key) for key, _ in chunks) >= sum(len(c) for _, c in pairs)

        def longest_first(chunk: tuple[tuple, list[int]]) -> tuple[int, int]:
            ctx, cont = len(chunk[0]), len(pairs[chunk[1][-1]][1])  # a chunk's last is its longest
            return (-ctx, -cont) if by_context else (-cont, -ctx)

        chunks.sort(key=longest_first)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = self._bar(len(pairs), "loglikelihood")
        batch: list[tuple[tuple, list[int]]] = []
        rows = 0
        for item in chunks:
            if batch and rows + len(item[1]) > self.batch_size:
                self._score_groups(batch, pairs, results)
                bar.update(rows)
                batch, rows = [], 0
            batch.append(item)
            rows += len(item[1])
        if batch:
            self._score_groups(batch, pairs, results)
            bar.update(rows)
        bar.close()
        return _answered(results)

    def _loglikelihood_packed(self, contexts: list[tuple], pairs) -> list[tuple[float, bool]]:
        """The requests as one token tree (``packing``): no token that requests share runs twice
        (a question's context, continuations' common first tokens, questions' common opening),
        and no cache is copied. Rows hold about ``PACK_TOKENS`` tokens; a forward pass at most
        ``batch_size`` of them."""
        from . import packing

        rows = packing.pack(contexts, [cont for _, cont in pairs], PACK_TOKENS)
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        bar = self._bar(len(pairs), "loglikelihood")
        for run in packing.batches(rows, self.batch_size, PACK_TOKENS):
            b = packing.batch(run, self.pad_id)
            self._score_packed(b, results)
            bar.update(len(b.spans))
        bar.close()
        return _answered(results)

    def _score_packed(self, b, results) -> None:
        dev = self.device
        b.end = b.end.to(dev)
        h = self.backend.packed_hidden(b.tokens.to(dev), b.positions.to(dev), b.mask())
        h = h.flatten(0, 1)[b.nodes.to(dev)]  # only the tokens that predict a scored one
        node_of, targets = b.node_of.to(dev), b.targets.to(dev)
        lp = torch.empty(len(targets), device=dev)
        hit = torch.empty(len(targets), dtype=torch.bool, device=dev)
        for a in range(0, h.shape[0], HEAD_CHUNK):  # bounded logits, however many continuations
            logp = F.log_softmax(self.backend.head(h[a:a + HEAD_CHUNK]).float(), dim=-1)
            sel = (node_of >= a) & (node_of < a + HEAD_CHUNK)
            rows, t = node_of[sel] - a, targets[sel]
            lp[sel] = logp[rows, t]
            hit[sel] = logp.argmax(-1)[rows] == t
        for i, a, e in b.spans:
            results[i] = (lp[a:e].sum().item(), bool(hit[a:e].all().item()))

    def _truncate(self, i: int, ctx: list[int], cont: list[int]) -> list[int]:
        """The context as lm-eval keeps it: the scored sequence ``ctx + cont[:-1]`` cut from the
        left to the model's length, the continuation whole (refused when it alone is too long)."""
        from ..errors import UserError

        if not cont:
            raise ValueError(f"request {i} has an empty continuation")
        L = self.max_length
        if len(cont) > L:
            raise UserError(f"a continuation of {len(cont)} tokens is longer than the model's context "
                            f"({L} tokens): it cannot be scored")
        keep = L + 1 - len(cont)
        return list(ctx[-keep:]) if len(ctx) > keep else list(ctx)

    def _score_groups(self, batch, pairs, results) -> None:
        dev = self.device
        ctxs, conts, owner, req_ids = [], [], [], []
        for g, (ctx, idxs) in enumerate(batch):
            ctxs.append(list(ctx))  # truncated already (_truncate)
            for i in idxs:
                conts.append(pairs[i][1])
                owner.append(g)
                req_ids.append(i)
        # Prefill the distinct contexts, left-padded.
        Tc = max(len(c) for c in ctxs)
        tokens = torch.full((len(ctxs), Tc), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(ctxs), Tc), dtype=torch.bool)
        for g, c in enumerate(ctxs):
            if c:
                tokens[g, Tc - len(c):] = torch.tensor(c)
                mask[g, Tc - len(c):] = True
        if Tc == 0:  # no BOS and empty contexts: nothing to condition on
            raise ValueError("empty context and the tokenizer has no BOS token")
        tokens, mask = tokens.to(dev), mask.to(dev)
        logits, cache = self.backend.forward(tokens, mask, last_only=True)
        first = F.log_softmax(logits[:, -1].float(), dim=-1)  # predicts each continuation's token 0
        rows = torch.tensor(owner, device=dev)
        first = first[rows]
        Tx = max(len(c) for c in conts) - 1
        ext = None
        if Tx > 0:
            # One extension step for every continuation, right-padded; the pads are masked out and
            # come after the scored tokens, so they change nothing.
            cache = self.backend.select(cache, rows)
            xt = torch.full((len(conts), Tx), self.pad_id, dtype=torch.long)
            xm = torch.zeros((len(conts), Tx), dtype=torch.bool)
            for r, c in enumerate(conts):
                if len(c) > 1:
                    xt[r, :len(c) - 1] = torch.tensor(c[:-1])
                    xm[r, :len(c) - 1] = True
            xmask = torch.cat([mask[rows], xm.to(dev)], 1)
            ext, _ = self.backend.forward(xt.to(dev), xmask, cache)
            ext = F.log_softmax(ext.float(), dim=-1)
        for r, cont in enumerate(conts):
            target = torch.tensor(cont, device=dev)
            lp = first[r:r + 1]
            if ext is not None and len(cont) > 1:  # ext is None only when no continuation has 2 tokens
                lp = torch.cat([lp, ext[r, :len(cont) - 1]], 0)
            total = lp.gather(1, target[:, None]).sum().item()
            greedy = bool((lp.argmax(-1) == target).all().item())
            results[req_ids[r]] = (total, greedy)

    # -- rolling log-likelihood --------------------------------------------------------------
    def loglikelihood_rolling(self, texts: Sequence[str]) -> list[float]:
        """Sum of log p(token | everything before it, up to the context length) over each text."""
        L = self.max_length
        windows: list[tuple[int, list[int], list[int]]] = []  # (text index, context, targets)
        for ti, text in enumerate(texts):
            ids = self.tok.encode(text)  # the first token needs a context: BOS, else _start_id
            ids = self._prefix(ids) if self._adds_bos() else [self._start_id()] + ids
            for a in range(1, len(ids), L):
                b = min(a + L, len(ids))
                lo = max(0, b - 1 - L)
                window = ids[lo:b]
                n_ctx = a - lo  # window tokens that are context only
                windows.append((ti, window[:n_ctx], window[n_ctx:]))
        scores = self.loglikelihood_tokens([(c, t) for _, c, t in windows])
        totals = [0.0] * len(texts)
        for (ti, _, _), (lp, _) in zip(windows, scores):
            totals[ti] += lp
        return totals

    # -- generation --------------------------------------------------------------------------
    def generate(self, requests: Sequence[GenRequest | tuple]) -> list[str]:
        reqs = [r if isinstance(r, GenRequest) else GenRequest(*r) for r in requests]
        encoded = [self._prefix(self.tok.encode(r.context)) for r in reqs]
        order = sorted(range(len(reqs)), key=lambda i: -len(encoded[i]))
        out: list[str | None] = [None] * len(reqs)
        bar = self._bar(len(reqs), "generate")
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            texts = self._generate_batch([encoded[i] for i in idx], [reqs[i] for i in idx])
            for i, t in zip(idx, texts):
                out[i] = t
            bar.update(len(idx))
        bar.close()
        return _answered(out)

    def _decode_new(self, ctx: list[int], new: list[int]) -> str:
        # Decode with a few context tokens in front so a leading space or indentation survives
        # SentencePiece's "strip the first space" rule, then drop the context's text.
        tail = ctx[-8:]
        head = self.tok.decode(tail)
        text = self.tok.decode(tail + new)
        return text[len(head):] if text.startswith(head) else self.tok.decode(new)

    @staticmethod
    def _cut(text: str, until: Sequence[str]) -> tuple[str, bool]:
        cut = min((text.find(s) for s in until if s and s in text), default=-1)
        return (text[:cut], True) if cut >= 0 else (text, False)

    def _generate_batch(self, prompts: list[list[int]], reqs: list[GenRequest]) -> list[str]:
        from ..generate import decode

        keep = max(1, self.max_length - max(r.max_new_tokens for r in reqs))
        prompts = [p[-keep:] for p in prompts]
        B, T = len(prompts), max(len(p) for p in prompts)
        tokens = torch.full((B, T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.bool)
        for r, p in enumerate(prompts):
            tokens[r, T - len(p):] = torch.tensor(p)
            mask[r, T - len(p):] = True

        def text(r: int, new: list[int]) -> tuple[str, bool]:
            return self._cut(self._decode_new(prompts[r], new), reqs[r].until)

        def step(tokens, mask, cache):
            return self.backend.forward(tokens, mask, cache, last_only=True)

        budgets = [min(r.max_new_tokens, self.max_length - T) for r in reqs]
        new = decode(step, tokens.to(self.device), mask.to(self.device), budgets, eos_id=self.tok.eos_id,
                     stop=lambda r, ids: text(r, ids)[1])
        return [text(r, ids)[0] for r, ids in enumerate(new)]


# Rows of the packed token tree hold about this many tokens (a longer sequence gets a row of its
# own); the output head runs on this many positions at once.
PACK_TOKENS = 256
HEAD_CHUNK = 256


def load_lm(model: str, *, backend: str = "auto", tokenizer: str | None = None, device: str = "cpu",
            dtype: str | None = None, batch_size: int = 16, progress: bool = False,
            bos: str = "auto") -> CausalLM:
    """A ``CausalLM`` for a checkpoint directory or HF model name.

    ``backend``: ``native`` loads any checkpoint ``load_model`` reads (ours, Meta, HF Llama) into
    our ``Transformer``; ``hf`` loads it with ``transformers.AutoModelForCausalLM`` (any
    architecture: MPT, Falcon, ...); ``auto`` picks ``native`` for our and Meta's formats and
    ``hf`` otherwise. ``bos``: see ``CausalLM``.
    """
    from pathlib import Path

    from ..devices import parse_dtype, resolve_device
    from ..errors import UserError
    from .tokenization import load_tokenizer

    torch_dtype = parse_dtype(dtype)
    dev = resolve_device(str(device))
    path = Path(model)
    if backend == "auto":
        from ..interop.hf import is_hf_dir
        backend = "hf" if (not path.exists() or is_hf_dir(path)) else "native"
    if backend not in ("native", "hf"):
        raise UserError(f"--backend {backend!r}: choose auto, native or hf")
    if backend == "hf" and path.is_dir():  # before any file of it is parsed by transformers
        from ..interop.hf import check_hf_dir
        check_hf_dir(path)
    if backend == "native":
        from ..interop import load_model
        be: NativeBackend | HFBackend = NativeBackend(load_model(path, device=dev, dtype=torch_dtype))
    else:
        be = HFBackend(_transformers_model(model, torch_dtype).to(dev))
    tok = load_tokenizer(tokenizer or model, native=backend == "native")
    return CausalLM(be, tok, batch_size=batch_size, progress=progress, bos=bos)


def _transformers_model(model: str, torch_dtype):
    """``AutoModelForCausalLM`` for a local dir (checked by ``check_hf_dir``) or a Hub name: never
    with code shipped with the model, a local dir never looked up on the Hub, every weight loaded."""
    from pathlib import Path

    from ..errors import UserError

    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise UserError("--backend hf needs `transformers` (pip install 'llama-pretrain[eval]')") from None
    local = Path(model).is_dir()
    try:
        # (model, report) with output_loading_info, which transformers' annotation does not say
        loaded: Any = AutoModelForCausalLM.from_pretrained(
            str(model), dtype=torch_dtype or "auto", trust_remote_code=False, local_files_only=local,
            output_loading_info=True)
        m, report = loaded
    except Exception as e:  # noqa: BLE001 - a local dir's config may make transformers raise anything
        if not (local or isinstance(e, (OSError, ValueError))):
            raise
        detail = " ".join(str(e).split())[:300]  # one line: transformers' messages span several
        raise UserError(f"cannot load {model} with transformers ({type(e).__name__}: {detail})") from None
    check_loading_report(model, report)
    return m


def check_loading_report(model: str, report: dict) -> None:
    """UserError unless transformers filled every weight of the model from the checkpoint and used
    every tensor in it: a missing one would be left at its random initialisation, and scored."""
    from ..errors import UserError

    for key, what in (("missing_keys", "lacks {} of the model's weights"),
                      ("unexpected_keys", "holds {} tensors the model does not have"),
                      ("mismatched_keys", "holds {} tensors of the wrong shape"), ("error_msgs", "{} errors")):
        found = sorted(map(str, report.get(key) or ()))
        if found:
            raise UserError(f"{model}: the checkpoint {what.format(len(found))} ({', '.join(found[:3])}"
                            f"{', ...' if len(found) > 3 else ''}); refusing to score a partly random model")

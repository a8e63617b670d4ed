"""lm-evaluation-harness adapter: our harness as an ``lm_eval`` model named ``llama-pretrain``.

Importing this module registers the class (it needs the optional extra ``lm-eval``). lm-eval
0.4 resolves ``--model`` only against models it has imported, so run it through this module,
which registers the model and hands the command line to lm-eval's own CLI::

    python -m llama_pretrain.eval.lm_eval_adapter --model llama-pretrain \\
        --model_args path=CKPT[,backend=native|hf,tokenizer=PATH,dtype=bfloat16] --tasks hellaswag

From Python: ``import llama_pretrain.eval.lm_eval_adapter`` then ``lm_eval.simple_evaluate(
model="llama-pretrain", model_args="path=CKPT", tasks=[...])``.

The device is chosen as lm-eval's own HF backend does: ``--device`` (``device=`` from Python)
when this machine has it, else CUDA when available, else the CPU. lm-eval's CLI passes
``cuda:0`` when ``--device`` is not given, so on a machine without CUDA the run falls back to the
CPU, with a warning, instead of failing to load the model.
"""

from __future__ import annotations

import logging

import torch

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - depends on the optional extra
    raise ImportError("the lm-eval adapter needs lm-eval: pip install 'llama-pretrain[lm-eval]'") from e

from .harness import GenRequest, load_lm

log = logging.getLogger(__name__)


def resolve_device(device: str | None) -> str:
    """``device`` when this machine has it, else ``cuda`` when available, else ``cpu``."""
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    if device is None or str(device).strip().lower() in ("", "auto"):
        return auto
    device = str(device).strip()
    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise ValueError(f"device={device!r} is not a torch device (cpu, cuda, cuda:N, mps)") from None
    usable = True
    if dev.type == "cuda":
        usable = torch.cuda.is_available() and (dev.index is None or dev.index < torch.cuda.device_count())
    elif dev.type == "mps":
        usable = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if not usable:
        log.warning("device %r is not available here; using %s", device, auto)
        return auto
    return device


@register_model("llama-pretrain")
class LlamaPretrainLM(LM):
    """Any checkpoint ``load_lm`` reads (ours, Meta, HF), scored by our harness core."""

    def __init__(self, path: str | None = None, pretrained: str | None = None, backend: str = "auto",
                 tokenizer: str | None = None, device: str | None = None, dtype: str | None = None,
                 batch_size: int | str | None = 16, max_gen_toks: int = 256, **_ignored):
        super().__init__()
        path = path or pretrained
        if not path:
            raise ValueError("model_args needs path=CHECKPOINT")
        bs = int(str(batch_size)) if str(batch_size or "").isdigit() else 16  # "auto" -> our default
        device = resolve_device(device)
        self.lm = load_lm(path, backend=backend, tokenizer=tokenizer, device=device, dtype=dtype,
                          batch_size=bs)
        self._device = torch.device(device)
        self.max_gen_toks = int(max_gen_toks)

    def loglikelihood(self, requests, disable_tqdm: bool = False):
        return self.lm.loglikelihood([tuple(r.args[:2]) for r in requests])

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False):
        return self.lm.loglikelihood_rolling([r.args[0] for r in requests])

    def generate_until(self, requests, disable_tqdm: bool = False):
        reqs = []
        for r in requests:
            context, kwargs = r.args[0], dict(r.args[1] if len(r.args) > 1 else {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            reqs.append(GenRequest(context, tuple(until), int(kwargs.get("max_gen_toks", self.max_gen_toks))))
        return self.lm.generate(reqs)


def main() -> None:
    from lm_eval.__main__ import cli_evaluate
    cli_evaluate()


if __name__ == "__main__":
    main()

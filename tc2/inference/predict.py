"""Batch prediction: input lines -> chat prompts -> generated answers, on one process or many.

    model = load_for_generation(GenerationOptions(checkpoint="TeleChat2-7B"))
    items = read_inputs("input.jsonl")
    answers = predict(model, items, batch_size=8, max_new_tokens=256)

Under msrun the data-parallel groups split the prompts (by length, round robin, so each gets
a similar mix), each tensor-parallel group generates its share in lockstep, and the token ids
are summed across processes at the end, so every process returns every answer in input
order (rank 0 writes the file). One process gives the same answers: greedy decoding does not
depend on the layout (tests/dist check tp=2 against one process).
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Callable, List, Optional

import numpy as np

from tc2.data.chat import render_chat
from tc2.data.sft import ChatTokens, DataError, mf_turns
from tc2.generate import generate_batched
from tc2.inference.load import LoadedModel


def read_inputs(path: str) -> List[dict]:
    """[{"input": str, "system": str|None, "where": "file: line n"}] from jsonl or a JSON list
    (of objects or plain strings); errors name the file and line."""
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
    """Chat messages of one input: inline <_user>/<_bot> history (MindFormers style), then the question."""
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


def render_prompts(model: LoadedModel, items: List[dict], *, system: Optional[str], style: str) -> List[List[int]]:
    """Token ids of every item's prompt; a prompt that leaves no room for an answer names its line."""
    prompts = []
    for item in items:
        try:
            prompts.append(render_chat(messages_for(item, system, style), model.tokenizer, style=style,
                                       max_tokens=model.max_len - 1))
        except ValueError as e:
            msg = str(e)
            raise ValueError(msg if msg.startswith(item["where"]) else f"{item['where']}: {msg}") from None
    return prompts


def predict(model: LoadedModel, items: List[dict], *, batch_size: int = 8, max_new_tokens: int = 4096,
            system: Optional[str] = None, style: str = "template",
            on_answer: Optional[Callable[[int, str], None]] = None, log=None) -> List[str]:
    """The answer text of every item, in order, on every process. `on_answer(i, text)` is called
    as this process's answers finish (with one process: all of them)."""
    log = log or (lambda msg: print(msg, file=sys.stderr))
    ctx = model.gen["ctx"]
    prompts = render_prompts(model, items, system=system, style=style)
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    mine = order[ctx.dp_rank::ctx.dp]                      # this dp group's share, similar lengths
    tokens = np.zeros((len(prompts), max_new_tokens + 1), np.float32)   # [n, 1 + new]: count, ids
    t0, new_tokens = time.perf_counter(), 0
    finished = generate_batched(model.params, model.cfg, [prompts[i] for i in mine], batch_size=batch_size,
                                max_new_tokens=max_new_tokens, max_len=model.max_len, **model.gen)
    for done, (j, ids) in enumerate(finished, 1):
        i = mine[j]
        tokens[i, 0], tokens[i, 1:len(ids) + 1] = len(ids), ids
        new_tokens += len(ids)
        if on_answer is not None:
            on_answer(i, model.tokenizer.decode(ids, skip_special_tokens=True))
        dt = time.perf_counter() - t0
        log(f"[{done}/{len(mine)}] {new_tokens} new tokens, {new_tokens / dt:.1f} tok/s, "
            f"ETA {dt / done * (len(mine) - done):.0f}s")
    if ctx.dp > 1:                                         # one contribution per dp group
        tokens = ctx.host_sum(tokens if ctx.tp_rank == 0 else np.zeros_like(tokens))
    rows = [tokens[i, 1:1 + int(tokens[i, 0])].astype(np.int64).tolist() for i in range(len(prompts))]
    return [model.tokenizer.decode(r, skip_special_tokens=True) for r in rows]

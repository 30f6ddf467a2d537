"""Quickstart: train a small TeleChat2 on generated chat data, offline, then talk to it.

    python recipes/quickstart.py                      # ~5 minutes on 2 CPU cores
    python recipes/quickstart.py --steps 100 --out_dir runs/qs-small

Every stage is the library's real code path: tc2.data.synthetic writes official dialog-format jsonl,
tc2.train_tokenizer trains a SentencePiece BPE with the TeleChat special pieces, tc2.data
reads, masks and packs it, tc2.fit trains with AdamW + cosine schedule + eval +
HF-layout checkpoints, and tc2.generate answers held-out prompts greedily through the KV cache.
"""
from __future__ import annotations

import math
import os
import shutil
import sys
import time
from collections import defaultdict

from jsonargparse import CLI

import tc2
from tc2.data.sft import ChatTokens, PackConfig, pack_examples, read_examples
from tc2.generate import generate_batched
from tc2.data.records import BatchIterator
from tc2.data.synthetic import SYSTEM, corpus_text, make_examples, write_dialog_jsonl
from tc2.train.batches import TrainBatches, eval_batches, split_rows
from tc2 import OptimConfig, TrainConfig, evaluate, fit


def _stage(n: int, title: str) -> float:
    print(f"\n[{n}/5] {title}", flush=True)
    return time.perf_counter()


def run(out_dir: str = "runs/quickstart", n_train: int = 8000, n_heldout: int = 96,
        vocab_size: int = 800, hidden_size: int = 192, n_layer: int = 3, n_head: int = 6,
        num_key_value_heads: int = 2, ffn_hidden_size: int = 512, seq_length: int = 128,
        batch_size: int = 16, steps: int = 700, lr: float = 2e-3, eval_every: int = 100,
        max_new_tokens: int = 32, show: int = 8, seed: int = 0,
        tasks: tuple = ("add", "reverse", "convert", "capital")) -> dict:
    """Generate data, train a tokenizer, fine-tune a small TeleChat2, evaluate held-out prompts.

    Returns {"accuracy", "per_task", "eval_loss_first", "eval_loss_last", "checkpoint", ...}.
    An existing `out_dir` is replaced (it is this script's scratch space).
    """
    t_start = time.perf_counter()
    if os.path.isdir(out_dir):
        shutil.rmtree(out_dir)
    os.makedirs(out_dir)
    train_ex, held_ex, data_path = _make_data(out_dir, n_train, n_heldout, seed, tuple(tasks))
    tok_path, tok = _make_tokenizer(out_dir, train_ex, vocab_size)
    cfg = tc2.ModelConfig(vocab_size=-(-tok.vocab_size // 64) * 64, hidden_size=hidden_size,
                          n_layer=n_layer, n_head=n_head, num_key_value_heads=num_key_value_heads,
                          ffn_hidden_size=ffn_hidden_size, training_seqlen=seq_length,
                          base_seqlen=seq_length, seq_length=seq_length)
    result, initial = _finetune(out_dir, data_path, tok, cfg, seq_length, batch_size, steps, lr, eval_every, seed)
    ckpt = result.checkpoint
    shutil.copy(tok_path, os.path.join(ckpt, "tokenizer.model"))      # predict/chat find it there
    accuracy, per_task = _evaluate_heldout(result.state.params, cfg, tok, held_ex, max_new_tokens, show)

    _stage(5, "next")
    total = time.perf_counter() - t_start
    last = [r for r in result.history if "eval_loss" in r][-1]["eval_loss"]
    print(f"  eval loss {initial:.3f} -> {last:.3f}; accuracy {accuracy:.1%}; total time {total / 60:.1f} min")
    system = f'--system "{SYSTEM}"'          # the system prompt it was trained with
    print(f"  chat with it:      python recipes/chat.py --checkpoint {ckpt} {system}")
    print(f"  batch prediction:  python recipes/predict.py --checkpoint {ckpt} {system} --input_file prompts.jsonl")
    print(f"  metrics and curve: {os.path.join(out_dir, 'train', 'metrics.jsonl')}")
    return {"accuracy": accuracy, "per_task": per_task, "eval_loss_first": initial, "eval_loss_last": last,
            "checkpoint": ckpt, "history": result.history, "seconds": total}


def _make_data(out_dir, n_train, n_heldout, seed, tasks):
    t = _stage(1, "data: generated bilingual chat tasks (addition, letter reversal, unit conversion, capitals)")
    train_ex = make_examples(n_train, seed=seed, tasks=tasks)
    held_ex = make_examples(n_heldout, seed=seed, heldout=True, tasks=tasks)
    data_path = write_dialog_jsonl(train_ex, os.path.join(out_dir, "data", "train.jsonl"))
    write_dialog_jsonl(held_ex, os.path.join(out_dir, "data", "heldout.jsonl"))
    for ex in train_ex[:4]:
        print(f"  e.g. {ex.question!r} -> {ex.answer!r}")
    print(f"  {len(train_ex)} training conversations -> {data_path} ({time.perf_counter() - t:.1f}s)")
    return train_ex, held_ex, data_path


def _make_tokenizer(out_dir, train_ex, vocab_size):
    t = _stage(2, f"tokenizer: SentencePiece BPE, TeleChat special pieces at ids 0-12, vocab {vocab_size}")
    tok_path = tc2.train_tokenizer(corpus_text(train_ex), os.path.join(out_dir, "tokenizer"), vocab_size=vocab_size)
    tok = tc2.Tokenizer(tok_path)
    print(f"  {tok_path}: {tok.vocab_size} pieces; {train_ex[0].question!r} -> "
          f"{len(tok.encode(train_ex[0].question))} tokens ({time.perf_counter() - t:.1f}s)")
    return tok_path, tok


def _finetune(out_dir, data_path, tok, cfg, seq_length, batch_size, steps, lr, eval_every, seed):
    t = _stage(3, "fine-tune: tc2.fit (AdamW, cosine lr, graph-mode train step)")
    # No <_start>: prompts at inference are the chat template exactly (as predict/chat render them).
    examples, skipped = read_examples(data_path, tok, ChatTokens(start=""))
    packed = pack_examples(examples, PackConfig(max_length=seq_length, seed=seed), tok.pad_id, skipped)
    print(f"  {packed.report.summary()}")
    rows, eval_rows = split_rows(packed.columns(segments=True), 0.05, seed=seed)
    print(f"  model: {tc2.count_params(cfg):,} parameters ({cfg.n_layer} layers, hidden {cfg.hidden_size}, "
          f"{cfg.n_head} heads / {cfg.num_key_value_heads} KV heads, vocab {cfg.vocab_size})")
    batches = TrainBatches(BatchIterator(rows, batch_size, seed=seed, num_epochs=10_000), tok.pad_id)
    evals = eval_batches(eval_rows, batch_size, tok.pad_id)
    params = tc2.init_params(cfg, seed=seed)
    initial = evaluate(params, cfg, evals)["eval_loss"]
    print(f"  eval loss before training: {initial:.3f} (uniform guess: ln {cfg.vocab_size} = "
          f"{math.log(cfg.vocab_size):.3f})")
    result = fit(params, cfg, batches,
                 optim=OptimConfig(lr=lr, end_lr=lr / 10, warmup_steps=min(30, steps // 10), weight_decay=0.01),
                 train=TrainConfig(out_dir=os.path.join(out_dir, "train"), steps=steps,
                                   log_every=max(1, steps // 20), eval_every=eval_every, keep=1),
                 eval_batches=evals)
    print(f"  checkpoint (HF layout): {result.checkpoint} ({time.perf_counter() - t:.1f}s)")
    return result, initial


def _evaluate_heldout(params, cfg, tok, held_ex, max_new_tokens, show):
    t = _stage(4, f"evaluate: greedy answers to {len(held_ex)} held-out prompts (tc2.generate, KV cache)")
    prompts = [tc2.render_chat(ex.messages(), tok) for ex in held_ex]
    answers = [""] * len(prompts)
    for i, ids in generate_batched(params, cfg, prompts, batch_size=16, max_new_tokens=max_new_tokens,
                                   stop_ids=(tok.eos_id,)):
        answers[i] = tok.decode(ids, skip_special_tokens=True).strip()
    per_task = defaultdict(lambda: [0, 0])
    for i, (ex, got) in enumerate(zip(held_ex, answers)):
        ok = got == ex.answer
        per_task[ex.task][0] += ok
        per_task[ex.task][1] += 1
        if i < show:
            print(f"  {'✓' if ok else '✗'} {ex.question!r}\n      expected {ex.answer!r}\n      got      {got!r}")
    correct = sum(c for c, _ in per_task.values())
    accuracy = correct / len(held_ex)
    for task, (c, n) in sorted(per_task.items()):
        print(f"  {task:8s} {c:3d}/{n:<3d} = {c / n:6.1%}")
    print(f"  held-out exact-match accuracy: {correct}/{len(held_ex)} = {accuracy:.1%} "
          f"(chance: ~0%, answers are free text) ({time.perf_counter() - t:.1f}s)")
    return accuracy, {k: c / n for k, (c, n) in per_task.items()}


def main(argv=None) -> int:
    try:
        CLI(run, args=argv)
    except KeyboardInterrupt:              # fit saved its last step and said so
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Fine-tune TeleChat2: a thin shell over `tc2.train.setup.prepare_finetune` and `tc2.fit`.

    python recipes/finetune.py --config recipes/configs/finetune_tiny.yaml
    python recipes/finetune.py --config recipes/configs/finetune_tiny.yaml --optim.lr 1e-4 \\
        --train.steps 50 --train.resume true
    msrun --worker_num=4 --local_worker_num=4 --master_port=8118 --log_dir=runs/logs --join=True \\
        recipes/finetune.py --config recipes/configs/finetune_tiny.yaml --parallel.dp 2 --parallel.tp 2

Data: a jsonl file (MindFormers {input, output}, inline turns, or the official dialog format;
packed here) or a MindRecord written by recipes/preprocess.py / MindFormers. Model: a preset
(`model.preset`, with `model.overrides`) initialised from `model.init_seed`, or official HF
weights (`model.load DIR`). The same command runs in one process or, under msrun, in every
process of a dp x cp x tp layout (rank 0 logs; checkpoints are merged HF directories).
One run per --train.out_dir at a time. Ctrl-C (or SIGTERM) in one process: the current step
finishes, is saved, and the run exits with status 130 saying how to resume.
"""
from __future__ import annotations

import os
import sys
import time

from jsonargparse import ArgumentParser

from tc2.optim import OptimConfig
from tc2.parallel.collectives import context_for
from tc2.parallel.mesh import ParallelConfig
from tc2.train.guard import TrainingInterrupted, out_dir_lock
from tc2.train.loop import fit
from tc2.train.setup import DataConfig, ModelSource, RunConfig, check_groups, prepare_finetune, record_of


def build_parser() -> ArgumentParser:
    p = ArgumentParser(prog="finetune.py", description=__doc__.split("\n")[0], default_config_files=[])
    p.add_argument("--config", action="config", help="YAML with the groups below")
    p.add_class_arguments(ModelSource, "model")
    p.add_class_arguments(DataConfig, "data")
    p.add_class_arguments(OptimConfig, "optim")
    p.add_class_arguments(RunConfig, "train")
    p.add_class_arguments(ParallelConfig, "parallel", help="the layout (dp x cp x tp executes; under msrun)")
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        check_groups(args, ("model", "data", "optim", "train", "parallel"))
        init = parser.instantiate(args)           # the settings check their values (errors name the flag)
        ctx = context_for(init.parallel)          # first: msrun's scheduler process stops here
        log = print if ctx.is_main else (lambda msg: None)
        with out_dir_lock(init.train.out_dir, enabled=ctx.is_main):   # before the data: fail at once
            run = prepare_finetune(init.model, init.data, init.train, ctx, log=log)
            result = fit(run.params, run.cfg, run.batches, optim=init.optim, train=run.train,
                         parallel=init.parallel, eval_batches=run.evals,
                         meta={"recipe": "finetune", "config": record_of(args)}, log=log)
    except (ValueError, KeyError, OSError, FloatingPointError) as e:   # OSError: paths, space, permissions
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        if not isinstance(e, TrainingInterrupted):  # (fit has saved and said how to resume)
            print("interrupted (nothing saved by this stop)", file=sys.stderr)
        return 130
    last = next((r for r in reversed(result.history) if r.get("kind") == "eval"), None)
    summary = f"done in {time.perf_counter() - t0:.1f}s; checkpoint {result.checkpoint}"
    if last:
        summary += f"; eval loss {last['eval_loss']:.4f} (perplexity {last['eval_ppl']:.2f})"
    log(summary)
    log(f"metrics: {os.path.join(run.train.out_dir, 'metrics.jsonl')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

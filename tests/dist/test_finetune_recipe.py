"""`recipes/finetune.py --parallel.cp 2` under msrun == the single-process recipe.

About 1 min (msrun job + the single-process run); TC2_DIST_RECIPE=0 skips it.
Same data, seed and schedule (warmup, clipping, 2 micro-batches per step); the merged HF
checkpoint of the parallel run must equal the single-process checkpoint.
"""
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tc2.checkpoint.hf import load_hf
from tc2.tree import tree_flatten_with_names

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_spmd import _free_port, _logs  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TC2_DIST_RECIPE", "1") == "0",
                                reason="TC2_DIST_RECIPE=0: the recipe job is disabled")
STEPS = 4


def _args(tmp, out_dir):
    return ["--config", os.path.join(ROOT, "recipes/configs/finetune_tiny.yaml"),
            "--data.train", str(tmp / "train.jsonl"), "--data.eval", "null", "--data.tokenizer", str(tmp / "tok.model"),
            "--train.out_dir", str(out_dir), "--train.epochs", "null", "--train.steps", str(STEPS),
            "--train.log_every", "1", "--train.eval_every", "0", "--train.save_every", "0", "--train.plot", "false"]


def _losses(out_dir):
    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        return [r["loss"] for r in map(json.loads, f) if r.get("kind") == "train"]


def test_finetune_cp2_under_msrun_equals_single_process(tmp_path):
    from tc2.data.synthetic import make_examples, write_dialog_jsonl
    sys.path.insert(0, os.path.join(ROOT, "recipes"))
    import finetune
    import train_tokenizer
    write_dialog_jsonl(make_examples(120), str(tmp_path / "train.jsonl"))
    assert train_tokenizer.main(["--input", str(tmp_path / "train.jsonl"), "--out_prefix", str(tmp_path / "tok"),
                                 "--vocab_size", "512"]) == 0

    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    log_dir = tmp_path / "logs"
    cmd = [os.path.join(bin_dir, "msrun"), "--worker_num=2", "--local_worker_num=2", f"--master_port={_free_port()}",
           f"--log_dir={log_dir}", "--join=True", os.path.join(ROOT, "recipes/finetune.py"),
           *_args(tmp_path, tmp_path / "par"), "--parallel.cp", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"msrun exit {proc.returncode}\n{proc.stdout[-2000:]}\n{_logs(str(log_dir))}"

    assert finetune.main(_args(tmp_path, tmp_path / "one")) == 0

    np.testing.assert_allclose(_losses(tmp_path / "par"), _losses(tmp_path / "one"), rtol=1e-5)
    merged, _ = load_hf(str(tmp_path / "par" / f"hf_step_{STEPS:08d}"))
    single, _ = load_hf(str(tmp_path / "one" / f"step_{STEPS:08d}"))
    a, b = tree_flatten_with_names(merged), tree_flatten_with_names(single)
    assert set(a) == set(b)
    for n in a:
        np.testing.assert_allclose(a[n].asnumpy(), b[n].asnumpy(), rtol=1e-5, atol=1e-6, err_msg=n)

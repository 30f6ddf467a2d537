"""Generation under msrun == one process: `recipes/predict.py` and `recipes/chat.py` with
`--parallel.tp 2` (each process holds half the heads, half the KV cache and half the
vocabulary) and `--parallel.dp 2` (the prompts split over two processes) give the same greedy
answers as the single-process recipes. About 1.5 min; TC2_DIST_GENERATE=0 skips it.
"""
import json
import os
import subprocess
import sys

import mindspore as ms
import pytest

import tc2
from tc2.data.tokenizer import train_tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
sys.path.insert(0, HERE)
from test_spmd import _free_port, _logs  # noqa: E402

pytestmark = pytest.mark.skipif(os.environ.get("TC2_DIST_GENERATE", "1") == "0",
                                reason="TC2_DIST_GENERATE=0: the generation jobs are disabled")
CFG = tc2.tiny(n_layer=2)                 # 4 query heads, 2 KV heads, vocab 512: tp=2 splits all
CORPUS = ["hello world, this is a tiny chat corpus for tests.", "the quick brown fox jumps over the lazy dog",
          "你好，世界。今天天气很好。", "what is the answer? the answer is 42."] * 50
PROMPTS = [{"input": "hello world"}, {"input": "<_user>what is the answer?<_bot>42<_end><_user>the quick fox"},
           {"input": "你好", "system": "be brief"}, {"input": "the lazy dog"}, {"input": "42"}]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF checkpoint whose greedy answers are not degenerate (sharpened weights)."""
    d = tmp_path_factory.mktemp("tp_model")
    p = tc2.init_params(CFG, seed=4)
    p = {**p, "layers": tuple({k: ms.Tensor(v.asnumpy() * (4 if v.ndim == 2 else 1)) for k, v in lp.items()}
                              for lp in p["layers"]),
         "lm_head": ms.Tensor(p["lm_head"].asnumpy() * 8)}
    tc2.save_hf(p, CFG, str(d))
    train_tokenizer(CORPUS, str(d / "tokenizer"), vocab_size=480)
    with open(d / "input.jsonl", "w", encoding="utf-8") as f:
        for x in PROMPTS:
            f.write(json.dumps(x, ensure_ascii=False) + "\n")
    return d


def _run(cmd, tmp, stdin=None):
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, input=stdin)
    logs = _logs(str(tmp / "logs")) if (tmp / "logs").is_dir() else ""
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}\n{logs}"
    return proc


def _msrun(tmp, n, recipe, args, stdin=None):
    bin_dir = os.path.dirname(sys.executable)
    cmd = [os.path.join(bin_dir, "msrun"), f"--worker_num={n}", f"--local_worker_num={n}",
           f"--master_port={_free_port()}", f"--log_dir={tmp / 'logs'}", "--join=True",
           os.path.join(ROOT, "recipes", recipe), *args]
    return _run(cmd, tmp, stdin)


def _predict_args(model_dir, out):
    return ["--checkpoint", str(model_dir), "--input_file", str(model_dir / "input.jsonl"), "--output_file", str(out),
            "--batch_size", "2", "--max_new_tokens", "8", "--max_len", "128", "--system", "You are a test."]


def _outputs(path):
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def single(model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("single")
    _run([sys.executable, os.path.join(ROOT, "recipes", "predict.py"), *_predict_args(model_dir, tmp / "one.jsonl")], tmp)
    rows = _outputs(tmp / "one.jsonl")
    assert [r["input"] for r in rows] == [p["input"] for p in PROMPTS]
    assert sum(len(r["output"]) for r in rows) > 10, rows              # real answers, not empty strings
    return rows


@pytest.mark.parametrize("flag", ["tp", "dp"])
def test_predict_under_msrun_equals_one_process(model_dir, single, tmp_path, flag):
    _msrun(tmp_path, 2, "predict.py", _predict_args(model_dir, tmp_path / "par.jsonl") + [f"--parallel.{flag}", "2"])
    assert _outputs(tmp_path / "par.jsonl") == single


def test_chat_tp2_under_msrun_streams_the_one_process_answers(model_dir, tmp_path):
    lines = "hello world\n/system You are terse.\nthe quick fox\n/reset\nwhat is the answer?\n"
    args = ["--checkpoint", str(model_dir), "--max_new_tokens", "6", "--max_len", "128", "--system", "hi"]
    one = _run([sys.executable, os.path.join(ROOT, "recipes", "chat.py"), *args], tmp_path, stdin=lines)
    assert one.stdout.count("bot> ") == 3
    _msrun(tmp_path, 2, "chat.py", args + ["--parallel.tp", "2"], stdin=lines)
    with open(tmp_path / "logs" / "worker_0.log", encoding="utf-8", errors="replace") as f:
        log = f.read()
    answers = [seg.split("\n")[0] for seg in one.stdout.split("bot> ")[1:]]
    got = [seg.split("\n")[0] for seg in log.split("bot> ")[1:]]
    assert got == answers and any(answers), (got, answers)

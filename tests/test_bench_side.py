"""`benchmark.py side`: tc2's table with the peer missing, the peer beside it when an interpreter
with torch and the official files are given, and the CPU patcher of the official files.

The side benchmark is run as a user runs it (a subprocess, tiny cases, one round); the patcher
and the table are checked in process on made-up inputs (neither imports torch nor MindSpore).
"""
import importlib
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(REPO, "recipes")
TINY = ["train_tiny", "decode_tiny_b1", "prefill_tiny"]

FAKE_MODELING = '''import torch


class RotaryEmbedding(torch.nn.Module):
    def __init__(self, dim, config, base=10000, precision=torch.half):
        self.inv_freq = 1. / (base ** (torch.arange(0, dim, 2).float().half() / dim)).cuda()

    def tables(self, emb):
        self.cos_cached = self.mscale * emb.cos()[:, None, :].half()
        self.sin_cached = self.mscale * emb.sin()[:, None, :].half()


class FlashSelfAttention(torch.nn.Module):
    def __init__(self, causal=False):
        super().__init__()
        assert flash_attn_unpadded_func is not None, ('Please install FlashAttention first, '
                                                      'e.g., with pip install flash-attn')
        assert rearrange is not None, 'Please install einops first, e.g., with pip install einops'
        self.causal = causal
        # self.logn_tensor = torch.tensor(logn_list)[None, :, None, None].half().cuda()
'''


@pytest.fixture
def recipes(monkeypatch):
    """The recipes folder importable (the side benchmark's modules import each other by name)."""
    monkeypatch.syspath_prepend(RECIPES)
    return lambda name: importlib.import_module(name)


def _side(*flags, env=None, timeout=600):
    """benchmark.py side on the tiny cases, one round of one step, in a fresh interpreter."""
    cmd = [sys.executable, os.path.join(RECIPES, "benchmark.py"), "side", "--cases", "[" + ",".join(TINY) + "]",
           "--rounds", "1", "--steps", "1", "--warmup", "1", *flags]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)


def _env(**changes):
    env = dict(os.environ, GLOG_v="3", PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])))
    env.pop("TC2_PEER_MODELING", None)
    env.pop("TC2_PEER_PYTHON", None)
    env.update(changes)
    return env


def _rows(stdout):
    """{case: {column: cell}} of the markdown table in the output."""
    lines = [x for x in stdout.splitlines() if x.startswith("| ")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    rows = {}
    for line in lines[1:]:
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].split(" ")[0]] = dict(zip(head, cells))
    return rows


def test_without_the_peer_prints_tc2_and_says_why_the_peer_is_missing():
    out = _side(env=_env())
    assert out.returncode == 0, out.stderr[-3000:]
    assert "peer column missing: no --peer_modeling given" in out.stdout
    assert "pip install 'tc2[peer]'" in out.stdout
    rows = _rows(out.stdout)
    assert sorted(rows) == sorted(TINY)
    for case, row in rows.items():
        assert "torch eager tok/s" not in row
        assert float(row["tc2 auto tok/s"].split(" ")[0]) > 0, (case, row)
        assert float(row["tc2 auto GiB"]) > 0


def test_with_the_peer_both_systems_in_one_table(tmp_path):
    python, modeling = os.environ.get("TC2_PEER_PYTHON"), os.environ.get("TC2_PEER_MODELING")
    if not python or not modeling:
        pytest.skip("set TC2_PEER_PYTHON (an interpreter with torch + transformers) and TC2_PEER_MODELING "
                    "(the official TeleChat2 model/115B files) to run tc2 beside the official code")
    out_file = tmp_path / "raw.jsonl"
    out = _side("--peer_python", python, "--peer_modeling", modeling, "--out", str(out_file), env=_env(),
                timeout=1800)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "peer column missing" not in out.stdout
    rows = _rows(out.stdout)
    assert sorted(rows) == sorted(TINY)
    for case, row in rows.items():
        for col in ("torch eager tok/s", "torch.compile tok/s", "tc2 auto tok/s", "tc2 auto / eager",
                    "tc2 auto / compile", "torch eager GiB", "torch.compile GiB", "tc2 auto GiB"):
            assert float(row[col].split(" ")[0]) > 0, (case, col, row)
    raw = [json.loads(x) for x in out_file.read_text().splitlines()]
    assert sorted((r["case"], r["system"], r["variant"]) for r in raw) == sorted(
        [(c, "tc2", "auto" if c == "train_tiny" else "layered") for c in TINY]
        + [(c, "torch", m) for c in TINY for m in ("eager", "compile")])


def test_patcher_makes_the_official_text_cpu_only(recipes):
    bp = recipes("bench_peer")
    out = bp.patch_source("modeling_telechat.py", FAKE_MODELING)
    code = [x for x in out.splitlines() if not x.lstrip().startswith("#")]
    assert not any(".cuda(" in x or ".half(" in x for x in code)
    assert "(torch.arange(0, dim, 2).float() / dim))" in out
    assert "emb.cos()[:, None, :].float()" in out and "emb.sin()[:, None, :].float()" in out
    assert not any(x.lstrip().startswith("assert") for x in code) and out.count("pass  # CPU patch") == 2
    assert out.count("\n") == FAKE_MODELING.count("\n")            # tracebacks keep the official line numbers
    compile(out, "modeling_telechat.py", "exec")
    assert bp.patch_source("modeling_telechat.py", out) == out      # an already-patched file is accepted


@pytest.mark.parametrize("change, match", [
    (lambda s: "\n".join(x for x in s.replace("class FlashSelfAttention", "class OtherAttention").splitlines()
                         if "assert" not in x and "e.g., with" not in x),
     r"modeling_telechat\.py: CPU patch 'FlashSelfAttention"),
    (lambda s: s.replace(".float().half() / dim)).cuda()", ".to(torch.float16) / dim))"),
     r"modeling_telechat\.py: CPU patch 'RoPE inv_freq"),
    (lambda s: s + "        self.mask = torch.ones(4).cuda()\n",
     rf"modeling_telechat\.py:{FAKE_MODELING.count(chr(10)) + 1}: still calls"),
])
def test_patcher_names_the_file_when_the_text_is_not_the_expected_version(recipes, change, match):
    bp = recipes("bench_peer")
    with pytest.raises(bp.PatchError, match=match):
        bp.patch_source("modeling_telechat.py", change(FAKE_MODELING))


def test_a_folder_without_the_official_files_is_why_the_peer_is_missing(recipes, tmp_path):
    (tmp_path / "modeling_telechat.py").write_text(FAKE_MODELING)
    why = recipes("bench_side").peer_missing(str(tmp_path), sys.executable)
    assert "configuration_telechat.py: not found" in why


def test_a_failed_run_is_a_failed_cell_and_the_others_stay(recipes):
    side = recipes("bench_side")
    ok = dict(case="train_tiny", system="tc2", variant="auto", tokens_per_s=200.0, tokens_per_s_best=250.0,
              peak_rss_bytes=2 ** 30, loadavg_start=[0.5, 0.5, 0.5])
    eager = dict(ok, system="torch", variant="eager", tokens_per_s=100.0, tokens_per_s_best=100.0)
    failed = dict(case="train_tiny", system="torch", variant="compile", failed=True)
    row = _rows("\n".join(side.table(["train_tiny"], [ok, eager, failed], ["auto"], ["torch eager", "torch.compile"])))
    row = row["train_tiny"]
    assert row["torch.compile tok/s"] == "failed" and row["tc2 auto / compile"] == "failed"
    assert row["tc2 auto / eager"] == "2.00 (2.50)" and row["tc2 auto tok/s"] == "200 (250)"
    assert row["tc2 auto GiB"] == "1.00"

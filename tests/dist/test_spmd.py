"""Multi-process SPMD == single process, under msrun on CPU (2 workers; 4 for the combined case).

One msrun job per worker count runs every case of `spmd_worker.py` (process start-up and
communication init cost ~10-20 s per job on this machine); the comparisons happen here.
Set TC2_DIST_TIMEOUT (seconds) to bound a job; TC2_DIST_4=0 skips the 4-worker job.
"""
import os
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tc2.nn.ring import unfold_ranks
from tc2.parallel.mesh import Mesh
from tc2.parallel.sharding import param_slices
from tc2.tree import tree_flatten_with_names

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
WORKER = os.path.join(HERE, "spmd_worker.py")
TIMEOUT = float(os.environ.get("TC2_DIST_TIMEOUT", "420"))
sys.path.insert(0, HERE)
from spmd_worker import CFG, T  # noqa: E402
from tc2.model import init_params  # noqa: E402


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _logs(log_dir: str) -> str:
    out = []
    for name in sorted(os.listdir(log_dir)) if os.path.isdir(log_dir) else []:
        with open(os.path.join(log_dir, name), errors="replace") as f:
            lines = [ln for ln in f if ln.strip() and "[WARNING]" not in ln and "[INFO]" not in ln]
        out.append(f"==== {name} (last 40 lines)\n" + "".join(lines[-40:]))
    return "\n".join(out)


class JobFailed(Exception):
    pass


def run_msrun(n: int, cases: str, tmp) -> dict:
    """Run the worker on n processes: {rank: npz}; JobFailed with the worker logs otherwise."""
    out, log_dir = str(tmp), str(tmp / "log")
    bin_dir = os.path.dirname(sys.executable)
    env = dict(os.environ, PYTHONPATH=ROOT, GLOG_v="3", PATH=bin_dir + os.pathsep + os.environ.get("PATH", ""))
    cmd = [os.path.join(bin_dir, "msrun"), f"--worker_num={n}", f"--local_worker_num={n}",
           f"--master_port={_free_port()}", f"--log_dir={log_dir}", "--join=True", WORKER, out, cases]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, start_new_session=True)
    try:
        stdout, _ = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)          # msrun and the workers it started
        stdout, _ = proc.communicate()
        raise JobFailed(f"msrun ({n} workers, {cases}) timed out after {TIMEOUT:.0f}s\n{_logs(log_dir)}")
    files = [os.path.join(out, f"rank{r}.npz") for r in range(n)]
    if not all(os.path.isfile(f) for f in files):
        raise JobFailed(f"msrun ({n} workers, {cases}) failed, exit {proc.returncode}\n{stdout[-3000:]}\n{_logs(log_dir)}")
    return {r: dict(np.load(f)) for r, f in enumerate(files)}


def _group(res: dict, prefix: str) -> dict:
    return {k[len(prefix) + 1:]: v for k, v in res.items() if k.startswith(prefix + "/")}


def _check_local(local: dict, full: dict, mesh: Mesh, rank: int, what: str, rtol=1e-5, atol=1e-6):
    """Each local tensor equals its slice of the full single-process tensor."""
    sl = tree_flatten_with_names(param_slices(CFG, mesh, rank))
    assert set(local) == set(sl), what
    for n, shard in sl.items():
        ref = full[n][shard.index]
        assert np.abs(ref).max() > 0, f"{what} {n}: reference is all zeros"
        np.testing.assert_allclose(local[n], ref, rtol=rtol, atol=atol, err_msg=f"{what} {n} on rank {rank}")


class _Job:
    """A module-scoped job run at most once: a failure is remembered, not re-run per test."""

    def __init__(self, n, cases):
        self.n, self.cases, self.result, self.error = n, cases, None, None

    def get(self, tmp_path_factory):
        if self.result is None and self.error is None:
            try:
                self.result = run_msrun(self.n, self.cases, tmp_path_factory.mktemp(f"spmd{self.n}"))
            except JobFailed as e:
                self.error = str(e)
        if self.error is not None:
            pytest.fail(self.error, pytrace=False)
        return self.result


_TWO, _FOUR = _Job(2, "tp,cp,dp,dp16,dpzero"), _Job(4, "tpcp")


@pytest.fixture(scope="module")
def two(tmp_path_factory):
    return _TWO.get(tmp_path_factory)


@pytest.fixture
def four(tmp_path_factory):
    if os.environ.get("TC2_DIST_4", "1") == "0":
        pytest.skip("TC2_DIST_4=0: the 4-worker job is disabled")
    return _FOUR.get(tmp_path_factory)


def _check_dp2_steps(two, tag: str, label: str):
    """Each rank's params after steps 1 and 2 of run `tag` == one process (1e-5), and its
    (loss, grad_norm) too."""
    ref = two[0]
    for r in (0, 1):
        res = two[r]
        for step in (1, 2):
            _check_local(_group(res, f"{tag}_step{step}"), _group(ref, f"ref_step{step}"), Mesh(dp=2), r,
                         f"{label} params after step {step}")
            np.testing.assert_allclose(res[f"{tag}/m{step}"], ref[f"ref/m{step}"], rtol=1e-5,
                                       err_msg="(loss, grad_norm)")


def test_dp2_train_steps_equal_single_process(two):
    _check_dp2_steps(two, "dp", "dp=2")


def test_dp2_zero1_chunked_apply_equals_single_process(two):
    """ZeRO-1 with every tensor updated in uneven row chunks of this rank's rows, then gathered:
    the same parameters as one process; each rank's Adam moments are its half of the rows."""
    _check_dp2_steps(two, "dpzero", "dp=2 ZeRO-1")
    for r in (0, 1):
        mu = _group(two[r], "dpzero_opt")
        emb = [k for k in mu if k.endswith("word_embeddings") and "mu" in k]
        assert emb and mu[emb[0]].shape[0] == CFG.vocab_size // 2, {k: v.shape for k, v in mu.items()}


def test_dp2_float16_loss_scaling_equals_single_process(two):
    """Same skips, same loss scale, losses and grad norms to 1e-4; the parameter updates agree
    to float16's rounding: a weight gradient summed over half the rows on each rank is rounded
    to float16 twice instead of once (unit roundoff 2^-11), and AdamW normalises it."""
    ref = two[0]
    m_ref = ref["ref16/m"]                                    # [step, (loss, gnorm, skipped, scale)]
    skipped = m_ref[:, 2] == 1.0
    assert skipped[0] and not skipped.all(), f"the scale must overflow first, then apply: {m_ref[:, 2]}"
    start = {n: x.asnumpy() for n, x in tree_flatten_with_names(init_params(CFG, seed=7)).items()}
    want = _group(ref, "ref16_params")
    for r in (0, 1):
        res = two[r]
        np.testing.assert_array_equal(res["dp16/m"][:, 2:], m_ref[:, 2:], err_msg="skips and loss scale")
        np.testing.assert_allclose(res["dp16/m"][~skipped, :2], m_ref[~skipped, :2], rtol=1e-4,
                                   err_msg="(loss, grad_norm) of the applied steps")
        got = _group(res, "dp16_params")
        assert set(got) == set(want)
        for n in want:
            d_ref, d_got = want[n] - start[n], got[n] - start[n]
            err = np.linalg.norm(d_got - d_ref) / np.linalg.norm(d_ref)
            assert err < 2.0 ** -10, f"rank {r} {n}: update differs by {err:.2e} (relative)"


def test_tp2_logits_and_gradients_equal_single_process(two):
    ref = two[0]
    for r in (0, 1):
        res = two[r]
        np.testing.assert_allclose(res["tp/logits"], ref["ref/logits"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(res["tp/loss"], ref["ref/loss"], rtol=1e-5)
        _check_local(_group(res, "tp_grad"), _group(ref, "ref_grad"), Mesh(tp=2), r, "tp=2 grads", atol=1e-7)
        _check_local(_group(res, "tp_gathered_grad"), _group(ref, "ref_grad"), Mesh(tp=2), r,
                     "tp=2 grads through the all-gathered logits", atol=1e-7)
        _check_local(_group(res, "tp_step1"), _group(ref, "ref_step1"), Mesh(tp=2), r, "tp=2 params after a step")
        np.testing.assert_allclose(res["tp/m1"], ref["ref/m1"], rtol=1e-5, err_msg="(loss, grad_norm)")
        for mode in ("none", "full"):              # every recompute mode under tp
            np.testing.assert_allclose(res[f"tp/m1_{mode}"], ref["ref/m1"], rtol=1e-5, err_msg=mode)


def test_tp2_checkpoint_per_rank_merges_to_single_process_params(two):
    ref = two[0]
    merged = _group(ref, "merged")
    want = _group(ref, "ref_step1")
    assert set(merged) == set(want)
    for n in want:
        np.testing.assert_allclose(merged[n], want[n], rtol=1e-5, atol=1e-6, err_msg=n)


def test_cp2_ring_loss_logits_and_gradients_equal_single_process(two):
    ref = two[0]
    np.testing.assert_allclose(two[0]["cp/loss"] + two[1]["cp/loss"], ref["ref/loss"], rtol=1e-5)
    logits = unfold_ranks(np.concatenate([two[0]["cp/logits"], two[1]["cp/logits"]]), 2, T, "zigzag")
    np.testing.assert_allclose(logits, ref["ref/logits"], rtol=1e-5, atol=1e-5)
    for r in (0, 1):
        _check_local(_group(two[r], "cp_grad"), _group(ref, "ref_grad"), Mesh(cp=2), r, "cp=2 grads", atol=1e-7)
        _check_local(_group(two[r], "cp_step1"), _group(ref, "ref_step1"), Mesh(cp=2), r, "cp=2 params after a step")
        np.testing.assert_allclose(two[r]["cp/m1"], ref["ref/m1"], rtol=1e-5, err_msg="(loss, grad_norm)")
        for mode in ("none", "full"):              # every recompute mode under cp (ring attention)
            np.testing.assert_allclose(two[r][f"cp/m1_{mode}"], ref["ref/m1"], rtol=1e-5, err_msg=mode)


def test_tp2_cp2_train_step_equals_single_process(four):
    ref, mesh = four[0], Mesh(tp=2, cp=2)
    for r in range(4):
        _check_local(_group(four[r], "tpcp_step1"), _group(ref, "ref_step1"), mesh, r, "tp2 x cp2 params after a step")
        np.testing.assert_allclose(four[r]["tpcp/m1"], ref["ref/m1"], rtol=1e-5, err_msg="(loss, grad_norm)")

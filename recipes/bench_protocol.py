"""The side-by-side protocol shared by the two drivers (`bench_peer.py`: the official PyTorch
code, `bench_tc2.py`: tc2): the cases, the timing loop and the JSON line they print.

Standard library only: the torch driver runs in an interpreter that has neither tc2 nor
MindSpore, and whatever both systems are measured by must be the same code, so their numbers
differ by the system and nothing else.

Cases (shapes from ../shared/design/PEER.md; the tiny ones are for tests):
  train_S      vocab 32000, hidden 256, 4 layers, 8 heads / 2 KV, ffn 768,  batch [4, 256]
  train_M      vocab 32000, hidden 512, 8 layers, 8 heads / 2 KV, ffn 1536, batch [4, 512]
  train_M8     the same at batch [8, 512] (does tc2 fit where torch fits?)
  decode_b1    shape M, 64-token prompt, 128 greedy new tokens, batch 1
  decode_b8    same, batch 8
  prefill_1024 shape M, one forward over [1, 1024] producing the first new token
  train_tiny / decode_tiny_b1 / prefill_tiny: vocab 512, hidden 64, 2 layers, 4 heads / 2 KV,
               ffn 176; [4, 64], 16-token prompt + 8 new tokens, [1, 128]
Train step = forward with labels + backward + global-norm clip 1.0 + AdamW (0.9, 0.95, wd 0.1).

A "step" is one optimizer step (train), one full generation (decode: prefill + N - 1 cached
steps) or one forward (prefill). The first step is timed on its own (first_step_s: it includes
compilation where there is one) and counts as the first of the `warmup` steps. Decode tokens/s
= B * (N - 1) / time of the cached steps: the prefill, which produces the first new token, is
excluded and reported as prefill_s.
"""
import os
import resource
import statistics
import time

SHAPES = {
    "S": dict(vocab_size=32000, hidden_size=256, n_layer=4, n_head=8, num_key_value_heads=2,
              ffn_hidden_size=768),
    "M": dict(vocab_size=32000, hidden_size=512, n_layer=8, n_head=8, num_key_value_heads=2,
              ffn_hidden_size=1536),
    "tiny": dict(vocab_size=512, hidden_size=64, n_layer=2, n_head=4, num_key_value_heads=2,
                 ffn_hidden_size=176),
}
CASES = {
    "train_S": dict(kind="train", shape="S", batch=4, seq=256),
    "train_M": dict(kind="train", shape="M", batch=4, seq=512),
    "train_M8": dict(kind="train", shape="M", batch=8, seq=512),
    "decode_b1": dict(kind="decode", shape="M", batch=1, prompt=64, new_tokens=128),
    "decode_b8": dict(kind="decode", shape="M", batch=8, prompt=64, new_tokens=128),
    "prefill_1024": dict(kind="prefill", shape="M", batch=1, seq=1024),
    "train_tiny": dict(kind="train", shape="tiny", batch=4, seq=64),
    "decode_tiny_b1": dict(kind="decode", shape="tiny", batch=1, prompt=16, new_tokens=8),
    "prefill_tiny": dict(kind="prefill", shape="tiny", batch=1, seq=128),
}
DEFAULT_CASES = ["train_S", "train_M", "decode_b1", "decode_b8", "prefill_1024"]
SEQ_LENGTH = 8192   # training_seqlen = base_seqlen = seq_length: no dynamic-NTK scaling is active


def describe(name: str) -> str:
    """A case's shape and batch in a few characters, for table rows."""
    c = CASES[name]
    if c["kind"] == "decode":
        return f"{c['shape']}, b{c['batch']}, {c['prompt']}+{c['new_tokens']}"
    return f"{c['shape']}, {c['batch']}x{c['seq']}"


def tokens_per_step(case: dict) -> int:
    """Tokens a step's rate counts: B*T (train, prefill), B*(N-1) cached-step tokens (decode)."""
    if case["kind"] == "decode":
        return case["batch"] * (case["new_tokens"] - 1)
    return case["batch"] * case["seq"]


def limit_threads(threads: int) -> None:
    """Cap the OpenMP/MKL pools; must run before the framework is imported (they read it once)."""
    os.environ["OMP_NUM_THREADS"] = str(threads)
    os.environ["MKL_NUM_THREADS"] = str(threads)


def measure(step, tokens: int, warmup: int, steps: int) -> dict:
    """Run step(0) (timed alone: first_step_s), the rest of the warm-up, then `steps` timed steps.

    step(i) returns the seconds in which its `tokens` were produced (decode: the cached steps
    only), or None when that is the whole step. cpu_per_wall_timed = CPU seconds per wall
    second over the timed steps: about the thread count when the process had the cores to
    itself, lower when other jobs took them (an interference indicator).
    """
    t0 = time.perf_counter()
    step(0)
    first_step_s = time.perf_counter() - t0
    warm = []
    for i in range(1, max(warmup, 1)):
        t0 = time.perf_counter()
        step(i)
        warm.append(time.perf_counter() - t0)
    times, rate_s = [], []
    ru0, w0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for i in range(steps):
        t0 = time.perf_counter()
        s = step(max(warmup, 1) + i)
        times.append(time.perf_counter() - t0)
        rate_s.append(times[-1] if s is None else s)
    ru1, w1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = (ru1.ru_utime - ru0.ru_utime) + (ru1.ru_stime - ru0.ru_stime)
    rates = [tokens / s for s in rate_s]
    return dict(tokens_per_s=statistics.median(rates), tokens_per_s_best=max(rates), step_times_s=times,
                cpu_per_wall_timed=cpu / (w1 - w0), warmup_times_s=warm, first_step_s=first_step_s)


def decode_fields(case: dict, prefill_times: list, decode_times: list, timed: int) -> dict:
    """The decode case's own fields from every step's (prefill, cached steps) seconds; the last
    `timed` entries are the timed steps."""
    n = case["new_tokens"]
    pre, dec = prefill_times[-timed:], decode_times[-timed:]
    return dict(batch=case["batch"], prompt_len=case["prompt"], new_tokens=n, decoded_tokens_per_row_timed=n - 1,
                decode_times_s=dec, prefill_times_s=pre, prefill_s=statistics.median(pre),
                decode_ms_per_step=1e3 * statistics.median(dec) / (n - 1),
                first_prefill_s=prefill_times[0], first_decode_s=decode_times[0])


def result(case_name: str, system: str, variant: str, measured: dict, loadavg_start, **fields) -> dict:
    """The one JSON object a driver prints: identity, the measurement, the process's peak RSS
    (ru_maxrss of this process, so one case per process) and the load average around it."""
    case = CASES[case_name]
    extra = {} if case["kind"] == "decode" else dict(batch=case["batch"], seq=case["seq"])
    return dict(case=case_name, system=system, variant=variant, shape=case["shape"], **measured,
                peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                loadavg_start=list(loadavg_start), loadavg_end=list(os.getloadavg()), **extra, **fields)

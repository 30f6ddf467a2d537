"""`benchmark.py side`: tc2 beside the official PyTorch TeleChat2 code, one table, same run.

Every run is its own process (peak RSS is that process's): `bench_tc2.py` in this interpreter,
`bench_peer.py` (torch eager, torch.compile) in --peer_python, both timed by `bench_protocol`
(same cases, same seeds' shapes, same timing loop, same threads). The runs are interleaved per
case, round after round (tc2, torch eager, torch.compile, tc2, ...), so slow drifts of a shared
machine hit both systems alike; the load average is printed before each run and its range per
case is a table column. The table gives tokens/s as the median over rounds of each run's median
step, with the best step of any round in brackets; ratios are tc2 over torch, medians and (best
over best); peak RSS is the largest of the rounds. Decode tokens/s excludes the prefill.

The official code is not bundled: --peer_modeling names a folder with the official
github:Tele-AI/TeleChat2 `model/115B` files (`bench_peer.py` patches them for the CPU in
memory), and --peer_python an interpreter with torch and transformers (`pip install
'tc2[peer]'`). Without them the table has tc2's columns and a line says why the peer's are
missing. A failed run prints its stderr tail and shows as "failed"; the other runs go on.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from typing import List, NamedTuple, Optional

from bench_peer import PatchError, patched_sources
from bench_protocol import CASES, DEFAULT_CASES, describe

HERE = os.path.dirname(os.path.abspath(__file__))
PEER_HINT = "pip install 'tc2[peer]' and pass --peer_modeling DIR with the official model/115B files"
GIB = 2.0 ** 30
PEER_COLUMNS = {"eager": "torch eager", "compile": "torch.compile"}       # mode -> column
SHORT = {"torch eager": "eager", "torch.compile": "compile"}              # column -> ratio header


class Run(NamedTuple):
    """One process of the plan: a case on one system's variant, in a round."""
    case: str
    system: str        # "tc2" | "torch"
    variant: str       # tc2: recompute mode (train) or "generate"; torch: eager | compile
    round: int


def peer_missing(peer_modeling: Optional[str], peer_python: str) -> Optional[str]:
    """Why the peer cannot run (None when it can): no folder, a folder whose files are not the
    expected official version, or an interpreter without torch/transformers."""
    if not peer_modeling:
        return "no --peer_modeling given and TC2_PEER_MODELING is not set"
    try:
        patched_sources(peer_modeling)
    except PatchError as e:
        return str(e)
    probe = subprocess.run([peer_python, "-c", "import torch, transformers"], capture_output=True, text=True)
    if probe.returncode:
        last = (probe.stderr.strip().splitlines() or ["(no message)"])[-1]
        return f"torch and transformers are not importable by {peer_python}: {last}"
    return None


GENERATE = ("layered", "unrolled")      # tc2's generation variants: generate(layered=True | False)


def plan(cases: List[str], tc2_variants: List[str], peer_modes: List[str], rounds: int,
         tc2_generate: List[str] = ["layered"]) -> List[Run]:
    """The runs in order: per case, per round, tc2 (each train variant for train, each generate
    variant otherwise) then each torch mode."""
    runs = []
    for case in cases:
        variants = tc2_variants if CASES[case]["kind"] == "train" else tc2_generate
        for r in range(rounds):
            runs += [Run(case, "tc2", v, r) for v in variants]
            runs += [Run(case, "torch", m, r) for m in peer_modes]
    return runs


def command(run: Run, opts: dict) -> List[str]:
    """The driver command line of a run."""
    common = ["--case", run.case, "--steps", str(opts["steps"]), "--warmup", str(opts["warmup"]),
              "--threads", str(opts["threads"])]
    if run.system == "torch":
        return [opts["peer_python"], os.path.join(HERE, "bench_peer.py"), "--modeling_dir", opts["peer_modeling"],
                "--mode", run.variant] + common
    cmd = [sys.executable, os.path.join(HERE, "bench_tc2.py")] + common
    if run.variant in GENERATE:
        cmd += ["--layered", str(run.variant == "layered").lower()]
    else:
        cmd += ["--recompute", run.variant]
        if opts["micro_batch"]:
            cmd += ["--micro_batch", str(opts["micro_batch"])]
    return cmd


def execute(run: Run, cmd: List[str], timeout: int) -> dict:
    """Run one driver; its JSON line, or a failure record with the stderr tail (printed)."""
    env = dict(os.environ)
    env.setdefault("GLOG_v", "3")
    ident = dict(case=run.case, system=run.system, variant=run.variant, round=run.round)
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
        code, out, err = proc.returncode, proc.stdout, proc.stderr
    except subprocess.TimeoutExpired as e:                 # its captured output is bytes
        err = e.stderr.decode(errors="replace") if isinstance(e.stderr, bytes) else (e.stderr or "")
        code, out, err = "timeout", "", f"{err}\ntimed out after {timeout} s"
    lines = [x for x in out.splitlines() if x.startswith("{")]
    if code == 0 and lines:
        return dict(json.loads(lines[-1]), round=run.round)
    tail = "\n".join(err.strip().splitlines()[-15:])
    print(f"    FAILED (exit {code}); stderr tail:\n" + "\n".join("      " + x for x in tail.splitlines()), flush=True)
    return dict(ident, failed=True, returncode=code, stderr_tail=tail)


def _loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _summary(res: dict) -> str:
    return (f"    {res['tokens_per_s']:.1f} tokens/s (best {res['tokens_per_s_best']:.1f}), "
            f"peak {res['peak_rss_bytes'] / GIB:.2f} GiB, first step {res['first_step_s']:.1f} s, "
            f"cpu/wall {res['cpu_per_wall_timed']:.2f}")


def column(res: dict, tc2_variants: List[str]) -> str:
    """The table column a result belongs to: torch's mode, or tc2's variant (decode and prefill
    go under the train variant in the same place of their own list: layered under the first)."""
    if res["system"] == "torch":
        return PEER_COLUMNS[res["variant"]]
    if res["variant"] in tc2_variants:
        return f"tc2 {res['variant']}"
    place = GENERATE.index(res["variant"]) if res["variant"] in GENERATE else 0
    return f"tc2 {tc2_variants[min(place, len(tc2_variants) - 1)]}"


def aggregate(results: List[dict], tc2_variants: List[str]) -> dict:
    """{(case, column): cell} over the rounds: median of the runs' medians, best of the bests,
    largest peak RSS, failed and total run counts."""
    groups: dict = {}
    for res in results:
        groups.setdefault((res["case"], column(res, tc2_variants)), []).append(res)
    cells = {}
    for key, rs in groups.items():
        ok = [r for r in rs if not r.get("failed")]
        cells[key] = dict(runs=len(rs), failed=len(rs) - len(ok))
        if ok:
            cells[key].update(med=statistics.median(r["tokens_per_s"] for r in ok),
                              best=max(r["tokens_per_s_best"] for r in ok),
                              gib=max(r["peak_rss_bytes"] for r in ok) / GIB)
    return cells


def _num(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _rate(cell: Optional[dict]) -> str:
    if not cell:
        return "—"
    if "med" not in cell:
        return "failed"
    flag = f" ({cell['failed']}/{cell['runs']} failed)" if cell["failed"] else ""
    return f"{_num(cell['med'])} ({_num(cell['best'])}){flag}"


def _ratio(a: Optional[dict], b: Optional[dict]) -> str:
    if not a or not b:
        return "—"
    if "med" not in a or "med" not in b:
        return "failed"
    return f"{a['med'] / b['med']:.2f} ({a['best'] / b['best']:.2f})"


def _gib(cell: Optional[dict]) -> str:
    return "—" if not cell else f"{cell['gib']:.2f}" if "gib" in cell else "failed"


def table(cases: List[str], results: List[dict], tc2_variants: List[str], peer_columns: List[str]) -> List[str]:
    """The markdown table: per case, torch's and tc2's tokens/s, tc2/torch ratios, peak RSS."""
    cells = aggregate(results, tc2_variants)
    tc2_columns = [f"tc2 {v}" for v in tc2_variants]
    head = ["case", "load 1m"] + [f"{c} tok/s" for c in peer_columns + tc2_columns]
    head += [f"{t} / {SHORT[p]}" for t in tc2_columns for p in peer_columns]
    head += [f"{c} GiB" for c in peer_columns + tc2_columns]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for case in cases:
        loads = [r["loadavg_start"][0] for r in results if r["case"] == case and "loadavg_start" in r]
        get = lambda col: cells.get((case, col))                              # noqa: E731
        row = [f"{case} ({describe(case)})", f"{min(loads):.2f}-{max(loads):.2f}" if loads else "—"]
        row += [_rate(get(c)) for c in peer_columns + tc2_columns]
        row += [_ratio(get(t), get(p)) for t in tc2_columns for p in peer_columns]
        row += [_gib(get(c)) for c in peer_columns + tc2_columns]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _write(out: Optional[str], res: dict) -> None:
    if out:
        with open(out, "a") as f:
            f.write(json.dumps(res) + "\n")


def run(cases: List[str] = DEFAULT_CASES, peer_modeling: Optional[str] = None, peer_python: Optional[str] = None,
        peer_modes: List[str] = ["eager", "compile"], tc2_variants: List[str] = ["auto"],
        tc2_generate: List[str] = ["layered"], rounds: int = 2,
        steps: int = 5, warmup: int = 3, threads: int = 2, micro_batch: Optional[int] = None,
        out: Optional[str] = None, timeout: int = 3600) -> int:
    """tc2 and the official PyTorch code on the same cases, interleaved, in one table.

    Args:
        cases: bench_protocol cases (train_S, train_M, decode_b1, decode_b8, prefill_1024; tests:
            train_tiny, decode_tiny_b1, prefill_tiny).
        peer_modeling: folder with the official model/115B modeling_telechat.py,
            configuration_telechat.py, generation_utils.py (default: $TC2_PEER_MODELING; none:
            the peer columns are missing).
        peer_python: interpreter with torch + transformers (default: $TC2_PEER_PYTHON, else this one).
        peer_modes: torch modes, each a column: eager, compile.
        tc2_variants: tc2 train-step recompute modes, each a column (auto, none, selective, full);
            decode and prefill go by tc2_generate instead.
        tc2_generate: tc2's generation variants for decode and prefill: layered (`generate`'s
            default: one compiled layer in a host loop) and/or unrolled (one graph per step);
            layered appears under the first train column, unrolled under the second.
        rounds: runs of every column per case, interleaved.
        steps: timed steps per run (its median is the run's number).
        warmup: untimed steps per run before, the first (compiling) one included; torch.compile
            recompiles on its second training step, so keep it >= 3 for compile numbers.
        threads: CPU threads of every run (torch.set_num_threads, MindSpore's kernel threads).
        micro_batch: tc2 train rows per forward/backward (default: the whole batch, as torch).
        out: a jsonl file for every run's raw result (overwritten).
        timeout: seconds per run before it counts as failed.
    """
    for c in cases:
        if c not in CASES:
            raise ValueError(f"unknown case {c!r}; choose from {sorted(CASES)}")
    for m in peer_modes:
        if m not in PEER_COLUMNS:
            raise ValueError(f"peer mode must be eager or compile, got {m!r}")
    if not tc2_variants:
        raise ValueError("tc2_variants needs at least one entry")
    peer_modeling = peer_modeling or os.environ.get("TC2_PEER_MODELING") or None
    peer_python = peer_python or os.environ.get("TC2_PEER_PYTHON") or sys.executable
    missing = peer_missing(peer_modeling, peer_python)
    if missing:
        print(f"peer column missing: {missing} ({PEER_HINT})", flush=True)
    modes = [] if missing else peer_modes
    opts = dict(steps=steps, warmup=warmup, threads=threads, micro_batch=micro_batch,
                peer_python=peer_python, peer_modeling=os.path.abspath(peer_modeling) if peer_modeling else None)
    if out:
        open(out, "w").close()
    for g in tc2_generate:
        if g not in GENERATE:
            raise ValueError(f"tc2_generate entries must be layered or unrolled, got {g!r}")
    runs = plan(cases, tc2_variants, modes, rounds, tc2_generate)
    results = []
    for i, r in enumerate(runs, 1):
        print(f"[{i}/{len(runs)}] load {_loadavg()} | {r.case} {r.system} {r.variant} round {r.round + 1}", flush=True)
        res = execute(r, command(r, opts), timeout)
        if not res.get("failed"):
            print(_summary(res), flush=True)
        results.append(res)
        _write(out, res)
    peer_columns = [PEER_COLUMNS[m] for m in modes]
    print(f"\n{threads} threads each, median of {steps} steps after {warmup} warm-up (first included), "
          f"{rounds} round(s) interleaved; tok/s = median over rounds (best step); ratio = tc2 / torch, "
          f"medians (best / best); GiB = peak RSS of the run's process; load avg now {_loadavg()}")
    print("\n".join(table(cases, results, tc2_variants, peer_columns)))
    print("decode / prefill rows: " + ", ".join(f"'tc2 {tc2_variants[min(i, len(tc2_variants) - 1)]}' = generate "
                                              f"{g}" for i, g in enumerate(GENERATE) if g in tc2_generate))
    if missing:
        print(f"peer column missing: {missing} ({PEER_HINT})")
    if out:
        print(f"raw results: {out}")
    return 1 if any(r.get("failed") for r in results) else 0


def main(argv=None) -> int:
    from jsonargparse import CLI
    return CLI(run, args=argv, as_positional=False)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""msrun worker for tests/dist/test_spmd.py: `msrun ... spmd_worker.py OUT_DIR CASES`.

Every rank computes the single-process reference itself (tiny model, same seed), runs the
requested cases on its shard with the SAME functions under its parallel context, and saves raw
results to OUT_DIR/rank{r}.npz; the pytest side does all comparisons. Cases (each builds its
own mesh over all workers):
  dp    Mesh(dp=N): two train steps on global batches == the one-process train_step
  dp16  Mesh(dp=N), float16 compute with dynamic loss scaling: three steps (the first overflows)
  tp    Mesh(tp=N): gathered logits, loss and gradients; one train step; a train-state
        checkpoint written per rank, merged by rank 0 and loaded back as HF weights
  cp    Mesh(cp=N): ring attention through the all-reduce rotation: logits, loss, gradients
  tpcp  Mesh(tp=2, cp=N/2): one train step
  dpzero Mesh(dp=N) with ZeRO-1, the optimizer applied tensor by tensor in uneven row chunks
        (tc2.update's limits set small): two train steps == the one-process train_step
"""
import os
import sys

import mindspore as ms
import numpy as np

from tc2.checkpoint.hf import load_hf
from tc2.config import tiny
from tc2.model import cross_entropy_sum, forward, gather_logits, init_params, loss_sums
from tc2.optim import adamw
from tc2.parallel.collectives import spmd_context
from tc2.parallel.mesh import Mesh
from tc2.parallel.sharding import shard_params
from tc2.step import LossScaleConfig, init_train_state, train_step
from tc2.train.checkpoints import save_checkpoint
from tc2.tree import tree_flatten_with_names, tree_map

# training_seqlen 16 < T: dynamic NTK and mscale are on, so global positions/length matter
CFG = tiny(n_layer=2, n_head=4, num_key_value_heads=2, training_seqlen=16, base_seqlen=16, seq_length=16)
B, T = 2, 27                      # 27 splits into no chunk count evenly: zigzag padding is exercised
CLIP = 0.05                       # small enough that clipping is active
KEYS = ("tokens", "labels", "positions", "segment_ids", "seq_len")


# eps large enough that the first AdamW step is not sign(g) for near-zero gradients
OPT = adamw(1e-2, eps=1e-4, weight_decay=0.1)
# 2^23 / 48 loss tokens > 65504: the float16 logit gradients overflow on every row, however the
# batch is split (an overflow near the fp16 limit would depend on how many rows a weight
# gradient sums, i.e. on dp); 2^15 is far below it. So: skip, apply, apply, grow to 2^23, skip.
LS16 = LossScaleConfig(init_scale=2.0 ** 23, growth_interval=2, factor=2.0 ** 8)


def batch(seed):
    rng = np.random.default_rng(seed)
    tokens = rng.integers(4, CFG.vocab_size, (B, T)).astype(np.int32)
    labels = rng.integers(0, CFG.vocab_size, (B, T)).astype(np.int32)
    labels[:, :3] = -100
    positions = np.broadcast_to(np.arange(T, dtype=np.int32), (B, T)).copy()
    segment_ids = np.zeros((B, T), np.int32)
    segment_ids[1, 15:] = 1                          # row 1 packs two documents
    positions[1, 15:] = np.arange(T - 15)
    return {"tokens": tokens, "labels": labels, "positions": positions, "segment_ids": segment_ids}


def flat(tree, prefix):
    return {f"{prefix}/{n}": x.asnumpy() for n, x in tree_flatten_with_names(tree).items()}


def _ref_objective(params, tokens, labels, positions, segment_ids, w):
    logits, _ = forward(params, tokens, CFG, positions=positions, segment_ids=segment_ids)
    return cross_entropy_sum(logits, labels)[0] * w


@ms.jit
def reference_grads(params, tokens, labels, positions, segment_ids, w):
    logits, _ = forward(params, tokens, CFG, positions=positions, segment_ids=segment_ids)
    loss, grads = ms.value_and_grad(_ref_objective, grad_position=0)(params, tokens, labels, positions,
                                                                      segment_ids, w)
    return logits, loss, grads


def make_spmd_grads(ctx):
    """Jitted (gathered logits, loss, grads summed over dp x cp, grads through gathered logits).

    Two graphs, each one chain of collectives: independent collective-bearing branches in one
    graph may be scheduled in different orders on different ranks (their graphs differ in
    rank constants), which pairs mismatched all-reduces."""
    def objective(params, tokens, labels, positions, segment_ids, seq_len, w):
        logits, _ = forward(params, tokens, CFG, positions=positions, seq_len=seq_len, segment_ids=segment_ids,
                            ctx=ctx)
        s, _ = cross_entropy_sum(logits, labels, ctx)
        return s * w, logits

    def gathered_objective(params, tokens, labels, positions, segment_ids, seq_len, w):
        """The same loss through the all-gathered full logits (GatherFromGroup's bprop)."""
        logits, _ = forward(params, tokens, CFG, positions=positions, seq_len=seq_len, segment_ids=segment_ids,
                            ctx=ctx)
        return cross_entropy_sum(gather_logits(logits, ctx), labels)[0] * w

    @ms.jit
    def run(params, tokens, labels, positions, segment_ids, seq_len, w):
        (loss, logits), grads = ms.value_and_grad(objective, grad_position=0, has_aux=True)(
            params, tokens, labels, positions, segment_ids, seq_len, w)
        if ctx.dp * ctx.cp > 1:
            grads = tree_map(ctx.sum_dpcp, grads)
        return gather_logits(logits, ctx), loss, grads

    @ms.jit
    def run_gathered(params, tokens, labels, positions, segment_ids, seq_len, w):
        return ms.grad(gathered_objective, grad_position=0)(params, tokens, labels, positions, segment_ids,
                                                            seq_len, w)

    def both(*args):
        logits, loss, grads = run(*args)
        return logits, loss, grads, (run_gathered(*args) if ctx.tp > 1 else grads)
    return both


def reference(params, b0, b1, w):
    """The single-process numbers every SPMD case must reproduce."""
    res = {}
    logits, loss, grads = reference_grads(ms.mutable(params), *(ms.Tensor(b0[k]) for k in KEYS[:4]), w)
    res.update({"ref/logits": logits.asnumpy(), "ref/loss": loss.asnumpy()}, **flat(grads, "ref_grad"))
    state = init_train_state(params, OPT)
    state1, m1 = train_step(state, b0, CFG, OPT, clip_norm=CLIP)
    state2, m2 = train_step(state1, b1, CFG, OPT, clip_norm=CLIP)
    res.update(flat(state1.params, "ref_step1"), **flat(state2.params, "ref_step2"))
    res.update({"ref/m1": np.array([m1["loss"], m1["grad_norm"]]), "ref/m2": np.array([m2["loss"], m2["grad_norm"]])})
    res.update(run_fp16(params, Mesh(), None, "ref16"))
    return res


def run_fp16(params, mesh, ctx, prefix):
    """Five float16 steps with dynamic loss scaling (the first ones overflow and are skipped)."""
    cfg16, kw = CFG.replace(dtype="float16"), {} if ctx is None else {"ctx": ctx}
    state = init_train_state(params if ctx is None else shard_params(params, CFG, mesh, ctx.rank), OPT, LS16)
    out, metrics = {}, []
    for b in (batch(1), batch(2), batch(3), batch(4), batch(5)):
        state, m = train_step(state, b, cfg16, OPT, LS16, clip_norm=CLIP, **kw)
        metrics.append([m["loss"], m["grad_norm"], m["skipped"], m["loss_scale"]])
    out.update(flat(state.params, f"{prefix}_params"))
    out[f"{prefix}/m"] = np.array(metrics)
    return out


def run_zero_chunked(params, b0, b1, ctx, res):
    import tc2.update as update
    update.APPLY_PIECE, update.APPLY_CHUNK = 0, 900          # each rank: its 256 of 512 embedding rows in 32 calls
    st = init_train_state(params, OPT, ctx=ctx)
    for step, b in ((1, b0), (2, b1)):
        st, m = train_step(st, b, CFG, OPT, clip_norm=CLIP, ctx=ctx)
        res.update(flat(st.params, f"dpzero_step{step}"))
        res[f"dpzero/m{step}"] = np.array([m["loss"], m["grad_norm"]])
    res.update(flat(st.opt_state, "dpzero_opt"))


def main():
    out_dir, cases = sys.argv[1], sys.argv[2].split(",")
    from mindspore.communication import get_group_size, get_rank, init
    init()                      # first: msrun's scheduler process runs this script too and stops here
    world, rank = get_group_size(), get_rank()
    import time
    t0 = time.perf_counter()
    ms.set_seed(0)
    params = init_params(CFG, seed=7)
    b0, b1 = batch(1), batch(2)
    w = ms.Tensor(1.0 / (b0["labels"] != -100).sum(), ms.float32)
    res = {}
    if rank == 0:
        res.update(reference(params, b0, b1, w))

    print(f"reference: {time.perf_counter() - t0:.1f}s", flush=True)
    for case in cases:
        t0 = time.perf_counter()
        mesh = {"dp": Mesh(dp=world), "dp16": Mesh(dp=world), "tp": Mesh(tp=world), "cp": Mesh(cp=world),
                "tpcp": Mesh(tp=2, cp=world // 2), "dpzero": Mesh(dp=world)}[case]
        ctx = spmd_context(mesh, zero=1 if case == "dpzero" else 0)
        if case == "dpzero":
            run_zero_chunked(params, b0, b1, ctx, res)
            continue
        if case == "dp16":
            res.update(run_fp16(params, mesh, ctx, "dp16"))
            continue
        local = shard_params(params, CFG, mesh, ctx.rank)
        if case in ("tp", "cp"):
            sb = ctx.local_batch(b0)
            logits, loss, grads, grads2 = make_spmd_grads(ctx)(ms.mutable(local), *(ms.Tensor(sb[k]) for k in KEYS), w)
            res.update({f"{case}/logits": logits.asnumpy(), f"{case}/loss": loss.asnumpy()}, **flat(grads, f"{case}_grad"))
            if case == "tp":
                res.update(flat(grads2, "tp_gathered_grad"))
        st = init_train_state(local, OPT)
        if case in ("tp", "cp"):                   # the other recompute modes from the same state
            for mode in ("none", "full"):
                _, m = train_step(st, b0, CFG, OPT, clip_norm=CLIP, ctx=ctx, recompute=mode)
                res[f"{case}/m1_{mode}"] = np.array([m["loss"], m["grad_norm"]])
        st, m = train_step(st, b0, CFG, OPT, clip_norm=CLIP, ctx=ctx)
        res.update(flat(st.params, f"{case}_step1"))
        res[f"{case}/m1"] = np.array([m["loss"], m["grad_norm"]])
        if case == "dp":
            st, m = train_step(st, b1, CFG, OPT, clip_norm=CLIP, ctx=ctx)
            res.update(flat(st.params, "dp_step2"))
            res["dp/m2"] = np.array([m["loss"], m["grad_norm"]])
        if case == "tp":
            path = save_checkpoint(os.path.join(out_dir, "ckpt_tp"), st, CFG, ctx=ctx)
            if ctx.rank == 0:
                merged, cfg = load_hf(path)
                assert cfg == CFG.replace(dtype=cfg.dtype), (cfg, CFG)
                res.update(flat(merged, "merged"))
            ctx.barrier()
        print(f"case {case}: {time.perf_counter() - t0:.1f}s", flush=True)
    np.savez(os.path.join(out_dir, f"rank{rank}.npz"), **res)
    print(f"rank {rank}: done {cases}", flush=True)


if __name__ == "__main__":
    main()

"""Per-device memory plan of a training layout: will it fit on the card?

Built on the sharding rules (`tc2.parallel.sharding`), so the parameter counts are exactly
what each rank holds: tp-split heads/ffn/vocab, the layers of its pipeline stage, the embedding
on the first stage and ln_f/lm_head on the last. Every pipeline stage is planned; the plan
reports the fullest one.

Formula (bytes per device of pipeline stage s; P_s = parameters the device holds):

    weights    = P_s * bytes(param_dtype)                         / Z3
    grads      = P_s * bytes(grad_dtype)                          / Z2
    optimizer  = P_s * (8 + (4 if param_dtype != float32 else 0)) / Z1   # AdamW m, v (+ fp32 master)
    activations= in_flight(s) * (layers(s) * A_layer + A_extra(s))
               + (A_layer(none) if recompute == "full")                  # one layer recomputed at a time

with Zk = dp*cp when the ZeRO stage `zero` >= k (optimizer state / grads / weights sharded over
the gradient-reduction group, like MindSpore's parallel optimizer), else 1;
in_flight(s) = min(pp - s, micro_batches) micro batches under a 1F1B schedule (MindSpore's
pipeline on Ascend), micro_batches under GPipe (what tc2's layer-by-layer step executes: every
micro-batch forward, then every backward); 1 without pp.

Per layer and micro batch, with N = micro_batch * seq_len / cp local tokens, h hidden, F ffn,
Nq/Nkv heads of size D, c = bytes of the compute dtype, t = tp, t_sp = tp under sequence
parallelism else 1, the tensors kept for backward are:

    norm inputs (fp32 residual stream), x2        2 * N*h*4 / t_sp
    norm outputs (matmul inputs), x2              2 * N*h*c / t_sp
    q, k, v after RoPE                            N*(Nq + 2*Nkv)*D*c / t
    attention output (dense input)                N*Nq*D*c / t
    attention core: flash -> lse only             N*Nq/t*4
                    else  -> softmax probs         N*Nq/t*seq_len*(4 + c)   (f32 + cast copy)
    SwiGLU: gate, up, silu(gate), gate*up         4 * N*F*c / t

recompute="selective" (tc2.layer) keeps the two residual-stream inputs, q/k/v, the attention
output, gate and up, and recomputes the norms, the attention core and silu/product;
recompute="full" keeps only each layer's input, N*h*4/t_sp. A_extra on the last stage is the
ln_f input/output and the logits kept for the loss, N*h*(4+c)/t_sp + N_head*V/t*(c + 4), with
N_head = N, or the rows of one head call when the head runs in row chunks (`head_rows`, as
tc2's layer-by-layer step does).
Not counted: framework workspace, communication buffers, fragmentation: keep headroom.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Tuple

from tc2.config import ModelConfig
from tc2.parallel.sharding import Mesh, check_mesh, local_param_specs
from tc2.tree import tree_leaves

GiB = 1 << 30
_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}
RECOMPUTE = ("none", "selective", "full")


@dataclass(frozen=True)
class MemoryPlan:
    """Bytes per device of the fullest pipeline stage (`stage`); `stage_totals` has them all."""
    mesh: Mesh
    seq_len: int
    micro_batch: int
    micro_batches: int
    recompute: str
    zero: int
    stage: int
    params: int                 # parameters held by one device of that stage
    weights: int
    grads: int
    optimizer: int
    activations: int
    device_bytes: int
    stage_totals: Tuple[int, ...]

    @property
    def total(self) -> int:
        return self.weights + self.grads + self.optimizer + self.activations

    @property
    def fits(self) -> bool:
        return self.total <= self.device_bytes

    def row(self, name: str = "") -> str:
        g = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
        return (f"{name:<8} {str(self.mesh):<14} {self.recompute:<9} {self.zero:>4} {self.micro_batches:>4}"
                f" {self.params / 1e9:8.3f} {g(self.weights)} {g(self.grads)} {g(self.optimizer)}"
                f" {g(self.activations)} {g(self.total)} / {self.device_bytes / GiB:.0f}"
                f"  {'fits' if self.fits else 'DOES NOT FIT'}")

    def __str__(self):
        return header() + "\n" + self.row()


def header() -> str:
    return (f"{'model':<8} {'mesh':<14} {'recompute':<9} {'zero':>4} {'mb':>4} {'params/B':>8}"
            f" {'weights':>8} {'grads':>8} {'optim':>8} {'activ':>8} {'total GiB':>8}")


def layer_activation_bytes(cfg: ModelConfig, mesh: Mesh, seq_len: int, micro_batch: int, *,
                           recompute: str = "none", sequence_parallel: bool = True,
                           flash_attention: bool = True) -> int:
    """Bytes one layer keeps for backward for one micro batch (see the module docstring)."""
    if recompute not in RECOMPUTE:
        raise ValueError(f"recompute must be one of {RECOMPUTE}, got {recompute!r}")
    if seq_len % mesh.cp:
        raise ValueError(f"seq_len={seq_len} is not divisible by cp={mesh.cp}")
    c = _BYTES[cfg.dtype]
    t = mesh.tp
    t_sp = t if sequence_parallel else 1
    N = micro_batch * seq_len // mesh.cp
    h, F, D = cfg.hidden_size, cfg.ffn_hidden_size, cfg.head_dim
    nq, nkv = cfg.n_head, cfg.num_key_value_heads
    if recompute == "full":
        return N * h * 4 // t_sp
    norms = 2 * N * h * 4 // t_sp + (0 if recompute == "selective" else 2 * N * h * c // t_sp)
    qkv = N * (nq + 2 * nkv) * D * c // t
    attn_out = N * nq * D * c // t
    lse = 0 if recompute == "selective" else N * nq // t * 4
    probs = 0 if flash_attention or recompute == "selective" else N * nq // t * seq_len * (4 + c)
    mlp = (2 if recompute == "selective" else 4) * N * F * c // t
    return norms + qkv + attn_out + lse + probs + mlp


def plan_memory(cfg: ModelConfig, mesh: Mesh, seq_len: int, micro_batch: int = 1, *,
                recompute: str = "none", micro_batches: int = 1, sequence_parallel: bool = True,
                flash_attention: bool = True, zero: int = 0, param_dtype: str = "float32",
                grad_dtype: str = None, device_bytes: int = 64 * GiB, schedule: str = "1f1b",
                head_rows: int = None) -> MemoryPlan:
    """Per-device bytes for weights, grads, AdamW state and activations (formula: module doc).

    param_dtype is what the weights are stored in (tc2 keeps float32 masters; with a 16-bit
    param_dtype an fp32 master copy joins the optimizer state). micro_batches is the number of
    micro batches per step (gradient accumulation / pipeline); zero in 0..3 shards optimizer
    state (1), grads (2) and weights (3) over dp*cp.
    """
    check_mesh(cfg, mesh)
    if schedule not in ("1f1b", "gpipe"):
        raise ValueError(f"schedule must be '1f1b' or 'gpipe', got {schedule!r}")
    if not 0 <= zero <= 3:
        raise ValueError(f"zero must be 0..3, got {zero}")
    for name, dt in (("param_dtype", param_dtype), ("grad_dtype", grad_dtype or param_dtype)):
        if dt not in _BYTES:
            raise ValueError(f"{name} must be one of {sorted(_BYTES)}, got {dt!r}")
    grad_dtype = grad_dtype or param_dtype
    zgroup = mesh.dp * mesh.cp
    z1, z2, z3 = (zgroup if zero >= k else 1 for k in (1, 2, 3))
    a_layer = layer_activation_bytes(cfg, mesh, seq_len, micro_batch, recompute=recompute,
                                     sequence_parallel=sequence_parallel, flash_attention=flash_attention)
    a_transient = 0
    if recompute == "full":
        a_transient = layer_activation_bytes(cfg, mesh, seq_len, micro_batch, recompute="none",
                                             sequence_parallel=sequence_parallel,
                                             flash_attention=flash_attention)
    c = _BYTES[cfg.dtype]
    N = micro_batch * seq_len // mesh.cp
    t_sp = mesh.tp if sequence_parallel else 1
    n_head = N if head_rows is None else min(N, head_rows)
    last_extra = N * cfg.hidden_size * (4 + c) // t_sp + n_head * cfg.vocab_size // mesh.tp * (c + 4)

    plans = []
    for stage in range(mesh.pp):
        rank = mesh.rank(pp=stage)
        local = local_param_specs(cfg, mesh, rank)
        P = sum(s.size for s in tree_leaves(local))
        n_layers = len(local["layers"])
        in_flight = min(mesh.pp - stage, micro_batches) if schedule == "1f1b" or mesh.pp == 1 else micro_batches
        extra = last_extra if stage == mesh.pp - 1 else 0
        act = in_flight * (n_layers * a_layer + extra) + a_transient
        master = 4 if param_dtype != "float32" else 0
        plans.append(dict(stage=stage, params=P,
                          weights=P * _BYTES[param_dtype] // z3,
                          grads=P * _BYTES[grad_dtype] // z2,
                          optimizer=P * (8 + master) // z1,
                          activations=act))
    totals = tuple(p["weights"] + p["grads"] + p["optimizer"] + p["activations"] for p in plans)
    worst = plans[max(range(len(plans)), key=lambda i: totals[i])]
    return MemoryPlan(mesh=mesh, seq_len=seq_len, micro_batch=micro_batch, micro_batches=micro_batches,
                      recompute=recompute, zero=zero, device_bytes=device_bytes,
                      stage_totals=totals, **worst)


def release_plans(device_bytes: int = 64 * GiB):
    """The MindFormers release layouts (spec §9) in bf16 compute, seq 8192: [(name, plan)].

    Each with and without optimizer-state sharding over dp where dp > 1 (the release yamls
    turn MindSpore's parallel optimizer on).
    """
    from tc2.config import telechat2_7b, telechat2_35b, telechat2_115b
    out = []
    setups = [("7B", telechat2_7b(dtype="bfloat16"), Mesh(dp=8), "full", 1),
              ("35B", telechat2_35b(dtype="bfloat16"), Mesh(tp=4, pp=4), "full", 32),
              ("115B", telechat2_115b(dtype="bfloat16"), Mesh(tp=8, pp=8), "selective", 8),
              ("115B", telechat2_115b(dtype="bfloat16"), Mesh(dp=8, tp=8, pp=8), "selective", 8)]
    for name, cfg, mesh, rc, mb in setups:
        for zero in ((0, 1, 3) if mesh.dp > 1 else (0,)):
            out.append((name, plan_memory(cfg, mesh, 8192, 1, recompute=rc, micro_batches=mb,
                                          zero=zero, device_bytes=device_bytes)))
    return out


def format_plans(named_plans) -> str:
    return "\n".join([header()] + [p.row(n) for n, p in named_plans])

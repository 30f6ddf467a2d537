"""The per-device memory plan against hand calculations."""
import pytest

from tc2.config import telechat2_7b, telechat2_35b
from tc2.parallel.memory import GiB, layer_activation_bytes, plan_memory, release_plans
from tc2.model import count_params
from tc2.parallel.sharding import Mesh, local_param_specs
from tc2.tree import tree_leaves

def test_memory_plan_7b_dp8_matches_hand_calculation():
    """7B, dp8, seq 8192, micro batch 1, full recompute, bf16 compute, fp32 params, no ZeRO.

    P = 7,617,351,680. weights = grads = 4P = 30,469,406,720; AdamW = 8P = 60,938,813,440.
    Activations (N = 8192 tokens, h = 4096, F = 12288, tp = 1, c = 2 bytes):
      kept layer inputs 30 * N*h*4                                  =  4,026,531,840
      one layer recomputed in full: norms 2*N*h*4 + 2*N*h*2         =    402,653,184
                                   q,k,v N*(32+2*32)*128*2          =    201,326,592
                                   attention out N*4096*2           =     67,108,864
                                   lse N*32*4                       =      1,048,576
                                   SwiGLU 4*N*12288*2               =    805,306,368
      last stage: ln_f in/out N*h*(4+2) + logits N*131072*(2+4)     =  6,643,777,536
      total                                                         = 12,147,752,960
    """
    plan = plan_memory(telechat2_7b(dtype="bfloat16"), Mesh(dp=8), 8192, 1, recompute="full")
    assert plan.params == 7_617_351_680
    assert plan.weights == plan.grads == 30_469_406_720
    assert plan.optimizer == 60_938_813_440
    assert plan.activations == 12_147_752_960
    assert plan.total == 30_469_406_720 * 2 + 60_938_813_440 + 12_147_752_960
    assert not plan.fits and plan.device_bytes == 64 * GiB
    z3 = plan_memory(telechat2_7b(dtype="bfloat16"), Mesh(dp=8), 8192, 1, recompute="full", zero=3)
    assert (z3.weights, z3.grads, z3.optimizer) == (30_469_406_720 // 8, 30_469_406_720 // 8,
                                                    60_938_813_440 // 8)
    assert z3.fits


def test_memory_plan_pipeline_stages_and_recompute_order():
    cfg = telechat2_35b(dtype="bfloat16")
    mesh = Mesh(tp=4, pp=4)
    plan = plan_memory(cfg, mesh, 8192, 1, recompute="full", micro_batches=32)
    # without tp, the stages' params add up to the whole model
    flat_mesh = Mesh(pp=4)
    total = sum(sum(s.size for s in tree_leaves(local_param_specs(cfg, flat_mesh, flat_mesh.rank(pp=k))))
                for k in range(4))
    assert total == count_params(cfg)
    assert len(plan.stage_totals) == 4 and plan.total == max(plan.stage_totals)
    # 1F1B: stage 0 keeps pp micro batches of its 16 layers
    a = layer_activation_bytes(cfg, mesh, 8192, 1, recompute="full")
    assert a == 8192 * 6144 * 4 // 4
    none = layer_activation_bytes(cfg, mesh, 8192, 1, recompute="none")
    sel = layer_activation_bytes(cfg, mesh, 8192, 1, recompute="selective")
    slow = layer_activation_bytes(cfg, mesh, 8192, 1, recompute="none", flash_attention=False)
    assert a < sel < none < slow
    assert slow - none == 8192 * 48 // 4 * 8192 * 6
    assert layer_activation_bytes(cfg, Mesh(tp=4, cp=2), 8192, 1) * 2 == none
    with pytest.raises(ValueError, match="recompute must be one of"):
        plan_memory(cfg, mesh, 8192, recompute="some")


def test_release_plans_cover_the_three_layouts():
    plans = release_plans()
    names = {(n, str(p.mesh)) for n, p in plans}
    assert {("7B", "dp8"), ("35B", "tp4xpp4"), ("115B", "tp8xpp8")} <= names
    for _, p in plans:
        assert p.total == p.weights + p.grads + p.optimizer + p.activations

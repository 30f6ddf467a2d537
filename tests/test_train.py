"""The train step, the loop, checkpoints and resume, and the finetune recipe (graph mode).

Every test shares one tiny config, one optimizer object and one batch shape, so the fused
step, the gradient/apply pair and the eval graph compile once for the module (plus one float16
step and one deliberately broken optimizer). Resume equivalence is asserted bit-exact.
"""
import json
import os
import re
import shutil
import sys

import mindspore as ms
import numpy as np
import pytest
from mindspore import ops

import numpy_ref as ref

from tc2.config import tiny
from tc2.config import IGNORE_INDEX
from tc2.model import cross_entropy_sum, forward, init_params, loss_fn
from tc2.optim import adamw
from tc2.data.records import BatchIterator
from tc2.step import (LossScaleConfig, as_micro_batches, eval_loss_sums, grads_and_loss, init_train_state,
                       split_micro_batches, train_step)
from tc2.train.checkpoints import (CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint,
                                  save_checkpoint, validate_checkpoint)
from tc2.train.batches import TrainBatches, eval_batches, split_rows, train_batch
from tc2.optim import OptimConfig, make_optimizer
from tc2.train.loop import NonFiniteLossError, TrainConfig, evaluate, fit
from tc2.tree import tree_flatten_with_names

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CFG = tiny()
CFG16 = tiny(dtype="float16")
B, T, PAD = 4, 64, 3
STEPS = 60                                              # every schedule here spans 60 steps
OCFG = OptimConfig(lr=1e-2, end_lr=1e-3)                # release recipe shape, a tiny-model lr
OPT = make_optimizer(OCFG, STEPS)                       # cached: fit() gets this same object
CLIP = OCFG.clip                                         # fit() clips in the step with this norm
LS16 = LossScaleConfig(init_scale=2.0 ** 24, growth_interval=2)   # 2^24 overflows float16


def _rows(n, seed):
    """Packed-row columns [n, T+1]: left pads, tokens, labels -100 on pads and a prompt part."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(4, CFG.vocab_size, (n, T + 1)).astype(np.int32)
    labels = ids.copy()
    for r in range(n):
        pads = int(rng.integers(0, 8))
        prompt = int(rng.integers(1, 20))
        ids[r, :pads] = PAD
        labels[r, :pads + prompt] = IGNORE_INDEX
    return {"input_ids": ids, "labels": labels}


def _np(tree):
    return {k: v.asnumpy() for k, v in tree_flatten_with_names(tree).items()}


def _batches(rows):
    return TrainBatches(BatchIterator(rows, B, seed=1, num_epochs=None), PAD)


def _masks(batch):
    """The batch's attention inputs (pad keys masked) as forward/loss_fn keyword arguments."""
    return {k: ms.Tensor(batch[k]) for k in ("positions", "segment_ids")}


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, seed=0)


@pytest.fixture(scope="module")
def uneven_batch():
    """[B, T] whose two halves have very different loss-token counts (mean of means != mean).

    Plain causal rows (mask_pad=False): the test is about accumulation, and with this draw's
    pads masked one gradient element lands near AdamW's eps (see the test), which moves the
    second step's loss of the two paths apart by 3e-5 (measured), not by accumulation."""
    rows = _rows(B, seed=3)
    rows["labels"][:2, :-4] = IGNORE_INDEX                       # rows 0-1: 3 loss tokens each
    return train_batch(rows, PAD, mask_pad=False)


# --------------------------------------------------------------------------- data adapters


def test_train_batch_shifts_and_masks_pads():
    rows = {"input_ids": np.array([[3, 3, 1, 10, 11, 12]]), "labels": np.array([[-100, -100, -100, 10, 11, 12]]),
            "segment_ids": np.array([[0, 0, 1, 1, 1, 1]]), "positions": np.array([[0, 0, 0, 1, 2, 3]])}
    b = train_batch(rows, pad_id=3)
    assert b["tokens"].tolist() == [[3, 3, 1, 10, 11]]
    assert b["labels"].tolist() == [[-100, -100, 10, 11, 12]]          # label of token i is row[i+1]
    assert b["segment_ids"].tolist() == [[0, 0, 1, 1, 1]] and b["positions"].tolist() == [[0, 0, 0, 1, 2]]
    rows["labels"][0, 2] = 99                                          # a pad token never carries loss
    rows["input_ids"][0, 1] = 3
    assert train_batch(rows, 3)["labels"][0, 1] == -100
    tr, ev = split_rows(_rows(10, 0), 0.2, seed=0)
    assert len(tr["input_ids"]) == 8 and len(ev["input_ids"]) == 2
    assert split_rows(_rows(10, 0), 0.0)[1] is None
    with pytest.raises(KeyError, match="tokens"):
        as_micro_batches({"labels": np.zeros((1, 4))})


def test_batches_mask_pad_keys_and_keep_arange_positions():
    rows = {"input_ids": np.array([[3, 3, 1, 10, 11, 12]]), "labels": np.array([[-100, -100, -100, 10, 11, 12]])}
    b = train_batch(rows, pad_id=3)
    assert b["segment_ids"].tolist() == [[0, 0, 1, 1, 1]]               # pads: their own segment
    assert b["positions"].tolist() == [[0, 1, 2, 3, 4]]                 # RoPE slots include the pads
    assert sorted(train_batch(rows, 3, mask_pad=False)) == ["labels", "tokens"]   # plain causal
    # document masking on top: a pad anywhere leaves its conversation's segment
    docs = {**rows, "input_ids": np.array([[3, 1, 10, 3, 1, 12]]),
            "segment_ids": np.array([[0, 1, 1, 1, 2, 2]]), "positions": np.array([[0, 0, 1, 2, 0, 1]])}
    b = train_batch(docs, 3)
    assert b["segment_ids"].tolist() == [[0, 1, 1, 0, 2]] and b["positions"].tolist() == [[0, 0, 1, 2, 0]]
    assert train_batch(docs, 3, mask_pad=False)["segment_ids"].tolist() == [[0, 1, 1, 1, 2]]
    ev = eval_batches({k: v.repeat(3, 0) for k, v in rows.items()}, 2, 3)   # + a filler row of pads
    assert [e["segment_ids"].tolist() for e in ev] == [[[0, 0, 1, 1, 1]] * 2, [[0, 0, 1, 1, 1], [0] * 5]]


def test_loss_on_pad_led_rows_is_mindformers_training_loss(params):
    """float64 reference of exactly MindFormers' training forward: causal AND key != pad,
    positions 0..S-1 including the pads, loss where token != pad and label != -100."""
    p = dict(params, lm_head=params["lm_head"] * 8.0)          # spread the token losses
    rng = np.random.default_rng(21)
    ids = rng.integers(4, CFG.vocab_size, (B, T + 1)).astype(np.int32)
    labels = ids.copy()
    for r, n_pad in enumerate((1, 5, 20, 40)):                  # every packed row starts with pads
        ids[r, :n_pad] = PAD
        labels[r, :n_pad + 3] = IGNORE_INDEX
    tokens, shifted = ids[:, :-1], labels[:, 1:].copy()
    shifted[tokens == PAD] = IGNORE_INDEX
    P = ref.to_numpy64(p)
    want = ref.token_mean_loss(ref.forward(P, tokens, CFG, key_ok=tokens != PAD), shifted)
    plain = ref.token_mean_loss(ref.forward(P, tokens, CFG), shifted)
    assert abs(plain - want) > 1e-2 * want                     # the pads matter for this batch
    s, c = eval_loss_sums(p, train_batch({"input_ids": ids, "labels": labels}, PAD), CFG)
    assert s / c == pytest.approx(want, rel=1e-5)
    _, loss, _ = grads_and_loss(p, train_batch({"input_ids": ids, "labels": labels}, PAD), CFG)
    assert loss == pytest.approx(want, rel=1e-5)               # the train step's loss too


def test_finetune_batches_carry_the_pad_mask_by_default(tmp_path):
    from tc2.context import LOCAL
    from tc2.data.records import write_mindrecord
    from tc2.train.setup import DataConfig, ModelSource, RunConfig, prepare_finetune
    path = write_mindrecord(str(tmp_path / "d.mindrecord"), _rows(10, seed=13))
    run = prepare_finetune(ModelSource(preset="tiny"), DataConfig(train=path, seq_length=T, eval_fraction=0.2),
                           RunConfig(steps=2, global_batch=B, micro_batch=2), LOCAL, log=lambda s: None)
    for batch in (next(run.batches), run.evals[0]):
        is_pad = batch["tokens"] == PAD
        assert is_pad.any() and (batch["segment_ids"] == np.where(is_pad, 0, 1)).all()
        assert (batch["positions"] == np.arange(T)).all()
    run = prepare_finetune(ModelSource(preset="tiny"), DataConfig(train=path, seq_length=T, mask_pad=False),
                           RunConfig(steps=2, global_batch=B, micro_batch=2), LOCAL, log=lambda s: None)
    assert "segment_ids" not in next(run.batches)


def test_rows_from_mindrecord(tmp_path):
    from tc2.data.records import write_mindrecord
    from tc2.train.batches import load_rows
    rows = _rows(5, seed=12)
    path = write_mindrecord(str(tmp_path / "d.mindrecord"), rows)
    got = load_rows(path, T)
    assert sorted(got) == ["input_ids", "labels"]
    assert all(np.array_equal(got[k], rows[k]) for k in rows)
    with pytest.raises(ValueError, match="d.mindrecord.*seq_length=32"):
        load_rows(path, 32)


# --------------------------------------------------------------------------- the step


def test_grad_accumulation_equals_one_batch(params, uneven_batch):
    # a sharper lm_head spreads per-token losses (std ~ a few nats instead of ~0.01 at init), so
    # the mean of micro-batch means is far from the token mean whatever the random draw
    params = dict(params, lm_head=params["lm_head"] * 40.0)
    split = split_micro_batches(uneven_batch, 2)
    g1, loss1, n1 = grads_and_loss(params, uneven_batch, CFG)
    g2, loss2, n2 = grads_and_loss(params, split, CFG)
    assert n1 == n2 == int((uneven_batch["labels"] != IGNORE_INDEX).sum())
    assert loss2 == pytest.approx(loss1, rel=1e-6)
    for k, a in _np(g1).items():
        b = _np(g2)[k]
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=k)
    # the loss is the model's token mean over the whole batch ...
    ref = float(loss_fn(params, ms.Tensor(uneven_batch["tokens"]), ms.Tensor(uneven_batch["labels"]), CFG).asnumpy())
    assert loss1 == pytest.approx(ref, rel=1e-5)
    # ... not the mean of the micro-batch means (which differs a lot for this batch)
    halves = [float(loss_fn(params, ms.Tensor(split["tokens"][i]), ms.Tensor(split["labels"][i]), CFG).asnumpy())
              for i in range(2)]
    assert abs(np.mean(halves) - loss1) > 1e-2
    # the whole step: fused graph (k=1) == gradient graph x2 + apply graph (k=2). After one
    # step the AdamW moments are 0.1 g and 0.05 g^2 of the clipped gradient that reached the
    # optimizer: they are what is compared. The parameters are not compared elementwise:
    # AdamW's first update g / (|g| + eps) turns float32 rounding of a gradient element near
    # eps = 1e-8 into an O(lr) difference (measured: 1 element in 4096 off by 1e-6); the same
    # `_finish` code computes it in both graphs, and the next step's loss checks the result.
    s1, m1 = train_step(init_train_state(params, OPT), uneven_batch, CFG, OPT, clip_norm=CLIP)
    s2, m2 = train_step(init_train_state(params, OPT), split, CFG, OPT, clip_norm=CLIP)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-6) and m1["loss"] == pytest.approx(loss1, rel=1e-6)
    assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
    assert m1["loss_tokens"] == m2["loss_tokens"] == n1 and m1["tokens"] == m2["tokens"] == B * T
    o1, o2 = _np(s1.opt_state), _np(s2.opt_state)
    assert sorted(o1) == sorted(o2) and o1["count"] == o2["count"] == 1
    for k, a in o1.items():
        np.testing.assert_allclose(o2[k], a, rtol=1e-5, atol=1e-5 * np.abs(a).max(), err_msg=k)
    s1, m1 = train_step(s1, uneven_batch, CFG, OPT, clip_norm=CLIP)
    s2, m2 = train_step(s2, split, CFG, OPT, clip_norm=CLIP)
    assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    assert int(s1.step.asnumpy()) == int(s2.step.asnumpy()) == 2


def test_overfitting_one_batch_drives_loss_down_50x(params):
    batch = train_batch(_rows(2, seed=7), PAD)
    state = init_train_state(params, OPT)
    losses = []
    for _ in range(30):
        state, m = train_step(state, batch, CFG, OPT, clip_norm=CLIP)
        losses.append(m["loss"])
    assert losses[0] > 6.0                                   # ~ln(512) at init
    assert losses[-1] < losses[0] / 50, losses[::5]          # measured: 6.26 -> 0.08 in 30 steps
    # the metrics report what the schedule did: cosine from 1e-2 towards 1e-3 over 60 updates
    assert m["lr"] == pytest.approx(1e-3 + 0.5 * (1e-2 - 1e-3) * (1 + np.cos(np.pi * 29 / 60)), rel=1e-5)


def test_document_masking_reaches_the_model(params):
    rows = _rows(B, seed=11)
    seg = np.ones_like(rows["input_ids"])
    seg[:, 30:] = 2                                           # two packed documents per row
    pos = np.concatenate([np.arange(30), np.arange(T + 1 - 30)])[None].repeat(B, 0)
    batch = train_batch({**rows, "segment_ids": seg, "positions": pos.astype(np.int32)}, PAD)
    _, masked, _ = grads_and_loss(params, split_micro_batches(batch, 2), CFG)
    ref = float(loss_fn(params, ms.Tensor(batch["tokens"]), ms.Tensor(batch["labels"]), CFG,
                        positions=ms.Tensor(batch["positions"]),
                        segment_ids=ms.Tensor(batch["segment_ids"])).asnumpy())
    plain = float(loss_fn(params, ms.Tensor(batch["tokens"]), ms.Tensor(batch["labels"]), CFG).asnumpy())
    assert masked == pytest.approx(ref, rel=1e-5)
    assert abs(masked - plain) > 1e-4


def test_ids_outside_the_vocabulary_are_refused_on_the_host(params):
    state = init_train_state(params, OPT)
    good = train_batch(_rows(B, seed=15), PAD)
    for key, value, message in (("tokens", CFG.vocab_size, "batch row 3 (micro-batch 1), position 7: token id 512 "
                                 "is outside the model's vocabulary [0, 512) (batch['tokens'])"),
                                ("labels", -7, "batch row 3 (micro-batch 1), position 7: label -7 is neither "
                                 "-100 nor an id of the model's vocabulary [0, 512) (batch['labels'])")):
        bad = {k: v.copy() for k, v in good.items()}
        bad[key][3, 7] = value
        with pytest.raises(ValueError) as err:
            train_step(state, split_micro_batches(bad, 2), CFG, OPT, clip_norm=CLIP)
        assert str(err.value) == message
        with pytest.raises(ValueError, match=r"batch row 3, position 7: "):
            eval_loss_sums(params, bad, CFG)
    _, m = train_step(state, good, CFG, OPT, clip_norm=CLIP)            # the step still works
    assert np.isfinite(m["loss"]) and not m["skipped"]


def test_load_rows_refuses_ids_outside_the_vocabulary(tmp_path):
    from tc2.data.records import write_mindrecord
    from tc2.train.batches import load_rows
    rows = _rows(5, seed=16)
    rows["input_ids"][2, 9] = 700
    path = write_mindrecord(str(tmp_path / "d.mindrecord"), rows)
    assert load_rows(path, T)["input_ids"][2, 9] == 700                # no vocabulary given: not checked
    with pytest.raises(ValueError, match=r"d.mindrecord: row 2, position 9: input_ids value 700 is outside "
                                         r"the model's vocabulary \[0, 512\)"):
        load_rows(path, T, vocab_size=CFG.vocab_size)


def test_a_batch_without_loss_tokens_is_skipped_without_an_update(params, tmp_path):
    state = init_train_state(params, OPT)
    empty = train_batch(_rows(B, seed=17), PAD)
    empty["labels"][:] = IGNORE_INDEX
    new, m = train_step(state, empty, CFG, OPT, clip_norm=CLIP)
    assert m["skipped"] == 1.0 and m["no_loss_tokens"] == 1.0 and m["loss_tokens"] == 0 and np.isnan(m["loss"])
    assert m["lr"] == pytest.approx(1e-2, rel=1e-6)                     # the lr the next update will use
    assert all(np.array_equal(v, _np(params)[k]) for k, v in _np(new.params).items())   # weight decay too
    assert int(new.opt_state["count"].asnumpy()) == 0 and int(new.step.asnumpy()) == 1
    rows = _rows(3 * B, seed=18)
    rows["labels"][B:2 * B] = IGNORE_INDEX                              # the second batch: nothing to learn
    log = []
    batches = TrainBatches(BatchIterator(rows, B, shuffle=False, num_epochs=None), PAD)
    result = fit(params, CFG, batches, optim=OCFG, log=log.append,
                 train=TrainConfig(out_dir=str(tmp_path), steps=STEPS, stop_after=3, log_every=1, plot=False))
    assert "step 2: the batch has no loss tokens (every label is -100): skipped without an update" in log
    assert [r["skipped"] for r in result.history if r["kind"] == "train"] == [0, 1, 0]
    assert int(result.state.opt_state["count"].asnumpy()) == 2


def test_float16_loss_scaling_skips_overflow_then_grows(params):
    state = init_train_state(params, OPT, LS16)                       # float32 masters, fp16 compute
    before = _np(state.params)
    state1, m = train_step(state, train_batch(_rows(B, 5), PAD), CFG16, OPT, LS16, clip_norm=CLIP)
    assert m["skipped"] == 1.0 and not np.isfinite(m["grad_norm"])
    assert all(np.array_equal(v, before[k]) for k, v in _np(state1.params).items())   # update skipped
    assert int(state1.opt_state["count"].asnumpy()) == 0            # lr schedule did not advance
    assert int(state1.step.asnumpy()) == 1                             # the batch was consumed
    assert float(state1.loss_scale["scale"].asnumpy()) == 2.0 ** 23
    assert int(state1.loss_scale["good_steps"].asnumpy()) == 0
    history, state = [m], state1
    for i in range(14):
        state, m = train_step(state, train_batch(_rows(B, 5), PAD), CFG16, OPT, LS16, clip_norm=CLIP)
        history.append(m)
    skipped = [h["skipped"] for h in history]
    first_ok = skipped.index(0.0)
    assert all(skipped[:first_ok]) and first_ok >= 1
    ok_scale = history[first_ok]["loss_scale"]
    assert ok_scale == 2.0 ** 24 / 2 ** first_ok                       # halved once per overflow
    # growth_interval=2: two finite steps in a row double the scale
    if history[first_ok + 1]["skipped"] == 0.0:
        assert history[first_ok + 1]["loss_scale"] == 2 * ok_scale
    applied = int(state.opt_state["count"].asnumpy())
    assert applied == skipped.count(0.0) and applied >= 5
    assert np.isfinite([h["loss"] for h in history]).all()
    assert history[-1]["loss"] < history[0]["loss"]


@pytest.mark.parametrize("recompute", ["none", "selective"])
def test_donated_step_equals_the_functional_step_and_keeps_its_buffers(params, recompute):
    """train_step(donate=True) (the fused in-place AdamW over ms.Parameter buffers, what fit runs)
    == the functional step, over 3 steps with clipping, for the unrolled and the layer-by-layer
    update; the same buffers come back every step."""
    from tc2.step import donatable
    a = init_train_state(params, OPT)
    b = donatable(init_train_state(params, OPT))
    ids = [id(x) for x in tree_flatten_with_names(b.params).values()]
    for i in range(3):
        batch = train_batch(_rows(B, seed=10 + i), PAD)
        a, ma = train_step(a, batch, CFG, OPT, clip_norm=CLIP, recompute=recompute)
        b, mb = train_step(b, batch, CFG, OPT, clip_norm=CLIP, recompute=recompute, donate=True)
        assert mb["loss"] == pytest.approx(ma["loss"], rel=1e-6) and mb["lr"] == ma["lr"]
        assert mb["grad_norm"] == pytest.approx(ma["grad_norm"], rel=1e-5)
    assert [id(x) for x in tree_flatten_with_names(b.params).values()] == ids
    # The two paths' gradients come from different graphs (last-bit differences). Where a
    # gradient is a near-cancellation (|g| ~ eps), Adam's m / (sqrt(v) + eps) follows those bits,
    # so the weights are compared to 0.2% of one step (lr 1e-2); the moments, elementwise
    # averages of the gradients, to float32 rounding.
    for k, v in _np(a.params).items():
        np.testing.assert_allclose(_np(b.params)[k], v, rtol=1e-5, atol=2e-5, err_msg=k)
    for k, v in tree_flatten_with_names(a.opt_state).items():
        np.testing.assert_allclose(tree_flatten_with_names(b.opt_state)[k].asnumpy(), v.asnumpy(),
                                   rtol=1e-4, atol=1e-9, err_msg=k)
    assert not np.allclose(_np(b.params)["ln_f"], 1.0)          # the buffers really moved


def test_a_donated_float16_overflow_writes_nothing(params):
    from tc2.step import donatable
    state = donatable(init_train_state(params, OPT, LS16))
    before = _np(state.params)
    state, m = train_step(state, train_batch(_rows(B, 5), PAD), CFG16, OPT, LS16, clip_norm=CLIP, donate=True)
    assert m["skipped"] == 1.0
    assert all(np.array_equal(v, before[k]) for k, v in _np(state.params).items())
    assert int(state.opt_state["count"].asnumpy()) == 0


def test_donation_is_refused_where_it_cannot_happen(params):
    """An optimizer without an in-place form (a chain) cannot write into the buffers: say so."""
    from tc2.optim import chain, clip_by_global_norm
    opt = chain(clip_by_global_norm(1.0), adamw(1e-3))
    state = init_train_state(params, opt)
    with pytest.raises(ValueError, match=re.escape("train_step(donate=True) is not possible here: the optimizer has no in-place form")):
        train_step(state, train_batch(_rows(B, 5), PAD), CFG, opt, donate=True)


# --------------------------------------------------------------------------- loop + resume


def _losses(result):
    return {r["step"]: r["loss"] for r in result.history if r["kind"] == "train"}


@pytest.fixture(scope="module")
def resume_runs(tmp_path_factory, params):
    """Straight 8 steps vs 4 steps + resume + 4 steps (fp32), logging every step."""
    root = tmp_path_factory.mktemp("resume")
    rows = _rows(24, seed=2)
    ev = eval_batches(_rows(3, seed=9), 2, PAD)
    kw = dict(steps=STEPS, log_every=1, save_every=4, keep=2)
    logs = {"a": [], "b1": [], "b2": []}
    a = fit(params, CFG, _batches(rows), optim=OCFG, eval_batches=ev, log=logs["a"].append,
            train=TrainConfig(out_dir=str(root / "a"), stop_after=8, **kw))
    b1 = fit(params, CFG, _batches(rows), optim=OCFG, eval_batches=ev, log=logs["b1"].append,
             train=TrainConfig(out_dir=str(root / "b"), stop_after=4, **kw))
    b2 = fit(init_params(CFG, seed=123), CFG, _batches(rows), optim=OCFG, eval_batches=ev,
             log=logs["b2"].append, train=TrainConfig(out_dir=str(root / "b"), stop_after=8, resume=True, **kw))
    return dict(root=root, rows=rows, a=a, b1=b1, b2=b2, logs=logs, kw=kw)


def test_resume_is_bit_exact(resume_runs):
    a, b1, b2 = resume_runs["a"], resume_runs["b1"], resume_runs["b2"]
    la, lb = _losses(a), {**_losses(b1), **_losses(b2)}
    assert sorted(la) == list(range(1, 9)) and sorted(lb) == list(range(1, 9))
    assert la == lb                                                   # bit-exact, every step
    pa, pb = _np(a.state.params), _np(b2.state.params)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    oa, ob = _np(a.state.opt_state), _np(b2.state.opt_state)
    assert all(np.array_equal(oa[k], ob[k]) for k in oa)
    ea = [r for r in a.history if r["kind"] == "eval"]
    eb = [r for r in b1.history + b2.history if r["kind"] == "eval"]
    assert [r["step"] for r in ea] == [8] and [r["step"] for r in eb] == [4, 8]   # eval ends each run
    assert ea[-1] == eb[-1]
    assert any("resume: continuing from" in line and "step_00000004" in line for line in resume_runs["logs"]["b2"])
    assert la[8] < la[1]
    # metrics.jsonl of the resumed run holds each step once
    with open(os.path.join(resume_runs["root"], "b", "metrics.jsonl")) as f:
        steps = [json.loads(line)["step"] for line in f if json.loads(line)["kind"] == "train"]
    assert steps == list(range(1, 9))
    # the data cursor in state.json matches the straight run's
    rec = validate_checkpoint(os.path.join(resume_runs["root"], "b", "step_00000008"))
    assert rec["data"] == validate_checkpoint(os.path.join(resume_runs["root"], "a", "step_00000008"))["data"]


def test_resume_without_a_data_cursor_skips_used_batches(resume_runs, params, tmp_path):
    rows, kw = resume_runs["rows"], resume_runs["kw"]

    def plain():                                          # no state_dict(): resume must skip
        for r in BatchIterator(rows, B, seed=1, num_epochs=None):
            yield train_batch(r, PAD)
    fit(params, CFG, plain(), optim=OCFG, log=lambda s: None,
        train=TrainConfig(out_dir=str(tmp_path), stop_after=4, plot=False, **kw))
    log = []
    c = fit(params, CFG, plain(), optim=OCFG, log=log.append,
            train=TrainConfig(out_dir=str(tmp_path), stop_after=8, resume=True, plot=False, **kw))
    assert any("skipping 4 batches" in line for line in log)
    pa, pc = _np(resume_runs["a"].state.params), _np(c.state.params)
    assert all(np.array_equal(pa[k], pc[k]) for k in pa)


def test_interrupt_saves_the_last_complete_step_and_resumes_exactly(resume_runs, params, tmp_path, monkeypatch):
    import tc2.train.loop as loop
    rows, kw = resume_runs["rows"], resume_runs["kw"]
    real, calls = loop.train_step, []

    def interrupted(*a, **k):                              # Ctrl-C during the 6th step
        calls.append(1)
        if len(calls) == 6:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(loop, "train_step", interrupted)
    log = []
    with pytest.raises(KeyboardInterrupt):
        fit(params, CFG, _batches(rows), optim=OCFG, log=log.append,
            train=TrainConfig(out_dir=str(tmp_path), stop_after=8, plot=False, **kw))
    assert any("interrupted during step 6: saving step 5" in line for line in log)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [4, 5]
    monkeypatch.setattr(loop, "train_step", real)
    c = fit(params, CFG, _batches(rows), optim=OCFG, log=lambda s: None,
            train=TrainConfig(out_dir=str(tmp_path), stop_after=8, resume=True, plot=False, **kw))
    pa, pc = _np(resume_runs["a"].state.params), _np(c.state.params)
    assert all(np.array_equal(pa[k], pc[k]) for k in pa)


def test_loop_outputs_progress_metrics_plot_and_hf_checkpoints(resume_runs):
    from tc2.checkpoint.hf import load_hf
    root, logs = resume_runs["root"], resume_runs["logs"]["a"]
    progress = [line for line in logs if line.startswith("step ")]
    assert len(progress) == 8
    for field in ("loss ", "lr ", "gnorm ", "tok/s", "elapsed ", "ETA "):
        assert field in progress[-1]
    assert any(line.startswith("eval ") and "perplexity" in line for line in logs)
    recs = [json.loads(line) for line in open(root / "a" / "metrics.jsonl")]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert set(train_recs[0]) >= {"step", "loss", "lr", "grad_norm", "tokens_per_s", "tokens", "loss_tokens"}
    assert train_recs[-1]["tokens"] == 8 * B * T
    ev = [r for r in recs if r["kind"] == "eval"][0]
    assert ev["eval_ppl"] == pytest.approx(np.exp(ev["eval_loss"]), rel=1e-9)
    assert (root / "a" / "loss_curve.png").is_file()                  # pillow is installed
    assert [os.path.basename(p) for _, p in list_checkpoints(root / "a")] == ["step_00000004", "step_00000008"]
    params, cfg = load_hf(str(root / "a" / "step_00000008"))         # plain HF layout
    assert cfg.hidden_size == CFG.hidden_size
    pa = _np(resume_runs["a"].state.params)
    assert all(np.array_equal(v, pa[k]) for k, v in _np(params).items())


def test_fit_refuses_a_used_out_dir_without_resume(resume_runs, params):
    with pytest.raises(FileExistsError, match="resume"):
        fit(params, CFG, _batches(resume_runs["rows"]), optim=OCFG, log=lambda s: None,
            train=TrainConfig(out_dir=str(resume_runs["root"] / "a"), steps=STEPS))


def test_float16_resume_restores_the_loss_scale(params, tmp_path):
    rows = _rows(24, seed=4)
    kw = dict(steps=STEPS, log_every=1, save_every=4, keep=2, plot=False, loss_scale=2.0 ** 24,
              loss_scale_growth_interval=2)
    quiet = dict(optim=OCFG, log=lambda s: None)
    a = fit(params, CFG16, _batches(rows), train=TrainConfig(out_dir=str(tmp_path / "a"), stop_after=8, **kw), **quiet)
    fit(params, CFG16, _batches(rows), train=TrainConfig(out_dir=str(tmp_path / "b"), stop_after=4, **kw), **quiet)
    b = fit(params, CFG16, _batches(rows), train=TrainConfig(out_dir=str(tmp_path / "b"), stop_after=8,
                                                              resume=True, **kw), **quiet)
    assert sum(r["skipped"] for r in a.history if r["kind"] == "train") >= 1
    pa, pb = _np(a.state.params), _np(b.state.params)
    assert all(np.array_equal(pa[k], pb[k]) for k in pa)
    sa, sb = _np(a.state.loss_scale), _np(b.state.loss_scale)
    assert sorted(sa) == ["good_steps", "scale"] and all(np.array_equal(sa[k], sb[k]) for k in sa)


def _nan_after_two(step):
    """A schedule that turns the third update's learning rate into NaN."""
    s = step.astype(ms.float32) if isinstance(step, ms.Tensor) else ms.Tensor(step, ms.float32)
    return ops.where(s >= 2.0, s * float("nan"), s * 0.0 + 1e-3)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(params, tmp_path):
    rows = _rows(24, seed=6)
    bad = adamw(_nan_after_two)
    with pytest.raises(NonFiniteLossError, match="step_00000002") as err:
        fit(params, CFG, _batches(rows), optim=bad, log=lambda s: None,
            train=TrainConfig(out_dir=str(tmp_path), steps=6, log_every=1, save_every=2, plot=False))
    assert "step 4" in str(err.value)
    path, refused = latest_checkpoint(str(tmp_path))
    assert os.path.basename(path) == "step_00000002" and not refused
    assert [os.path.basename(p) for _, p in list_checkpoints(str(tmp_path))] == ["step_00000002"]
    state, _, _ = load_checkpoint(path, bad)
    assert all(np.isfinite(v).all() for v in _np(state.params).values())


# --------------------------------------------------------------------------- checkpoints


def _corrupt(path, how):
    if how == "truncated weights":
        f = os.path.join(path, "model.safetensors")
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) // 2)
        return "model.safetensors"
    if how == "no state.json":
        os.remove(os.path.join(path, "state.json"))
        return "state.json is missing"
    if how == "truncated optimizer":
        f = os.path.join(path, "optimizer.safetensors")
        with open(f, "r+b") as fh:
            fh.truncate(os.path.getsize(f) - 8)
        return "optimizer.safetensors"
    raise ValueError(how)


@pytest.mark.parametrize("how", ["truncated weights", "no state.json", "truncated optimizer"])
def test_corrupt_or_partial_checkpoint_is_refused_and_previous_loads(resume_runs, tmp_path, how):
    run = tmp_path / "run"
    shutil.copytree(resume_runs["root"] / "b", run)
    newest = str(run / "step_00000008")
    needle = _corrupt(newest, how)
    with pytest.raises(CheckpointError, match=needle) as err:
        load_checkpoint(newest, OPT)
    assert "step_00000008" in str(err.value)
    path, refused = latest_checkpoint(str(run))
    assert os.path.basename(path) == "step_00000004" and len(refused) == 1 and "step_00000008" in refused[0]
    state, cfg, rec = load_checkpoint(path, OPT, expect_config=CFG)
    ref = _np(resume_runs["b1"].state.params)
    assert all(np.array_equal(v, ref[k]) for k, v in _np(state.params).items())
    assert rec["step"] == 4 and int(state.step.asnumpy()) == 4


def test_save_is_atomic_and_prunes(resume_runs, tmp_path, monkeypatch):
    import tc2.train.checkpoints as tc
    state = resume_runs["b1"].state
    first = save_checkpoint(str(tmp_path), state, CFG)

    def disk_full(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(tc, "SafetensorsWriter", disk_full)            # fails after the weights are written
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(str(tmp_path), state.replace(step=ms.Tensor(5, ms.int32)), CFG)
    assert sorted(os.listdir(tmp_path)) == [os.path.basename(first)]     # no partial dir, no temp
    validate_checkpoint(first)
    monkeypatch.undo()
    for s in (6, 7, 8):
        save_checkpoint(str(tmp_path), state.replace(step=ms.Tensor(s, ms.int32)), CFG, keep=2)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [7, 8]
    with pytest.raises(CheckpointError, match="differs"):
        load_checkpoint(str(tmp_path / "step_00000008"), OPT, expect_config=CFG.replace(n_layer=1))


def test_evaluate_is_the_token_weighted_loss_over_all_rows(params):
    rows = _rows(3, seed=9)
    batches = eval_batches(rows, 2, PAD)                              # 2 batches, the last one filled
    assert len(batches) == 2 and batches[1]["tokens"].shape == (2, T)
    got = evaluate(params, CFG, batches)
    full = train_batch(rows, PAD)
    logits, _ = forward(params, ms.Tensor(full["tokens"]), CFG, **_masks(full))
    s, c = cross_entropy_sum(logits, ms.Tensor(full["labels"]))
    assert got["eval_tokens"] == int(c.asnumpy())
    assert got["eval_loss"] == pytest.approx(float(s.asnumpy()) / float(c.asnumpy()), rel=1e-5)


# --------------------------------------------------------------------------- the recipe


def _recipe():
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "recipes"))
    import finetune
    return finetune


@pytest.mark.parametrize("name", ["tiny", "telechat2_7b", "telechat2_35b", "telechat2_115b"])
def test_recipe_configs_parse(name):
    fin = _recipe()
    path = os.path.join(os.path.dirname(__file__), "..", "recipes", "configs", f"finetune_{name}.yaml")
    p = fin.build_parser()
    init = p.instantiate(p.parse_args(["--config", path, "--optim.lr", "1e-4"]))
    assert init.optim.lr == 1e-4
    if name != "tiny":                                                 # the release's recipe, spec §9
        assert (init.optim.b1, init.optim.b2, init.optim.eps, init.optim.weight_decay) == (0.9, 0.95, 1e-8, 0.1)
        assert (init.optim.end_lr, init.optim.warmup_steps, init.optim.clip_norm) == (1.5e-5, 0, 1.0)
        assert init.data.seq_length == 8192 and init.model.dtype == "bfloat16"
        layout = {"telechat2_7b": (8, 1, 1, 1, "full"), "telechat2_35b": (1, 4, 4, 32, "full"),
                  "telechat2_115b": (8, 8, 8, 8, "selective")}[name]
        par = init.parallel
        assert (par.dp, par.tp, par.pp, par.micro_batches, par.recompute) == layout and par.sequence_parallel


def test_recipe_runs_end_to_end_on_jsonl(tmp_path, capsys):
    from tc2.checkpoint.hf import load_hf
    from tc2.data.synthetic import corpus_text, make_examples
    from tc2.data.tokenizer import train_tokenizer
    fin = _recipe()
    def mf_jsonl(examples, name):                        # MindFormers {input, output}: short rows
        with open(tmp_path / name, "w", encoding="utf-8") as f:
            for e in examples:
                f.write(json.dumps({"input": e.question, "output": e.answer}, ensure_ascii=False) + "\n")
        return str(tmp_path / name)
    train = mf_jsonl(make_examples(120, seed=1), "train.jsonl")
    ev = mf_jsonl(make_examples(12, seed=2, heldout=True), "eval.jsonl")
    tok = train_tokenizer(corpus_text(make_examples(400, seed=3)), str(tmp_path / "tok"), vocab_size=512)
    out = tmp_path / "run"
    argv = ["--config", os.path.join(os.path.dirname(__file__), "..", "recipes", "configs", "finetune_tiny.yaml"),
            "--model.overrides", "{}", "--data.train", train, "--data.eval", ev, "--data.tokenizer", tok,
            "--data.seq_length", str(T), "--optim.lr", "1e-2", "--optim.end_lr", "1e-3",
            "--optim.warmup_steps", "0", "--train.steps", str(STEPS), "--train.stop_after", "3",
            "--train.epochs", "null", "--train.global_batch", str(B), "--train.micro_batch", "2",
            "--train.log_every", "1", "--train.eval_every", "0", "--train.out_dir", str(out)]
    assert fin.main(argv) == 0
    printed = capsys.readouterr().out
    assert re.search(r"step +3/60 \| loss [0-9.]+ \| lr ", printed), printed
    assert "eval loss" in printed and "checkpoint" in printed
    params, cfg = load_hf(str(out / "step_00000003"))
    assert cfg.vocab_size == 512
    assert (out / "metrics.jsonl").is_file()
    from tc2.context import LOCAL
    from tc2.parallel.collectives import context_for
    from tc2.parallel.mesh import ParallelConfig
    from tc2.train.setup import DataConfig, ModelSource, RunConfig, prepare_finetune
    # --model.load: a fine-tune starts from an HF directory's weights (here: our checkpoint)
    run = prepare_finetune(ModelSource(load=str(out / "step_00000003")), DataConfig(train=train, tokenizer=tok, seq_length=T),
                           RunConfig(steps=5, global_batch=B, micro_batch=2, out_dir=str(tmp_path / "ft")), LOCAL,
                           log=lambda s: None)
    assert run.cfg == CFG and run.train.micro_batches == 2 and run.train.steps == 5
    assert all(np.array_equal(v, _np(params)[k]) for k, v in _np(run.params).items())
    capsys.readouterr()
    assert fin.main(argv + ["--parallel.dp", "8"]) == 2              # refuses a multi-device layout
    assert "the layout dp8 needs 8 processes" in capsys.readouterr().err   # outside msrun: a clear error
    with pytest.raises(ValueError, match="not executed yet.*zero=2"):   # planned-only modes: refused
        context_for(ParallelConfig(dp=2, zero=2))


# --------------------------------------------------------------------------- run guards


def test_a_second_run_on_a_busy_out_dir_fails_at_once(params, tmp_path, capsys):
    import subprocess
    import time
    from tc2.train.guard import OutDirInUse
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom tc2.train.guard import out_dir_lock\n"
                               "with out_dir_lock(sys.argv[1]):\n    print('held', flush=True)\n    time.sleep(120)\n",
                               str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3"})
    try:
        assert holder.stdout.readline().strip() == "held"
        t0 = time.perf_counter()
        with pytest.raises(OutDirInUse) as err:
            fit(params, CFG, _batches(_rows(8, seed=19)), optim=OCFG, log=lambda s: None,
                train=TrainConfig(out_dir=str(tmp_path), steps=2, plot=False))
        assert str(err.value).startswith(f"{tmp_path} is in use by another training run (pid {holder.pid} holds")
        assert time.perf_counter() - t0 < 5 and sorted(os.listdir(tmp_path)) == [".lock"]   # nothing written
        fin = _recipe()
        argv = ["--config", os.path.join(REPO, "recipes", "configs", "finetune_tiny.yaml"), "--train.out_dir",
                str(tmp_path), "--data.train", "nope.mindrecord"]
        assert fin.main(argv) == 2
        assert f"is in use by another training run (pid {holder.pid} holds" in capsys.readouterr().err
    finally:
        holder.kill()
        holder.wait()
    fit(params, CFG, _batches(_rows(8, seed=19)), optim=OCFG, log=lambda s: None,     # released with its holder
        train=TrainConfig(out_dir=str(tmp_path), steps=1, plot=False))


@pytest.fixture(scope="module")
def jsonl_data(tmp_path_factory):
    """A small MindFormers-format dataset and a tokenizer trained on its kind of text."""
    from tc2.data.synthetic import corpus_text, make_examples
    from tc2.data.tokenizer import train_tokenizer
    root = tmp_path_factory.mktemp("jsonl")
    with open(root / "train.jsonl", "w", encoding="utf-8") as f:
        for e in make_examples(120, seed=1):
            f.write(json.dumps({"input": e.question, "output": e.answer}, ensure_ascii=False) + "\n")
    tok = train_tokenizer(corpus_text(make_examples(400, seed=3)), str(root / "tok"), vocab_size=512)
    return str(root / "train.jsonl"), tok


def test_ctrl_c_saves_the_last_complete_step_and_says_how_to_resume(jsonl_data, tmp_path):
    """A real SIGINT to a running finetune.py (MindSpore turns it into SIGTERM): the step in flight
    finishes, it is saved, the run exits 130 naming the checkpoint; resuming continues from it."""
    import signal
    import subprocess
    train, tok = jsonl_data
    out = tmp_path / "run"
    argv = [sys.executable, os.path.join(REPO, "recipes", "finetune.py"), "--config",
            os.path.join(REPO, "recipes", "configs", "finetune_tiny.yaml"), "--model.overrides", "{}",
            "--data.train", train, "--data.eval", "null", "--data.tokenizer", tok, "--data.seq_length", str(T),
            "--train.steps", "500",
            "--train.epochs", "null", "--train.global_batch", str(B), "--train.micro_batch", str(B),
            "--train.log_every", "1", "--train.save_every", "0", "--train.plot", "false", "--train.out_dir", str(out)]
    env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    lines = []
    for line in proc.stdout:                                 # wait until training runs in graph mode
        lines.append(line)
        if re.match(r"step +3/500", line):
            break
    os.kill(proc.pid, signal.SIGINT)
    rest, err = proc.communicate(timeout=300)
    printed = "".join(lines) + rest
    assert proc.returncode == 130, printed[-2000:] + err[-2000:]
    done = re.search(r"interrupted after step (\d+): checkpoint (\S+); resume with --train.resume true", printed)
    assert done, printed[-2000:] + err[-2000:]
    step, ckpt = int(done.group(1)), done.group(2)
    assert step >= 3 and ckpt == str(out / f"step_{step:08d}") and [s for s, _ in list_checkpoints(str(out))] == [step]
    assert validate_checkpoint(ckpt)["step"] == step
    with open(out / "metrics.jsonl") as f:
        assert [json.loads(x)["step"] for x in f][-1] == step             # every finished step logged, no more
    r = subprocess.run(argv + ["--train.resume", "true", "--train.stop_after", str(step + 1)], capture_output=True,
                       text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"resume: continuing from {ckpt} (step {step})" in r.stdout
    assert [s for s, _ in list_checkpoints(str(out))] == [step, step + 1]

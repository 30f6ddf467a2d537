"""`generate` / `generate_ids`: greedy equals the full forward's argmax, streaming, stop ids,
budgets, batch invariance, seeded sampling, argument errors, and one compile per step shape."""
import mindspore as ms
import numpy as np
import pytest

import numpy_ref as ref
import tc2
from jit_count import compiled_graphs
from tc2.generate import generate, generate_ids, pack_prompts, prompt_bucket, stream_text
from tc2.sampling import SamplingConfig

CFG = tc2.tiny(n_layer=2)                      # training_seqlen 64: every test here stays below it
PROMPTS = [[1, 4, 17, 200, 33], [1, 4, 90, 91, 92, 93, 94, 95, 96, 97, 5], [1, 5]]
SAMPLE = SamplingConfig(do_sample=True, temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.1)


@pytest.fixture(scope="module")
def params():
    p = dict(tc2.init_params(CFG, seed=21))
    # larger weights than HF init: varied, well-separated logits (no argmax near-ties)
    p["layers"] = tuple({k: ms.Tensor(v.asnumpy() * (4 if v.ndim == 2 else 1)) for k, v in lp.items()}
                        for lp in p["layers"])
    p["lm_head"] = ms.Tensor(p["lm_head"].asnumpy() * 8)
    return p


@pytest.fixture(scope="module")
def greedy(params):
    return generate_ids(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=())


def test_greedy_is_the_argmax_of_the_full_forward_at_every_step(params, greedy):
    """Independent float64 model over prompt + generated tokens: position t's argmax must be the
    token generated after it (causal, and below training_seqlen the length does not matter)."""
    P = ref.to_numpy64(params)
    for r, (prompt, new) in enumerate(zip(PROMPTS, greedy)):
        assert len(new) == 20
        seq = np.array(prompt + new)
        logits = ref.forward(P, seq[None], CFG)[0, len(prompt) - 1:-1]            # [20, V]
        top2 = np.sort(logits, -1)[:, -2:]
        # float32 logits match float64 to 1e-4 (test_cache): a larger gap decides the argmax
        assert (top2[:, 1] - top2[:, 0]).min() > 2e-4, "precondition: no near-ties"
        assert list(logits.argmax(-1)) == new, f"row {r}"
    assert len({tuple(g) for g in greedy}) == 3 and len(set(greedy[0])) > 3      # not a degenerate model


def test_each_row_is_independent_of_the_batch(params, greedy):
    """Padding is positions and masks, never attention to pads: a row alone == the row in a batch."""
    for r in (0, 2):
        assert generate_ids(params, CFG, [PROMPTS[r]], max_new_tokens=20, stop_ids=())[0] == greedy[r]


def test_streaming_yields_what_generate_ids_collects(params, greedy):
    steps = list(generate(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=()))
    assert len(steps) == 20 and all(isinstance(s, tuple) and len(s) == 3 for s in steps)
    assert [[s[r] for s in steps] for r in range(3)] == greedy
    sampled = list(generate(params, CFG, PROMPTS, max_new_tokens=12, sampling=SAMPLE, seed=5, stop_ids=()))
    assert [[s[r] for s in sampled] for r in range(3)] == \
        generate_ids(params, CFG, PROMPTS, max_new_tokens=12, sampling=SAMPLE, seed=5, stop_ids=())


def test_stop_ids_end_rows_and_the_stop_token_is_excluded_by_default(params, greedy):
    stop = greedy[1][6]                                  # row 1 emits it at step 6 (maybe earlier too)
    first = {r: (g.index(stop) if stop in g else None) for r, g in enumerate(greedy)}
    steps = list(generate(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=(stop,)))
    out = [[s[r] for s in steps] for r in range(3)]
    for r, g in enumerate(greedy):
        k = first[r]
        if k is None:
            assert out[r] == g
        else:
            assert out[r][:k] == g[:k] and all(t is None for t in out[r][k:]), f"row {r}"
    assert len(steps) == (20 if None in first.values() else max(first.values()) + 1)
    kept = generate_ids(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=(stop,), include_stop=True)
    for r, g in enumerate(greedy):
        k = first[r]
        assert kept[r] == (g if k is None else g[:k + 1])


def test_all_rows_stopping_ends_the_stream_early(params, greedy):
    stops = tuple(g[2] for g in greedy)
    steps = list(generate(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=stops))
    assert len(steps) <= 3


def test_budget_is_capped_by_max_len_per_row(params, greedy):
    out = generate_ids(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=(), max_len=14)
    assert [len(o) for o in out] == [9, 3, 12]
    assert all(o == g[:len(o)] for o, g in zip(out, greedy))
    assert generate_ids(params, CFG, PROMPTS, max_new_tokens=0) == [[], [], []]


def test_seeded_sampling_is_reproducible(params):
    a = generate_ids(params, CFG, PROMPTS, max_new_tokens=12, sampling=SAMPLE, seed=5, stop_ids=())
    b = generate_ids(params, CFG, PROMPTS, max_new_tokens=12, sampling=SAMPLE, seed=5, stop_ids=())
    c = generate_ids(params, CFG, PROMPTS, max_new_tokens=12, sampling=SAMPLE, seed=6, stop_ids=())
    assert a == b and a != c


@pytest.mark.parametrize("layered, graphs, regraphs", [(True, 3, 5), (False, 1, 2)])
def test_decode_step_compiles_once_not_per_token(layered, graphs, regraphs):
    """A config no other test uses: the first call compiles exactly prefill + decode (each one
    graph unrolled; begin, one decoder layer and finish layered) over 40 tokens; later calls
    with other prompts/budgets in the same buckets compile nothing. A wider prompt block
    compiles again what depends on it (layered: not the decode step's final head, whose input
    is one token either way)."""
    cfg = tc2.tiny(n_layer=1, ffn_hidden_size=96 if layered else 80)
    p = tc2.init_params(cfg, seed=1)
    before = compiled_graphs()
    out = generate_ids(p, cfg, [[1, 2, 3], [4, 5]], max_new_tokens=40, stop_ids=(), layered=layered)
    assert [len(o) for o in out] == [40, 40]
    assert compiled_graphs() == before + 2 * graphs
    generate_ids(p, cfg, [[9] * 12, [7]], max_new_tokens=33, stop_ids=(), layered=layered)
    generate_ids(tc2.init_params(cfg, seed=2), cfg, [[6, 6]] * 2, max_new_tokens=64, stop_ids=(), layered=layered)
    assert compiled_graphs() == before + 2 * graphs
    generate_ids(p, cfg, [[9] * 17, [7]], max_new_tokens=5, stop_ids=(), layered=layered)  # block 16 -> 32
    assert compiled_graphs() == before + 2 * graphs + regraphs


def test_prompt_layout():
    b = pack_prompts([[7, 8, 9], [1]], CFG, max_new_tokens=70, max_len=40)
    assert b.tokens.shape == (2, 16) and b.tokens[1, -1] == 1 and np.all(b.tokens[1, :-1] == CFG.pad_token_id)
    assert list(b.positions[0, -3:]) == [0, 1, 2] and list(b.budgets) == [37, 39]
    assert b.cache_len == 16 + 64
    assert [prompt_bucket(n) for n in (1, 16, 17, 300, 512, 513, 1500)] == [16, 16, 32, 512, 512, 1024, 1536]


@pytest.mark.parametrize("prompts, err, match", [
    ([], ValueError, "empty"),
    ([1, 2, 3], TypeError, "single prompt pass"),
    ([[1, 2], []], ValueError, "prompt 1 is empty"),
    ([[1, 2], [3, 512]], ValueError, r"prompt 1, position 1: token id 512 is outside"),
    ([[1, 2], [0.5]], TypeError, "prompt 1 must be a flat list of int"),
    ("hello", TypeError, "list of token-id lists"),
])
def test_bad_prompts_raise_at_the_call(params, prompts, err, match):
    with pytest.raises(err, match=match):
        generate(params, CFG, prompts, max_new_tokens=3)


def test_bad_arguments_raise(params):
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(params, CFG, [[1]], max_new_tokens=-1)
    with pytest.raises(TypeError, match="SamplingConfig"):
        generate(params, CFG, [[1]], max_new_tokens=2, sampling={"do_sample": True})


# ---- the recipes: predict.py and chat.py ------------------------------------------------------

import importlib.util  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

from tc2.data.chat import render_chat  # noqa: E402
from tc2.checkpoint.hf import save_hf  # noqa: E402
from tc2.data.tokenizer import Tokenizer, train_tokenizer  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RCFG = tc2.tiny(n_layer=1)
CORPUS = ["hello world, this is a tiny chat corpus for tests.", "the quick brown fox jumps over the lazy dog",
          "你好，世界。今天天气很好。", "what is the answer? the answer is 42."] * 50


def _recipe(name):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", os.path.join(REPO, "recipes", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny HF-layout checkpoint with a trained 480-piece TeleChat-layout tokenizer inside."""
    d = tmp_path_factory.mktemp("tiny_ckpt")
    p = tc2.init_params(RCFG, seed=4)
    p = {**p, "layers": tuple({k: ms.Tensor(v.asnumpy() * (4 if v.ndim == 2 else 1)) for k, v in lp.items()}
                              for lp in p["layers"]),
         "lm_head": ms.Tensor(p["lm_head"].asnumpy() * 8)}
    save_hf(p, RCFG, str(d))
    train_tokenizer(CORPUS, str(d / "tokenizer"), vocab_size=480)
    return str(d)


def test_predict_recipe_end_to_end(model_dir, tmp_path, capsys):
    predict = _recipe("predict")
    lines = [{"input": "hello world"}, {"input": "<_user>what is the answer?<_bot>42<_end><_user>the quick fox"},
             {"input": "你好", "system": "be brief"}]
    inp = tmp_path / "input.jsonl"
    inp.write_text("\n".join(json.dumps(x, ensure_ascii=False) for x in lines) + "\n", encoding="utf-8")
    out = tmp_path / "out" / "pred.jsonl"
    argv = ["--checkpoint", model_dir, "--input_file", str(inp), "--output_file", str(out),
            "--batch_size", "2", "--max_new_tokens", "6", "--max_len", "128", "--system", "You are a test."]
    assert predict.main(argv) == 0
    rows = [json.loads(x) for x in out.read_text(encoding="utf-8").splitlines()]
    assert [r["input"] for r in rows] == [x["input"] for x in lines]
    printed = [json.loads(x) for x in capsys.readouterr().out.splitlines()]
    assert sorted(map(json.dumps, printed)) == sorted(map(json.dumps, rows))
    # the same thing by hand with the library
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    params, cfg = tc2.load_hf(model_dir)
    msgs = [[{"role": "system", "content": "You are a test."}, {"role": "user", "content": "hello world"}],
            [{"role": "system", "content": "You are a test."}, {"role": "user", "content": "what is the answer?"},
             {"role": "bot", "content": "42"}, {"role": "user", "content": "the quick fox"}],
            [{"role": "system", "content": "be brief"}, {"role": "user", "content": "你好"}]]
    prompts = [render_chat(m, tok) for m in msgs]
    want = [generate_ids(params, cfg, [p], max_new_tokens=6, sampling=SamplingConfig(), max_len=128,
                         vocab_limit=tok.vocab_size)[0] for p in prompts]     # batch 1: the chat tests' graphs
    assert max(max(w) for w in want if w) < tok.vocab_size
    assert [r["output"] for r in rows] == [tok.decode(w, skip_special_tokens=True) for w in want]
    assert any(r["output"] for r in rows)


def test_predict_recipe_errors_name_the_line_and_write_nothing(model_dir, tmp_path, capsys):
    predict = _recipe("predict")
    inp = tmp_path / "bad.jsonl"
    inp.write_text('{"input": "ok"}\n{"input": oops}\n', encoding="utf-8")
    out = tmp_path / "pred.jsonl"
    base = ["--checkpoint", model_dir, "--output_file", str(out), "--max_new_tokens", "4"]
    assert predict.main(base + ["--input_file", str(inp)]) == 2
    assert "bad.jsonl:2: not valid JSON" in capsys.readouterr().err and not out.exists()
    inp.write_text('{"question": "x"}\n', encoding="utf-8")
    assert predict.main(base + ["--input_file", str(inp)]) == 2
    assert "line 1: expected an object with a string 'input'" in capsys.readouterr().err
    inp.write_text('{"input": "' + "hello world " * 80 + '"}\n', encoding="utf-8")
    assert predict.main(base + ["--input_file", str(inp), "--max_len", "64", "--system", "x"]) == 2
    assert "line 1:" in capsys.readouterr().err and not out.exists()
    assert predict.main(["--checkpoint", str(tmp_path / "nope"), "--input_file", str(inp)]) == 2
    assert "no directory" in capsys.readouterr().err
    inp.write_text('{"input": "hi", "system": "x"}\n', encoding="utf-8")
    assert predict.main(base + ["--input_file", str(inp), "--style", "115b"]) == 2
    assert "line 1: the 115b prompt format has no system prompt" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["predict_7b", "predict_115b"])
def test_predict_configs_parse(name):
    cfg = _recipe("predict").build_parser().parse_args(
        ["--config", os.path.join(REPO, "recipes", "configs", f"{name}.yaml"), "--checkpoint", "c",
         "--input_file", "i"])
    assert cfg.max_new_tokens == 4096 and cfg.top_k == 5 and cfg.style in ("template", "115b")


def test_chat_session_commands_and_history(model_dir):
    from tc2.inference.chat import ChatSession
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    params, cfg = tc2.load_hf(model_dir)
    out, err = io.StringIO(), io.StringIO()
    gen = dict(sampling=SamplingConfig(), stop_ids=(tok.eos_id,), vocab_limit=tok.vocab_size)
    chat = ChatSession(params, cfg, tok, gen, style="template", system="hi", max_len=128, max_new_tokens=6,
                       out=out, err=err)
    a1 = chat.answer("hello world")
    assert out.getvalue() == a1 + "\n"                      # streamed text == the final answer
    chat.answer("the quick fox")
    assert [m["role"] for m in chat.history] == ["user", "bot", "user", "bot"]
    assert chat.history[2]["content"] == "the quick fox"
    ids = chat.prompt_ids("again", 1000)
    assert ids == render_chat([{"role": "system", "content": "hi"}] + chat.history +
                              [{"role": "user", "content": "again"}], tok)
    chat.command("/reset")
    assert chat.history == [] and chat.system == "hi"
    chat.answer("hello")
    chat.command("/system You are terse.")
    assert chat.history == [] and chat.system == "You are terse."
    assert tok.decode(chat.prompt_ids("x", 1000)).startswith("<_system>You are terse.")
    # history truncation: a tight context keeps the newest rounds only, and the prompt fits
    chat.history = [{"role": r, "content": f"{q} {k}"} for k in range(3)
                    for r, q in (("user", "the quick brown fox"), ("bot", "what is the answer?"))]
    limit = len(render_chat([{"role": "system", "content": chat.system}] + chat.history[-2:]
                            + [{"role": "user", "content": "x"}], tok))
    ids = chat.prompt_ids("x", limit)
    assert len(ids) <= limit and len(chat.history) == 2 and "dropped" in err.getvalue()
    assert chat.history[0]["content"] == "the quick brown fox 2"
    with pytest.raises(ValueError, match="at most 5 fit"):
        chat.prompt_ids("x", 5)


def test_chat_main_loop_in_process(model_dir):
    chat_mod = _recipe("chat")
    out, err = io.StringIO(), io.StringIO()
    argv = ["--checkpoint", model_dir, "--max_new_tokens", "6", "--max_len", "128", "--system", "hi"]
    assert chat_mod.main(argv, stdin=io.StringIO("hello world\n\n/help\n/quit\nnever read\n"),
                         stdout=out, stderr=err) == 0
    assert out.getvalue().count("bot> ") == 1 and "commands:" in err.getvalue()
    assert chat_mod.main(argv + ["--style", "115b"], stdin=io.StringIO(""), stdout=out, stderr=err) == 2
    assert chat_mod.main(argv[:4] + ["--style", "115b"], stdin=io.StringIO("/system x\n"), stdout=out,
                         stderr=err) == 0                                     # EOF after a refused command
    assert "no system prompt" in err.getvalue()


def test_chat_recipe_in_a_subprocess_exits_cleanly_at_eof(model_dir):
    stdin = "hello world\n/system You are terse.\nthe quick fox\n/reset\n\nwhat is the answer?\n"
    env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3"}
    r = subprocess.run([sys.executable, os.path.join(REPO, "recipes", "chat.py"), "--checkpoint", model_dir,
                        "--max_new_tokens", "4", "--max_len", "128", "--system", "hi"],
                       input=stdin, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.count("bot> ") == 3 and r.stdout.rstrip().endswith("user>")
    assert "system prompt set" in r.stderr and "conversation cleared" in r.stderr


class _Transcript:
    """A process's stdout as it arrives (prompts end without a newline, so no readline)."""

    def __init__(self, proc):
        self.proc, self.text = proc, ""

    def wait_for(self, text, count, timeout=240):
        """Read until `text` has appeared `count` times in the whole transcript."""
        import select
        import time
        end = time.monotonic() + timeout
        while self.text.count(text) < count:
            ready, _, _ = select.select([self.proc.stdout], [], [], max(end - time.monotonic(), 0))
            chunk = os.read(self.proc.stdout.fileno(), 4096) if ready else b""
            assert chunk, f"no {text!r} x{count} in time (exit status {self.proc.poll()}); got {self.text[-500:]!r}"
            self.text += chunk.decode("utf-8", "replace")
        return self.text


def test_ctrl_c_at_the_chat_prompt_keeps_the_session(model_dir):
    """A real SIGINT at the prompt, before and after an answer (MindSpore's handler, which turns
    SIGINT into a SIGTERM that ends the process, is installed once the model is loaded): the
    session goes on; a real SIGTERM at the prompt ends it (status 143)."""
    import signal
    env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "recipes", "chat.py"), "--checkpoint", model_dir,
                             "--max_new_tokens", "4", "--max_len", "128"], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env)
    out = _Transcript(proc)
    try:
        out.wait_for("user> ", 1)
        proc.send_signal(signal.SIGINT)
        out.wait_for("(Ctrl-D quits)", 1)
        out.wait_for("user> ", 2)                                      # the session goes on
        proc.stdin.write(b"hello world\n")
        proc.stdin.flush()
        out.wait_for("user> ", 3)                                      # answered: graphs have run
        proc.send_signal(signal.SIGINT)
        out.wait_for("(Ctrl-D quits)", 2)
        text = out.wait_for("user> ", 4)
        assert text.count("bot> ") == 1 and proc.poll() is None, text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 143
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_ctrl_c_during_predict_exits_with_a_message_and_writes_nothing(model_dir, tmp_path):
    import signal
    inp, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    inp.write_text("".join(json.dumps({"input": f"hello world {i}"}) + "\n" for i in range(60)), encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": REPO, "GLOG_v": "3", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, os.path.join(REPO, "recipes", "predict.py"), "--checkpoint", model_dir,
                             "--input_file", str(inp), "--output_file", str(out), "--max_new_tokens", "40",
                             "--max_len", "128", "--system", "hi", "--batch_size", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    first = proc.stdout.readline()                                    # one answer done: graphs have run
    assert first.startswith('{"input"'), first + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert f"interrupted: nothing written to {out}" in err and not out.exists()


def test_vocab_limit_keeps_generation_inside_the_tokenizer(params, greedy):
    assert max(max(g) for g in greedy) >= 256                         # precondition: it would go above
    limited = generate_ids(params, CFG, PROMPTS, max_new_tokens=20, stop_ids=(), vocab_limit=256)
    assert all(t < 256 for row in limited for t in row)
    P = ref.to_numpy64(params)
    for prompt, new in zip(PROMPTS, limited):
        logits = ref.forward(P, np.array([prompt + new]), CFG)[0, len(prompt) - 1:-1, :256]
        assert list(logits.argmax(-1)) == new
    with pytest.raises(ValueError, match="vocab_limit"):
        generate(params, CFG, PROMPTS, max_new_tokens=2, vocab_limit=0)


def _check_stream_text(tok, text):
    ids = tok.encode(text)
    deltas = list(stream_text(tok, iter(ids)))
    assert "".join(deltas) == tok.decode(ids, skip_special_tokens=True)
    assert not any("\ufffd" in d for d in deltas)
    return ids, deltas


def test_stream_text_holds_back_split_characters(model_dir):
    """Characters outside the tiny tokenizer's pieces become 3 byte-fallback pieces each; the
    stream must never print half a character, and its deltas add up to the full decode."""
    tok = Tokenizer(os.path.join(model_dir, "tokenizer.model"))
    ids, deltas = _check_stream_text(tok, "hello 星辰语义 world 42")
    assert len(ids) > len(deltas) > 3                                  # held back, then released
    assert "".join(stream_text(tok, [ids[0], None, ids[1]])) == tok.decode(ids[:2])


def test_stream_text_with_the_real_tokenizer(shared_dir):
    tok = Tokenizer(os.path.join(shared_dir, "telechat2", "tokenizer.model"))
    _check_stream_text(tok, "你好，我是星辰语义大模型 TeleChat。😀 Numbers: 12345, code: `x = 1`\n")

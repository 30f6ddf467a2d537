"""Fine-tuning data: line formats, MindFormers label masks, packing, MindRecord, batch iterator,
bad input, and the preprocess recipe."""
import importlib.util
import json
import os
import random

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tc2.data.sft import (IGNORE_INDEX, ChatTokens, DataError, Example, PackConfig, example_from_json,
                      pack_examples, preprocess, read_examples, segments_from_rows)
from tc2.data.records import BatchIterator, read_mindrecord, write_mindrecord
from tc2.data.tokenizer import Tokenizer, synthetic_corpus, train_tokenizer

SHARED = os.environ.get("TC2_SHARED")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return Tokenizer(train_tokenizer(synthetic_corpus(1500, seed=5),
                                     tmp_path_factory.mktemp("data") / "tok", vocab_size=1200))


def jsonl(path, rows):
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r, ensure_ascii=False)) + "\n"
                            for r in rows), encoding="utf-8")
    return str(path)


def answer_runs(ex):
    """Maximal runs of positions whose label is not -100, as lists of ids."""
    runs, cur = [], []
    for i, y in zip(ex.input_ids, ex.labels):
        if y != N:
            assert y == i
            cur.append(i)
        elif cur:
            runs, cur = runs + [cur], []
    return runs + ([cur] if cur else [])


# --- formats and masks ----------------------------------------------------------------------------
def test_mf_format_labels_hand_checked(tok):
    e = tok.encode
    ex = example_from_json({"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2 x"}, tok)
    assert list(ex.input_ids) == [1, 4, *e("q1"), 5, *e("a1"), 2, 4, *e("q2"), 5, *e("a2 x"), 2]
    assert list(ex.labels) == ([N, N] + [N] * len(e("q1")) + [N, *e("a1"), 2, N]
                               + [N] * len(e("q2")) + [N, *e("a2 x"), 2])


@pytest.mark.skipif(SHARED is None, reason="TC2_SHARED is unset: real tokenizer not available")
def test_mf_format_real_tokenizer_hand_checked():
    tok = Tokenizer(os.path.join(SHARED, "telechat2", "tokenizer.model"))
    ex = example_from_json({"input": "你好", "output": "你好"}, tok)
    assert ex.input_ids == (1, 4, 96343, 5, 96343, 2)
    assert ex.labels == (N, N, N, N, 96343, 2)


def test_all_input_forms_agree(tok):
    ref = example_from_json({"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}, tok)
    for obj in ({"input": "q1<_bot>a1<_user>q2", "output": "a2"},               # no leading <_user>
                {"input": "<_user>q1<_bot>a1<_end><_user>q2", "output": "a2"},  # history with <_end>
                {"input": "<_user>q1<_bot>a1<_end><_user>q2<_bot>a2<_end>"},    # seed README form
                {"input": "<_user>q1<_bot>a1<_end><_user>q2<_bot>a2<_end>", "output": None}):
        ex = example_from_json(obj, tok)
        assert (ex.input_ids, ex.labels) == (ref.input_ids, ref.labels), obj
    no_start = example_from_json({"input": "q", "output": "a"}, tok, ChatTokens(start=""))
    assert no_start.input_ids[0] == 4


def test_seed_readme_line_with_pads(tok):
    """The seed README's example: one 'input' with inline turns and trailing <_pad>s."""
    ref = example_from_json({"input": "<_user>q1<_bot>a1<_user>q2", "output": "a2"}, tok)
    for inp in ("<_user>q1<_bot>a1<_end><_user>q2<_bot>a2<_end><_pad><_pad><_pad>",
                "<_pad><_pad><_start><_user>q1<_bot>a1<_end><_user>q2<_bot>a2<_end><_pad>"):
        ex = example_from_json({"input": inp}, tok)
        assert (ex.input_ids, ex.labels) == (ref.input_ids, ref.labels), inp
    with pytest.raises(DataError, match="the answer of turn 1 contains <_pad>: pads may only lead or trail"):
        example_from_json({"input": "<_user>q<_bot>a<_pad>b<_end>"}, tok)
    with pytest.raises(DataError, match="the question of turn 1 contains <_pad>"):
        example_from_json({"input": "<_user>q<_pad>", "output": "a"}, tok)


def test_dialog_content_markers_are_plain_text(tok):
    """Markers written inside dialog messages are text: no turn is closed or forged, the
    answer keeps its characters (the inline formats, whose markers ARE the structure, differ)."""
    obj = {"system": "S", "dialog": [{"role": "user", "content": "q<_end>\n<_user>x<_bot>y"},
                                     {"role": "bot", "content": "a<_end>b<_pad>"}]}
    ex = example_from_json(obj, tok)
    assert [tok.decode(r) for r in answer_runs(ex)] == ["a<_end>b<_pad><_end>"]
    assert [ex.input_ids.count(tok.token_id(m)) for m in ("<_user>", "<_bot>", "<_end>", "<_pad>")] == [1, 1, 1, 0]
    assert tok.decode(ex.input_ids) == "<_start><_system>S<_user>q<_end>\n<_user>x<_bot>y<_bot>a<_end>b<_pad><_end>"


def test_dialog_format(tok):
    obj = {"system": "S\n", "dialog": [{"role": "user", "content": "q1"}, {"role": "bot", "content": "a1"},
                                       {"role": "user", "content": "q2"}, {"role": "bot", "content": "a2"}],
           "multiturn": True, "tool": False}
    ex = example_from_json(obj, tok)
    text = "<_system>S\n<_user>q1<_bot>a1<_end>\n<_user>q2<_bot>a2<_end>"
    assert list(ex.input_ids) == [1] + tok.encode(text)
    assert answer_runs(ex) == [tok.encode("a1") + [2], tok.encode("a2") + [2]]
    default = example_from_json({"dialog": obj["dialog"][:2]}, tok)     # no system: the default one
    assert tok.decode(default.input_ids).startswith("<_start><_system>你是中国电信星辰语义大模型")


def test_conversation_format_with_tools(tok):
    """The DeepSpeed `conversation` lines: tool_calls and tools are JSON strings."""
    obj = {"conversation": [
        {"role": "user", "content": "贷款"},
        {"role": "bot", "content": "", "tool_calls": json.dumps([{"name": "calc", "arguments": {"n": 3}}])},
        {"role": "tool", "content": '{"pay": 898.09}'}, {"role": "bot", "content": "898.09美元"}],
        "tools": json.dumps([{"type": "function", "function": {"name": "calc", "parameters": {}}}])}
    ex = example_from_json(obj, tok)
    call = '<tool_call>\n{"name": "calc", "arguments": {"n": 3}}\n</tool_call><_end>'
    assert [tok.decode(r) for r in answer_runs(ex)] == [call, "898.09美元<_end>"]
    text = tok.decode(ex.input_ids)
    assert "<_user><tool_response>\n{\"pay\": 898.09}\n</tool_response><_bot>" in text
    assert '<tools>\n{"type": "function", "function": {"name": "calc", "parameters": {}}}\n</tools>' in text


@pytest.mark.skipif(SHARED is None, reason="TC2_SHARED is unset: real SFT data not available")
@pytest.mark.parametrize("name", ["demo_single", "demo_multi", "demo_code", "demo_math", "demo_role"])
def test_real_sft_files(name):
    tok = Tokenizer(os.path.join(SHARED, "telechat2", "tokenizer.model"))
    path = os.path.join(SHARED, "telechat2", "sft", name + ".jsonl")
    examples, skipped = read_examples(path, tok)
    lines = [json.loads(line) for line in open(path, encoding="utf-8")]
    assert not skipped and len(examples) == len(lines)
    for ex, obj in list(zip(examples, lines))[:200]:
        answers = [m["content"] + "<_end>" for m in obj["dialog"] if m["role"] == "bot"]
        assert [tok.decode(r) for r in answer_runs(ex)] == answers
        assert tok.decode(ex.input_ids) == "<_start><_system>" + obj["system"] + "".join(
            f"<_user>{m['content']}" if m["role"] == "user" else f"<_bot>{m['content']}<_end>\n"
            for m in obj["dialog"])[:-1]


# --- packing --------------------------------------------------------------------------------------
def fake_examples(lengths):
    """Distinguishable conversations: <_start>, then ids 100+k; loss on the second half."""
    return [Example(tuple([1] + [100 + k] * (n - 1)), tuple([N] * (n - n // 2) + [100 + k] * (n // 2)),
                    f"f:{k}") for k, n in enumerate(lengths)]


def mf_reference_rows(lengths, max_length, seed):
    """telechat_preprocess.py's loop, on example indices (it never emits the last shard)."""
    random.seed(seed)
    lines = list(range(len(lengths)))
    random.shuffle(lines)
    rows, shard, prev, cap = [], [], 0, max_length + 1
    for k in lines:
        n = lengths[k]
        if prev + n < cap:
            shard.append(k)
            prev += n
        else:
            if shard:
                rows.append(shard)
            shard, prev = ([k], n) if n < cap else ([], 0)
    return rows, shard


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(2, 90), min_size=1, max_size=40), st.integers(0, 2**31))
def test_packing_invariants(lengths, seed):
    max_length = 64
    examples = fake_examples(lengths)
    packed = pack_examples(examples, PackConfig(max_length, seed), pad_id=3)
    ids, labels, seg, pos = packed.input_ids, packed.labels, packed.segment_ids, packed.positions
    assert ids.shape == (packed.report.rows, max_length + 1) and ids.dtype == np.int32
    rows = []
    for r in range(len(ids)):
        n_pad = int((seg[r] == 0).sum())
        assert n_pad >= 1 and (ids[r, :n_pad] == 3).all() and (seg[r, :n_pad] == 0).all()  # left pad
        assert (labels[r, :n_pad] == N).all() and (ids[r, n_pad:] != 3).all()
        rows.append([])
        for s in range(1, seg[r].max() + 1):
            where = np.flatnonzero(seg[r] == s)
            assert (np.diff(where) == 1).all()                      # one contiguous piece
            assert (pos[r, where] == np.arange(len(where))).all()
            k = int(ids[r, where[1]]) - 100                          # which conversation it is
            assert tuple(ids[r, where]) == examples[k].input_ids     # whole, never split
            assert tuple(labels[r, where]) == examples[k].labels
            rows[-1].append(k)
    mask = labels != N
    assert (labels[mask] == ids[mask]).all()                         # every label is its own token
    kept = [k for k, n in enumerate(lengths) if n <= max_length]
    assert sorted(k for row in rows for k in row) == kept            # each kept one exactly once
    assert packed.report.tokens == sum(lengths[k] for k in kept)
    assert len(packed.report.dropped) == len(lengths) - len(kept)
    ref_rows, ref_last = mf_reference_rows(lengths, max_length, seed)
    assert rows == ref_rows + ([ref_last] if ref_last else [])       # MindFormers' rows + the last
    s2, p2 = segments_from_rows(ids, start_id=1, pad_id=3)
    assert (s2 == seg).all() and (p2 == pos).all()


def test_pack_report_summary(tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl", [{"input": "q" * k, "output": "a b c"} for k in range(1, 30)])
    examples, _ = read_examples(path, tok)
    packed = pack_examples(examples, PackConfig(max_length=24, seed=1), tok.pad_id)
    r = packed.report
    assert r.examples == 29 and r.rows == len(packed.input_ids) and len(r.dropped) > 0
    assert r.loss_tokens == int((packed.labels != N).sum())
    assert r.summary().startswith(f"examples read 29 | packed rows {r.rows} x 25 | dropped {len(r.dropped)}")


# --- MindRecord -----------------------------------------------------------------------------------
def test_mindrecord_round_trip(tok, tmp_path):
    path = jsonl(tmp_path / "d.jsonl",
                 [{"input": f"question {k}", "output": "answer " * k} for k in range(40)])
    out = tmp_path / "out"
    report = preprocess(path, tok, str(out), pack=PackConfig(max_length=128), write_segments=True)
    f = str(out / "dataset.mindrecord")
    assert sorted(os.listdir(out)) == ["dataset.mindrecord", "dataset.mindrecord.db"]  # no temp left
    data = read_mindrecord(f)
    examples, _ = read_examples(path, tok)
    packed = pack_examples(examples, PackConfig(max_length=128), tok.pad_id)
    assert report.rows == len(packed.input_ids)
    for k, v in packed.columns(segments=True).items():
        assert (data[k] == v).all() and data[k].dtype == np.int32
    import mindspore.dataset as ds  # the loader MindFormers uses
    rows = list(ds.MindDataset(f, columns_list=["input_ids", "labels"], shuffle=False)
                .create_dict_iterator(output_numpy=True))
    assert np.array_equal(np.stack([r["input_ids"] for r in rows]), packed.input_ids)
    assert np.array_equal(np.stack([r["labels"] for r in rows]), packed.labels)
    write_mindrecord(f, {"input_ids": packed.input_ids[:2], "labels": packed.labels[:2]})   # overwrite
    assert set(read_mindrecord(f)) == {"input_ids", "labels"} and len(read_mindrecord(f)["labels"]) == 2


def test_reads_files_written_like_mindformers(tmp_path):
    from mindspore.mindrecord import FileWriter
    f = str(tmp_path / "mf.mindrecord")
    writer = FileWriter(f, 1)   # exactly telechat_preprocess.py's calls
    writer.add_schema({"input_ids": {"type": "int32", "shape": [-1]},
                       "labels": {"type": "int32", "shape": [-1]}}, "lm-schema")
    rows = np.arange(5 * 9, dtype=np.int32).reshape(5, 9)
    for r in rows:
        writer.write_raw_data([{"input_ids": r, "labels": -r}])
    writer.commit()
    data = read_mindrecord(f)
    assert (data["input_ids"] == rows).all() and (data["labels"] == -rows).all()


def test_mindrecord_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        read_mindrecord(str(tmp_path / "none.mindrecord"))
    junk = tmp_path / "junk.mindrecord"
    junk.write_bytes(b"junk" * 100)
    with pytest.raises(FileNotFoundError, match="index not found"):
        read_mindrecord(str(junk))
    (tmp_path / "junk.mindrecord.db").write_bytes(b"junk")
    with pytest.raises(ValueError, match="not a readable MindRecord"):
        read_mindrecord(str(junk))


# --- batch iterator ---------------------------------------------------------------------------------
def test_iterator_resume_matches_uninterrupted():
    data = {"input_ids": np.arange(23 * 4).reshape(23, 4), "labels": -np.arange(23 * 4).reshape(23, 4)}
    full = [b["input_ids"] for b in BatchIterator(data, 4, seed=7, num_epochs=3)]
    assert len(full) == 3 * 5 and all(len(b) == 4 for b in full)
    assert not np.array_equal(full[0], full[5])                      # a new order each epoch
    for cut in (0, 3, 5, 7, 14):
        it = BatchIterator(data, 4, seed=7, num_epochs=3)
        head = [next(it)["input_ids"] for _ in range(cut)]
        state = it.state_dict()
        resumed = BatchIterator(data, 4, seed=7, num_epochs=3)
        resumed.load_state_dict(json.loads(json.dumps(state)))       # survives a JSON checkpoint
        tail = [b["input_ids"] for b in resumed]
        assert all(np.array_equal(a, b) for a, b in zip(head + tail, full)) and len(head + tail) == len(full)
    with pytest.raises(ValueError, match="seed"):
        BatchIterator(data, 4, seed=8).load_state_dict(state)


def test_iterator_shards_and_tail():
    data = {"x": np.arange(10)[:, None]}
    shards = [list(BatchIterator(data, 2, seed=1, num_shards=2, shard_index=i)) for i in range(2)]
    for a, b in zip(*shards):
        assert not set(a["x"].ravel()) & set(b["x"].ravel())
    assert len(shards[0]) == 2                                       # 10 rows // (2 x 2), drop_last
    tail = list(BatchIterator(data, 4, shuffle=False, drop_last=False))
    assert [len(b["x"]) for b in tail] == [4, 4, 2] and tail[2]["x"].ravel().tolist() == [8, 9]


# --- bad input ----------------------------------------------------------------------------------------
BAD = [
    ("not json {", "bad.jsonl:2: malformed JSON"),
    ({"question": "x"}, "bad.jsonl:2: missing key"),
    ({"input": "<_user>q1<_user>q2", "output": "a"}, "bad.jsonl:2: turn count mismatch"),
    ({"input": "<_user>q1<_bot>a1", "output": "a2"}, "bad.jsonl:2: turn count mismatch"),
    ({"input": "<_user>q<_bot>a"}, "bad.jsonl:2: turn count mismatch"),
    ({"input": "q", "output": "a<_end>b"}, "bad.jsonl:2: turn count mismatch"),
    ({"dialog": [{"role": "user", "content": "q"}]}, "bad.jsonl:2: turn count mismatch"),
    ({"input": 3, "output": "a"}, "bad.jsonl:2: 'input' must be a string"),
    ([1, 2], "bad.jsonl:2: expected a JSON object"),
]


@pytest.mark.parametrize("line,message", BAD)
def test_bad_lines_raise_with_location(tok, tmp_path, line, message):
    path = jsonl(tmp_path / "bad.jsonl", [{"input": "q", "output": "a"}, line, {"input": "q", "output": "a"}])
    with pytest.raises(DataError, match=message.replace("(", r"\(")):
        read_examples(path, tok)
    examples, skipped = read_examples(path, tok, on_error="skip")
    assert len(examples) == 2 and len(skipped) == 1 and skipped[0].startswith(str(tmp_path))


def test_an_enormous_line_is_dropped_without_being_tokenized(tok, tmp_path, monkeypatch):
    huge = "字" * 5_000_000                                       # 15 MB of UTF-8 on one line
    path = jsonl(tmp_path / "huge.jsonl", [{"input": "q", "output": "a"}, {"input": huge, "output": "a"},
                                           {"dialog": [{"role": "user", "content": huge},
                                                       {"role": "bot", "content": "a"}]},
                                           {"input": "<_user>" + huge + "<_bot>a<_end>"}])
    longest = []
    for name in ("encode", "encode_text"):                        # every path into SentencePiece
        real = getattr(tok, name)
        monkeypatch.setattr(tok, name, lambda text, real=real: longest.append(len(text)) or real(text))
    report = preprocess(path, tok, str(tmp_path / "o.mindrecord"), pack=PackConfig(max_length=64))
    assert sorted(report.dropped) == [f"{path}:{n}" for n in (2, 3, 4)] and report.rows == 1
    assert max(longest) < 100                                    # only the short line was tokenized
    over = "字" * (65 * tok.max_chars_per_token + 1)              # surely > 64 tokens
    examples, _ = read_examples(jsonl(tmp_path / "over.jsonl", [{"input": over, "output": "a"}]), tok,
                                max_tokens=64)
    assert examples[0].too_long and examples[0].input_ids == ()
    examples, _ = read_examples(str(tmp_path / "over.jsonl"), tok)   # no bound given: tokenized whole
    assert not examples[0].too_long and len(examples[0].input_ids) > 64


def test_bad_files(tok, tmp_path):
    with pytest.raises(DataError, match="no such file"):
        read_examples(str(tmp_path / "nope.jsonl"), tok)
    with pytest.raises(DataError, match="not a file"):
        read_examples(str(tmp_path), tok)
    with pytest.raises(DataError, match="no examples"):
        read_examples(jsonl(tmp_path / "empty.jsonl", ["", "  "]), tok)
    (tmp_path / "latin.jsonl").write_bytes(b'{"input": "caf\xe9", "output": "a"}\n')
    with pytest.raises(DataError, match="latin.jsonl:1: not UTF-8"):
        read_examples(str(tmp_path / "latin.jsonl"), tok)
    long = jsonl(tmp_path / "long.jsonl", [{"input": "q " * 50, "output": "a"}])
    with pytest.raises(DataError, match="nothing to write"):
        preprocess(long, tok, str(tmp_path / "o.mindrecord"), pack=PackConfig(max_length=8))
    assert not os.path.exists(tmp_path / "o.mindrecord")


def test_full_disk_fails_before_writing_and_leaves_no_temp_dir(tok, tmp_path, monkeypatch, recipe, capsys):
    """MindSpore's MindRecord writer segfaults on a full disk: the space is checked first; a
    writer that fails anyway leaves no temp dir, and a killed writer's temp dir is swept later.
    The previous output stays as it was."""
    import collections
    import mindspore.mindrecord
    import tc2.data.records as records
    good = jsonl(tmp_path / "good.jsonl", [{"input": f"q{k}", "output": "answer"} for k in range(20)])
    out = tmp_path / "out" / "x.mindrecord"
    preprocess(good, tok, str(out), pack=PackConfig(max_length=64))
    before = out.read_bytes()
    Usage = collections.namedtuple("Usage", "total used free")
    monkeypatch.setattr(records.shutil, "disk_usage", lambda d: Usage(10 << 30, (10 << 30) - (5 << 20), 5 << 20))
    argv = ["--input_dataset_file", good, "--vocab_file_path", tok.path, "--max_length", "64",
            "--output_path", str(out), "--no_progress"]
    assert recipe.main(argv) == 2
    assert (f"error: {out.parent}: 5 MiB free, but the MindRecord needs about 64 MiB: free some space or "
            "write elsewhere (nothing was written)") in capsys.readouterr().err
    assert sorted(os.listdir(out.parent)) == ["x.mindrecord", "x.mindrecord.db"] and out.read_bytes() == before
    monkeypatch.undo()

    class FullDisk(mindspore.mindrecord.FileWriter):
        def write_raw_data(self, raw_data, *args, **kwargs):
            raise OSError(28, "No space left on device")
    monkeypatch.setattr(mindspore.mindrecord, "FileWriter", FullDisk)
    with pytest.raises(OSError, match="No space left on device"):
        preprocess(good, tok, str(out), pack=PackConfig(max_length=64, seed=1))
    assert sorted(os.listdir(out.parent)) == ["x.mindrecord", "x.mindrecord.db"] and out.read_bytes() == before
    monkeypatch.undo()
    stale = out.parent / ".tmp_mindrecord_999999999_abc"                 # a writer that was killed
    stale.mkdir()
    (stale / "x.mindrecord").write_bytes(b"partial")
    preprocess(good, tok, str(out), pack=PackConfig(max_length=64, seed=1))
    assert sorted(os.listdir(out.parent)) == ["x.mindrecord", "x.mindrecord.db"]


# --- the recipe -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def recipe():
    spec = importlib.util.spec_from_file_location("preprocess_recipe",
                                                  os.path.join(REPO, "recipes", "preprocess.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_recipe_end_to_end_and_errors(recipe, tok, tmp_path, capsys):
    good = jsonl(tmp_path / "good.jsonl", [{"input": f"q{k}", "output": "answer"} for k in range(20)])
    out = str(tmp_path / "x.mindrecord")
    argv = ["--input_dataset_file", good, "--vocab_file_path", tok.path, "--max_length", "64",
            "--output_path", out, "--seed", "2024", "--no_progress"]
    assert recipe.main(argv) == 0
    assert capsys.readouterr().out.startswith("examples read 20 | packed rows")
    assert len(read_mindrecord(out)["input_ids"]) >= 1
    bad = jsonl(tmp_path / "bad.jsonl", [{"input": "q", "output": "a"}, "{oops"])
    out2 = str(tmp_path / "y.mindrecord")
    argv2 = ["--input_dataset_file", bad, "--vocab_file_path", tok.path, "--output_path", out2,
             "--no_progress"]
    assert recipe.main(argv2) == 2
    assert "bad.jsonl:2: malformed JSON" in capsys.readouterr().err and not os.path.exists(out2)
    assert recipe.main(argv2 + ["--skip_bad_lines"]) == 0
    assert "skipped 1 bad lines" in capsys.readouterr().out and os.path.exists(out2)
    assert recipe.main(["--input_dataset_file", good, "--vocab_file_path", str(tmp_path / "no.model"),
                        "--output_path", out2, "--no_progress"]) == 2
    assert "tokenizer model not found" in capsys.readouterr().err
    (tmp_path / "a_file").write_text("x")                                  # unwritable output: before reading
    assert recipe.main(argv[:6] + ["--output_path", str(tmp_path / "a_file" / "o.mindrecord"), "--no_progress"]) == 2
    assert f"error: output_path: cannot write in {tmp_path / 'a_file'}" in capsys.readouterr().err

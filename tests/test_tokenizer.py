"""Tokenizer: parity with the official TeleChat2 tokenizer on the real models, and the offline
tokenizer trained by `train_tokenizer` (layout, round trip).

The official HF tokenizer (tokenization_telechat.py) is a LlamaTokenizer-like wrapper: its
added tokens are cut out of the text (leftmost, longest match, like HF's Trie), each plain
piece goes through `sp.encode(piece, out_type=str)` and `piece_to_id`, and no bos/eos is added.
`reference_encode` below re-implements that independently of tc2; hard-coded ids were checked
by hand against the released tokenizer.model.
"""
import os

import pytest
import sentencepiece as spm
from hypothesis import given, settings, strategies as st

from tc2.data.tokenizer import (DEFAULT_SPECIAL_TOKENS, Tokenizer, synthetic_corpus, train_tokenizer)

SHARED = os.environ.get("TC2_SHARED")
needs_shared = pytest.mark.skipif(
    SHARED is None, reason="TC2_SHARED is unset: set TC2_SHARED=/path/to/shared (holding "
    "telechat2/tokenizer.model) to run the parity tests against the real TeleChat2 tokenizer")

HARD_STRINGS = [
    "", "你好", "中国电信星辰语义大模型TeleChat", "hello world", " hello", "  two  spaces  ",
    "0123456789", "2024年11月29日", "3.14159", "def f(x):\n    return x + 1\n", "\t\tx  y   z\n\n",
    "😀👍🏽 emoji", "ﬁ Ａ１ \u200b", "<_user>你好<_bot>", "<_user><_bot><_end>",
    "<_start><_user>q1<_bot>a1<_end><_user>q2<_bot>", "<_system>sys\n<_user>hi<_bot>",
    "x<_pad><_pad>y", "<_user", "<_user>>", "<<_bot>", "<tool_call>\n{\"name\": \"f\"}\n</tool_call>",
    "<tool_response>\nok\n</tool_response>", "<_observation>", "<reserve1>x", "a_b__c",
]


def reference_encode(sp, text, specials):
    """How the official tokenizer encodes: see the module docstring."""
    ids, i, plain = [], 0, 0
    while i < len(text):
        match = max((s for s in specials if text.startswith(s, i)), key=len, default=None)
        if match is None:
            i += 1
            continue
        if plain < i:
            ids += [sp.piece_to_id(p) for p in sp.encode(text[plain:i], out_type=str)]
        ids.append(sp.piece_to_id(match))
        i = plain = i + len(match)
    if plain < len(text):
        ids += [sp.piece_to_id(p) for p in sp.encode(text[plain:], out_type=str)]
    return ids


def model_specials(sp):
    return [s for s in DEFAULT_SPECIAL_TOKENS if sp.id_to_piece(sp.piece_to_id(s)) == s]


@pytest.fixture(scope="module")
def small_tok(tmp_path_factory):
    path = train_tokenizer(synthetic_corpus(2000, seed=0), tmp_path_factory.mktemp("tok") / "tiny",
                           vocab_size=1500)
    return Tokenizer(path)


# --- real tokenizers ---------------------------------------------------------------------------
@pytest.fixture(scope="module", params=["tokenizer.model", "tokenizer-115b.model"])
def real(request):
    if SHARED is None:
        pytest.skip("TC2_SHARED is unset: cannot read the real TeleChat2 tokenizer")
    path = os.path.join(SHARED, "telechat2", request.param)
    return Tokenizer(path), spm.SentencePieceProcessor(model_file=path)


@needs_shared
def test_real_matches_reference_encoding(real):
    tok, sp = real
    specials = model_specials(sp)
    for text in HARD_STRINGS:
        assert tok.encode(text) == reference_encode(sp, text, specials), text


@needs_shared
def test_real_plain_text_is_raw_sentencepiece(real):
    tok, sp = real
    for text in HARD_STRINGS:
        if not any(s in text for s in DEFAULT_SPECIAL_TOKENS):
            assert tok.encode(text) == sp.encode(text), text


@needs_shared
def test_real_hand_checked_ids(real):
    tok, _ = real
    assert [tok.token_id(str(d)) for d in range(10)] == list(range(18, 28))
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.unk_id) == (1, 2, 3, 0)
    assert (tok.user_id, tok.bot_id, tok.system_id) == (4, 5, 6)
    assert tok.vocab_size == 131072
    assert tok.encode("<_user>") == [4] and tok.encode("<_bot>") == [5] and tok.encode("<_end>") == [2]
    assert tok.encode("<_user>你好<_bot>") == [4, 96343, 5]
    assert tok.encode("hello world") == [39987, 1320]
    assert tok.encode(" hello") == [390, 27904]                      # whitespace kept
    assert tok.encode("2024年") == [126136, 20, 18, 20, 22, 126234]    # digits split
    assert tok.encode("😀") == [126136, 374, 293, 286, 262]            # byte fallback
    assert tok.encode("a\nb") == [393, 29, 126158]
    assert tok.encode("") == []
    assert tok.token_id("<reserve1>") == 34 and tok.token_id("<reserve100>") == 133


@needs_shared
def test_real_tool_tokens_only_where_the_model_has_them(real):
    tok, sp = real
    if sp.id_to_piece(9) == "<tool_call>":   # 7B/35B (Nov 2024)
        assert tok.encode("<tool_call>x</tool_call>") == [9] + sp.encode("x") + [10]
        assert tok.encode("<tool_response></tool_response>") == [11, 12]
    else:                                    # 115B: control pieces there, tool strings are text
        assert "<tool_call>" not in tok.special_ids
        assert tok.encode("<tool_call>") == sp.encode("<tool_call>")
        assert not {9, 10, 11, 12} & set(tok.encode("<tool_call></tool_response>"))


@needs_shared
def test_real_decode_inverts_encode(real):
    tok, _ = real
    for text in HARD_STRINGS:
        if text != "<_observation>":
            assert tok.decode(tok.encode(text)) == text, text
    assert tok.decode([4, 96343, 5, 96343, 2], skip_special_tokens=True) == "你好 你好"
    assert tok.decode([7]) == "<_observation>"             # control pieces are shown as text
    assert tok.decode([7], skip_special_tokens=True) == ""


@needs_shared
def test_real_min_tokens_is_a_lower_bound_reached_by_the_longest_pieces(real):
    tok, _ = real
    assert tok.max_chars_per_token == 128                             # '-' * 128 is one piece
    for text in HARD_STRINGS + ["-" * 1280, "." * 1000 + "x", " " * 3000, "你好" * 500]:
        assert len(tok.encode(text)) >= tok.min_tokens(len(text)), text
    assert len(tok.encode("-" * 1280)) == tok.min_tokens(1280) + 1 == 11   # tight: + the dummy prefix


def test_min_tokens_gives_no_bound_when_the_normalizer_folds_text():
    import io
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(synthetic_corpus(300, seed=1)), model_writer=buf,
                                   vocab_size=600, hard_vocab_limit=False, normalization_rule_name="nmt_nfkc",
                                   minloglevel=2)
    tok = Tokenizer.from_bytes(buf.getvalue())
    assert tok.max_chars_per_token is None and tok.min_tokens(10 ** 6) == 0


def test_plain_text_encoding_never_gives_special_ids(small_tok):
    text = "a<_user>b<_end>\n<tool_call>c<_pad>"
    ids = small_tok.encode_text(text)
    assert not set(ids) & set(small_tok.special_ids.values()) and small_tok.decode(ids) == text
    assert small_tok.encode_text("plain words") == small_tok.encode("plain words")
    pieces = [("<_user>", False), ("q<_bot>", True), ("<_bot>x", False), ("y", True)]
    assert small_tok.encode_pieces(pieces) == (
        [small_tok.user_id] + small_tok.encode_text("q<_bot>") + [small_tok.bot_id] + small_tok.encode_text("xy"))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.sampled_from(list("ab -.\n你好_") + ["<_user>", "-" * 40, " " * 40]), max_size=100))
def test_min_tokens_is_a_lower_bound(small_tok, parts):
    text = "".join(parts)
    assert len(small_tok.encode(text)) >= small_tok.min_tokens(len(text))


# --- the offline tokenizer ----------------------------------------------------------------------
def test_trained_tokenizer_has_telechat_layout(small_tok):
    expect = ["<_unk>", "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>",
              "<_observation>", "<_sep>", "<tool_call>", "</tool_call>", "<tool_response>",
              "</tool_response>"]
    assert [small_tok.id_to_piece(i) for i in range(13)] == expect
    assert [small_tok.token_id(str(d)) for d in range(10)] == list(range(18, 28))
    assert small_tok.token_id("<reserve1>") == 34
    assert small_tok.encode("<_user>") == [4] and small_tok.encode("<_end>") == [2]
    assert 200 < small_tok.vocab_size <= 1500
    ids = small_tok.encode("x 12 😀")
    assert [i for i in ids if 18 <= i <= 27] == [19, 20]   # split digits
    assert small_tok.decode(ids) == "x 12 😀"                  # byte fallback


def test_trained_tokenizer_is_deterministic_and_atomic(tmp_path):
    a = train_tokenizer(synthetic_corpus(300, seed=1), tmp_path / "a", vocab_size=1000)
    b = train_tokenizer(synthetic_corpus(300, seed=1), tmp_path / "b", vocab_size=1000)
    assert open(a, "rb").read() == open(b, "rb").read()
    assert sorted(os.listdir(tmp_path)) == ["a.model", "b.model"]   # no temp files left


def test_tokenizer_bad_inputs(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        Tokenizer(tmp_path / "missing.model")
    bad = tmp_path / "bad.model"
    bad.write_bytes(b"not a model")
    with pytest.raises(ValueError, match="not a valid SentencePiece model"):
        Tokenizer(bad)
    with pytest.raises(ValueError, match="empty"):
        train_tokenizer([], tmp_path / "x")


def test_token_id_unknown_piece_is_an_error(small_tok):
    with pytest.raises(KeyError, match="not in the tokenizer"):
        small_tok.token_id("<_nope>")
    with pytest.raises(TypeError):
        small_tok.encode(b"bytes")
    with pytest.raises(ValueError, match="outside the tokenizer vocabulary"):
        small_tok.decode([5, small_tok.vocab_size])


def test_pickle_round_trip(small_tok):
    import pickle
    tok = pickle.loads(pickle.dumps(small_tok))
    assert tok.encode("<_user>你好 world<_bot>") == small_tok.encode("<_user>你好 world<_bot>")


# U+2581 is SentencePiece's whitespace marker: it decodes to a space in every SP tokenizer.
plain_text = st.text(st.characters(blacklist_characters="\u2581", blacklist_categories=("Cs",)),
                     max_size=40)


@settings(max_examples=300, deadline=None)
@given(plain_text)
def test_roundtrip_plain_text(small_tok, text):
    assert small_tok.decode(small_tok.encode(text)) == text


@settings(max_examples=150, deadline=None)
@given(st.lists(st.one_of(plain_text, st.sampled_from(DEFAULT_SPECIAL_TOKENS)), max_size=6))
def test_roundtrip_with_special_tokens(small_tok, parts):
    text = "".join(parts)
    ids = small_tok.encode(text)
    assert small_tok.decode(ids) == text
    assert ids.count(small_tok.user_id) == text.count("<_user>")

"""TeleChat2 tokenizer: SentencePiece BPE plus the special-token splitting of the official code.

The TeleChat special pieces (`<_user>`, `<_bot>`, ...) are CONTROL pieces: raw SentencePiece
never produces them from text. The official Hugging Face / MindFormers tokenizers register them
as added tokens, cut the text at every occurrence, insert their ids, and encode each plain
segment with `sp.encode(segment)` (the model's dummy prefix applies per segment; no bos/eos).
`Tokenizer.encode` does exactly that, so `encode(rendered_chat_text)` gives the official ids.

Every id is read from the model file (`piece_to_id`), never hard-coded: the 115B tokenizer has
control pieces where the 7B/35B one has `<tool_call>` ... `</tool_response>`, and a tokenizer
trained by `train_tokenizer` carries the same layout at a small vocabulary.
"""
from __future__ import annotations

import io
import os
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import sentencepiece as spm

from tc2.files import write_atomic

__all__ = ["Tokenizer", "train_tokenizer", "synthetic_corpus",
           "DEFAULT_SPECIAL_TOKENS", "TELECHAT_CONTROL_SYMBOLS", "TELECHAT_USER_DEFINED_SYMBOLS"]

# The strings the official tokenizers split on (MF TelechatTokenizer's added tokens). Only the
# ones the model actually has are used: the 115B model has no tool pieces.
DEFAULT_SPECIAL_TOKENS: Tuple[str, ...] = (
    "<_start>", "<_end>", "<_pad>", "<_user>", "<_bot>", "<_system>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>")

# Piece layout of the Nov-2024 TeleChat2 tokenizer after unk/bos/eos/pad (ids 0-3): control
# pieces 4-17, then user-defined pieces 18-133 (digits 0-9 are 18-27, <reserveN> is 33+N).
TELECHAT_CONTROL_SYMBOLS: Tuple[str, ...] = (
    "<_user>", "<_bot>", "<_system>", "<_observation>", "<_sep>",
    "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>",
    "<_control5>", "<_control6>", "<_control7>", "<_control8>", "<_control9>")
TELECHAT_USER_DEFINED_SYMBOLS: Tuple[str, ...] = (
    tuple(str(d) for d in range(10)) + ("_", "\n", "\t", "__", "___", "____")
    + tuple(f"<reserve{i}>" for i in range(1, 101)))


class Tokenizer:
    """A SentencePiece model with TeleChat special-token handling (see the module docstring).

    `special_tokens` lists the strings cut out of the text before SentencePiece sees it; those
    absent from the model are ignored (so the 115B tokenizer leaves `<tool_call>` as plain
    text, like its official tokenizer). The object is immutable after construction.
    """

    def __init__(self, path: Union[str, os.PathLike],
                 special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS):
        self.path = os.fspath(path)
        if not os.path.isfile(self.path):
            raise FileNotFoundError(f"tokenizer model not found: {self.path!r}")
        with open(self.path, "rb") as f:
            proto = f.read()
        self._init(proto, special_tokens, self.path)

    @classmethod
    def from_bytes(cls, proto: bytes, special_tokens: Sequence[str] = DEFAULT_SPECIAL_TOKENS,
                   name: str = "<bytes>") -> "Tokenizer":
        """Build from a serialized SentencePiece model (e.g. one held in memory)."""
        self = cls.__new__(cls)
        self.path = name
        self._init(proto, special_tokens, name)
        return self

    def _init(self, proto: bytes, special_tokens: Sequence[str], name: str) -> None:
        sp = spm.SentencePieceProcessor()
        try:
            sp.LoadFromSerializedProto(proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise ValueError(f"{name!r} is not a valid SentencePiece model: {e}") from None
        self._proto = proto
        self._sp = sp
        self.vocab_size: int = sp.get_piece_size()
        self.special_ids: Dict[str, int] = {
            s: sp.piece_to_id(s) for s in special_tokens if self.has_token(s)}
        # Longest first so that no special string is shadowed by one of its prefixes.
        alts = sorted(self.special_ids, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(map(re.escape, alts)) + ")") if alts else None
        # Ids decoded as their own text (or skipped): our special strings + all control pieces.
        self._special_id_set = frozenset(
            [i for i in range(self.vocab_size) if sp.is_control(i)] + list(self.special_ids.values()))
        self.max_chars_per_token = _max_chars_per_token(sp, self.special_ids)

    def min_tokens(self, n_chars: int) -> int:
        """A lower bound on the ids `encode` gives for any text of `n_chars` characters (0 when
        the model's normalizer may shorten text, see `_max_chars_per_token`): lets a reader drop
        a conversation that cannot fit without tokenizing megabytes of it."""
        if self.max_chars_per_token is None:
            return 0
        return -(-n_chars // self.max_chars_per_token)

    # --- pickling (multiprocessing data loaders) ---------------------------------------------
    def __getstate__(self):
        return {"path": self.path, "proto": self._proto, "special": tuple(self.special_ids)}

    def __setstate__(self, state):
        self.path = state["path"]
        self._init(state["proto"], state["special"], state["path"])

    def __repr__(self) -> str:
        return f"Tokenizer({self.path!r}, vocab_size={self.vocab_size})"

    # --- vocabulary ----------------------------------------------------------------------------
    def has_token(self, piece: str) -> bool:
        """True when `piece` is a piece of the model (piece_to_id maps unknowns to unk)."""
        i = self._sp.piece_to_id(piece)
        return self._sp.id_to_piece(i) == piece

    def token_id(self, piece: str) -> int:
        """Id of a piece, e.g. token_id("<_user>") == 4; a clear error if the model lacks it."""
        if not self.has_token(piece):
            raise KeyError(f"token {piece!r} is not in the tokenizer model {self.path!r}")
        return self._sp.piece_to_id(piece)

    def id_to_piece(self, i: int) -> str:
        return self._sp.id_to_piece(int(i))

    @property
    def unk_id(self) -> int:
        return self._sp.unk_id()

    @property
    def bos_id(self) -> int:
        return self._sp.bos_id()

    @property
    def eos_id(self) -> int:
        return self._sp.eos_id()

    @property
    def pad_id(self) -> int:
        return self._sp.pad_id()

    @property
    def user_id(self) -> int:
        return self.token_id("<_user>")

    @property
    def bot_id(self) -> int:
        return self.token_id("<_bot>")

    @property
    def system_id(self) -> int:
        return self.token_id("<_system>")

    # --- encode / decode -------------------------------------------------------------------------
    def split_special(self, text: str) -> List[str]:
        """Cut `text` at the special-token strings; empty segments are dropped (as HF does)."""
        if self._split_re is None:
            return [text] if text else []
        return [s for s in self._split_re.split(text) if s]

    def encode(self, text: str) -> List[int]:
        """Ids of `text` exactly as the official tokenizer gives them (no bos/eos added)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects str, got {type(text).__name__}")
        ids: List[int] = []
        for seg in self.split_special(text):
            sid = self.special_ids.get(seg)
            if sid is not None:
                ids.append(sid)
            else:
                ids.extend(self._sp.encode(seg))
        return ids

    def encode_text(self, text: str) -> List[int]:
        """Ids of `text` as plain text: a special-token string in it (`<_user>`, `<_end>`, ...)
        is encoded as its characters, never as a control id (all TeleChat specials are CONTROL
        pieces, which SentencePiece never produces from text). Equals `encode(text)` for text
        without special-token strings."""
        if not isinstance(text, str):
            raise TypeError(f"encode_text expects str, got {type(text).__name__}")
        return self._sp.encode(text) if text else []

    def encode_pieces(self, pieces: Iterable[Tuple[str, bool]]) -> List[int]:
        """Ids of the concatenated `(text, plain)` pieces: the special-token strings of pieces
        with plain=False become their ids, plain pieces are text (`encode_text`). The text
        between two special ids is one SentencePiece segment, as in `encode`, so the result
        equals `encode("".join(texts))` whenever no plain piece holds a special-token string."""
        ids: List[int] = []
        run: List[str] = []
        for text, plain in pieces:
            for seg in ([text] if plain else self.split_special(text)):
                sid = None if plain else self.special_ids.get(seg)
                if sid is None:
                    run.append(seg)
                    continue
                if run:
                    ids.extend(self.encode_text("".join(run)))
                    run = []
                ids.append(sid)
        if run:
            ids.extend(self.encode_text("".join(run)))
        return ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Inverse of `encode`: runs of ordinary ids go through SentencePiece, each special id
        (our special strings and any control piece) is written as its text, or dropped when
        `skip_special_tokens`. Like HF, runs are decoded separately, so each run's dummy-prefix
        space is removed and `decode(encode(t)) == t` for any text without U+2581."""
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < self.vocab_size]
        if bad:  # e.g. a model whose vocab is padded beyond a small tokenizer's
            raise ValueError(f"id {bad[0]} is outside the tokenizer vocabulary [0, {self.vocab_size})")
        if skip_special_tokens:
            ids = [i for i in ids if i not in self._special_id_set]
        out: List[str] = []
        run: List[int] = []
        for i in ids:
            if i in self._special_id_set:
                if run:
                    out.append(self._sp.decode(run))
                    run = []
                out.append(self._sp.id_to_piece(i))
            else:
                run.append(i)
        if run:
            out.append(self._sp.decode(run))
        return "".join(out)


_PROBE = "a  b\t\u00a0\uff21\u2460\ufb01e\u0301 "   # folded by NFKC / whitespace-removing normalizers


def _max_chars_per_token(sp, special_ids: Dict[str, int]) -> Optional[int]:
    """The most characters of text one id can stand for: the longest piece (a byte-fallback
    piece covers at most one character, a special id its string), so a text of n characters
    has at least n / this many ids. Only when the model's normalizer leaves text as it is
    (identity, no whitespace folding: both releases' models and `train_tokenizer`'s, checked
    on a probe of characters NFKC and whitespace folding change); None otherwise (no bound)."""
    if sp.normalize(_PROBE).lstrip("\u2581") != _PROBE.replace(" ", "\u2581"):
        return None
    longest = max(len(sp.id_to_piece(i)) for i in range(sp.get_piece_size()))
    return max([longest] + [len(t) for t in special_ids])


def _training_lines(texts_or_file) -> Iterable[str]:
    if isinstance(texts_or_file, (str, os.PathLike)):
        path = os.fspath(texts_or_file)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer training corpus not found: {path!r}")
        with open(path, encoding="utf-8") as f:
            for line in f:
                line = line.rstrip("\n")
                if line:
                    yield line
    else:
        for t in texts_or_file:
            if not isinstance(t, str):
                raise TypeError(f"training texts must be str, got {type(t).__name__}")
            for line in t.split("\n"):
                if line:
                    yield line


def train_tokenizer(texts_or_file, out_prefix: Union[str, os.PathLike], *,
                    vocab_size: int = 8000, character_coverage: float = 0.9995,
                    num_threads: int = 2, max_sentence_length: int = 100000,
                    input_sentence_size: int = 0) -> str:
    """Train a SentencePiece BPE with the TeleChat2 piece layout; returns `out_prefix + ".model"`.

    Same trainer options as the release's model (BPE, byte fallback, split digits, identity
    normalization, whitespace kept, whitespace-only pieces, dummy prefix) and the same ids for
    `<_unk> <_start> <_end> <_pad>` (0-3), the control pieces 4-17 (`<_user>`=4, `<_bot>`=5,
    `<_system>`=6, `<tool_call>`..`</tool_response>`=9-12) and the user-defined pieces 18-133
    (digits 18-27): a model trained here drops into every code path of the real one.
    `texts_or_file` is a path to a UTF-8 text file or an iterable of strings; newlines
    separate training sentences. The file is written atomically.
    """
    lines = list(_training_lines(texts_or_file))
    if not lines:
        raise ValueError("tokenizer training corpus is empty")
    buf = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=buf, model_type="bpe",
            vocab_size=vocab_size, character_coverage=character_coverage,
            split_digits=True, byte_fallback=True, allow_whitespace_only_pieces=True,
            normalization_rule_name="identity", remove_extra_whitespaces=False,
            add_dummy_prefix=True, max_sentencepiece_length=128,
            max_sentence_length=max_sentence_length, input_sentence_size=input_sentence_size,
            shuffle_input_sentence=True, unk_id=0, bos_id=1, eos_id=2, pad_id=3,
            unk_piece="<_unk>", bos_piece="<_start>", eos_piece="<_end>", pad_piece="<_pad>",
            control_symbols=list(TELECHAT_CONTROL_SYMBOLS),
            user_defined_symbols=list(TELECHAT_USER_DEFINED_SYMBOLS),
            hard_vocab_limit=False, num_threads=num_threads, minloglevel=2)
    except RuntimeError as e:
        raise ValueError(f"SentencePiece training failed: {e}") from None
    out = os.fspath(out_prefix) + ".model"
    write_atomic(out, buf.getvalue())
    return out


_ZH = ("的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发年动"
       "同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如水化高自"
       "二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然前外天政四日"
       "那社义事平形相全表间样与关各重新线内数正心反你明看原又么利比或但质气第向道命此变"
       "条只没结解问意建月公无系军很情者最立代想已通并提直题党程展五果料象员革位入常文总"
       "次品式活设及管特件长求老头基资边流路级少图山统接知较将组见计别她手角期根论运农指"
       "几九区强放决西被干做必战先回则任取据处府研")
_EN = ("the model data token train chat answer question system user tool call response "
       "hello world python function return value list dict string number error file line "
       "TeleChat MindSpore tensor layer attention").split()
_CODE = ["def f(x):", "    return x + 1", "for i in range(10):", "if a == b:", "print('hi')",
         "x = [1, 2, 3]", "{\"name\": \"f\", \"arguments\": {}}", "import numpy as np", "\treturn None"]


def synthetic_corpus(n_lines: int = 2000, seed: int = 0) -> List[str]:
    """A deterministic mixed corpus (Chinese, English, digits, code, punctuation, emoji) for
    training a small offline tokenizer in tests and the quickstart, without any download."""
    import random
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):
        kind = rng.random()
        if kind < 0.35:
            line = "".join(rng.choice(_ZH) for _ in range(rng.randint(4, 30))) + rng.choice("。，？！")
        elif kind < 0.7:
            line = " ".join(rng.choice(_EN) for _ in range(rng.randint(3, 15))) + rng.choice(".,?!")
        elif kind < 0.85:
            line = "\n".join(rng.choice(_CODE) for _ in range(rng.randint(1, 4)))
        else:
            line = (f"{rng.randint(0, 10**6)} {rng.choice(_EN)} {rng.uniform(0, 100):.2f} "
                    f"{rng.choice(_ZH)}{rng.choice(['😀', '👍', '', ''])}")
        lines.append(line)
    return lines

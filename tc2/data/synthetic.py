"""A generated bilingual chat dataset a small model can visibly learn in minutes on a CPU.

Tasks (English and Chinese): small-number addition, letter reversal, unit conversion and
capital-city facts. Every answer is determined by the question, so accuracy on held-out
prompts measures learning, not luck: held-out prompts use operand pairs / letter strings that
never occur in training (split by a hash of the operands), and capitals are asked in a
phrasing that training used only for other countries. Written in the official TeleChat2 dialog format.
"""
from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import List

from tc2.files import write_jsonl_atomic

SYSTEM = "You are tc2-tiny."

_CAPITALS = [  # (country en, capital en, country zh, capital zh)
    ("France", "Paris", "法国", "巴黎"), ("Japan", "Tokyo", "日本", "东京"),
    ("China", "Beijing", "中国", "北京"), ("Italy", "Rome", "意大利", "罗马"),
    ("Germany", "Berlin", "德国", "柏林"), ("Spain", "Madrid", "西班牙", "马德里"),
    ("Egypt", "Cairo", "埃及", "开罗"), ("Russia", "Moscow", "俄罗斯", "莫斯科"),
    ("Canada", "Ottawa", "加拿大", "渥太华"), ("Kenya", "Nairobi", "肯尼亚", "内罗毕"),
    ("Peru", "Lima", "秘鲁", "利马"), ("Norway", "Oslo", "挪威", "奥斯陆"),
]
_UNITS = [  # (en from, en to, zh from, zh to, factor)
    ("km", "m", "千米", "米", 1000), ("kg", "g", "千克", "克", 1000), ("m", "cm", "米", "厘米", 100),
]


@dataclass(frozen=True)
class Example:
    task: str
    lang: str
    question: str
    answer: str

    def messages(self) -> list:
        """The prompt as chat messages (for tc2.render_chat)."""
        return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": self.question}]

    def dialog(self) -> dict:
        # the official dialog data ends the system text with "\n", as the chat template writes it
        return {"system": SYSTEM + "\n", "dialog": [{"role": "user", "content": self.question},
                                             {"role": "bot", "content": self.answer}]}


def _heldout(*key) -> bool:
    """A fixed ~15% of operand tuples are reserved for evaluation (never trained on)."""
    return zlib.crc32(repr(key).encode()) % 100 < 15


def _add(r: random.Random, lang: str, heldout: bool) -> Example:
    while True:
        a, b = r.randint(0, 19), r.randint(0, 19)
        if _heldout("add", a, b) == heldout:
            break
    if lang == "en":
        return Example("add", lang, f"What is {a} plus {b}?", f"{a} + {b} = {a + b}.")
    return Example("add", lang, f"{a}加{b}等于多少？", f"{a}加{b}等于{a + b}。")


def _reverse(r: random.Random, lang: str, heldout: bool) -> Example:
    while True:
        word = "".join(r.choice("abcdefghijklmnop") for _ in range(r.randint(3, 4)))
        if _heldout("rev", word) == heldout:
            break
    spaced, back = " ".join(word), " ".join(reversed(word))
    if lang == "en":
        return Example("reverse", lang, f"Reverse the letters: {spaced}", back)
    return Example("reverse", lang, f"把字母倒过来：{spaced}", back)


def _convert(r: random.Random, lang: str, heldout: bool) -> Example:
    while True:
        unit, n = r.choice(_UNITS), r.randint(1, 60)
        if _heldout("unit", unit[0], n) == heldout:
            break
    en_from, en_to, zh_from, zh_to, factor = unit
    if lang == "en":
        return Example("convert", lang, f"Convert {n} {en_from} to {en_to}.", f"{n} {en_from} = {n * factor} {en_to}.")
    return Example("convert", lang, f"{n}{zh_from}等于多少{zh_to}？", f"{n}{zh_from}等于{n * factor}{zh_to}。")


def _capital(r: random.Random, lang: str, heldout: bool) -> Example:
    """Training asks every country in phrasing A and half of them in phrasing B too; held-out
    prompts ask the other half in phrasing B, so answering them needs the learned equivalence
    of the phrasings, not a memorised prompt."""
    while True:
        i = r.randrange(len(_CAPITALS))
        second = r.random() < 0.5 or heldout
        if not second or (i % 2 == 1) == heldout:
            break
    en_c, en_cap, zh_c, zh_cap = _CAPITALS[i]
    if lang == "en":
        q = f"Tell me the capital city of {en_c}." if second else f"What is the capital of {en_c}?"
        return Example("capital", lang, q, f"The capital of {en_c} is {en_cap}.")
    q = f"请告诉我{zh_c}的首都是哪座城市。" if second else f"{zh_c}的首都是哪里？"
    return Example("capital", lang, q, f"{zh_c}的首都是{zh_cap}。")


TASKS = {"add": _add, "reverse": _reverse, "convert": _convert, "capital": _capital}


def make_examples(n: int, *, seed: int = 0, heldout: bool = False, tasks=tuple(TASKS)) -> List[Example]:
    """n examples cycling over tasks and both languages, reproducible from `seed`."""
    r = random.Random(seed * 2 + int(heldout))
    out = []
    for i in range(n):
        task = tasks[i % len(tasks)]
        lang = ("en", "zh")[(i // len(tasks)) % 2]
        out.append(TASKS[task](r, lang, heldout))
    return out


def write_dialog_jsonl(examples: List[Example], path: str) -> str:
    """Write examples as official dialog-format jsonl (atomically)."""
    write_jsonl_atomic(path, (ex.dialog() for ex in examples))
    return path


def corpus_text(examples: List[Example]) -> List[str]:
    """The plain texts a tokenizer should be trained on (system prompt, questions, answers)."""
    return [SYSTEM] + [t for ex in examples for t in (ex.question, ex.answer)]

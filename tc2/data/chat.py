"""Chat prompts for TeleChat2: the 7B/35B chat template and the 115B `chat()` id layout.

(a) `style="115b"`: the official 115B `chat()` builds ids directly:
    [<_start>] + per past message ([<_user>] + ids(q) | [<_bot>] + ids(a) + [<_end>])
    + [<_user>] + ids(question) + [<_bot>]
(b) `style="template"` (default): the Jinja chat template shipped with the 7B/35B releases,
    rendered to text and encoded like `apply_chat_template` + encode:
    <_system>{system}\\n<_user>{q1}<_bot>{a1}<_end>\\n<_user>{q2}<_bot>
    with the default system prompt when none is given, a tools section in the system prompt,
    tool calls inside assistant turns and tool results as `<_user><tool_response>...`.

Message content is plain text in both styles: a message containing `<_user>`, `<_end>` or any
other special-token string is encoded as those characters, never as control ids (the official
code would splice control ids into the prompt: a user could end a turn or forge one). For
content without special-token strings the ids equal the official ones exactly.

The template is written out in Python (no jinja dependency); `template_pieces` also tells
which text is an answer, which the fine-tuning data needs for its loss mask, and which is
content. It only needs a tokenizer with `encode_pieces`, `encode_text` and the special ids,
so it does not import `tc2.data.tokenizer`.
"""
from __future__ import annotations

import json
from typing import Any, List, Mapping, Optional, Sequence, Tuple

__all__ = ["DEFAULT_SYSTEM_PROMPT", "render_chat", "render_chat_text", "template_system_text",
           "template_pieces", "answer_runs"]

DEFAULT_SYSTEM_PROMPT = ("你是中国电信星辰语义大模型，英文名是TeleChat，你是由中电信人工智能科技有限公司"
                         "和中国电信人工智能研究院（TeleAI）研发的人工智能助手。")
_TOOLS_HEAD = ("\n\n# 可用工具\n你可以调用<tools></tools>标签中包含的一个或多个工具来辅助你回答问题,"
               "以下是可用工具详情：\n<tools>\n")
_TOOLS_TAIL = ("</tools>\n\n# 调用方法\n你需要遵循工具的要求，使用json格式返回工具名称及参数，"
               "并用<tool_call></tool_call>包含。下方是一个调用模板：\n<tool_call>\n"
               '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>\n\n')
_BOT_ROLES = ("bot", "assistant")


def _tojson(x: Any) -> str:
    # HF's chat-template `tojson` filter: json.dumps with ensure_ascii=False, default separators.
    return json.dumps(x, ensure_ascii=False)


def _content(m: Mapping[str, Any], i: int, optional: bool = False) -> str:
    c = m.get("content")
    if c is None and optional:
        return ""
    if not isinstance(c, str):
        raise ValueError(f"message {i} ({m.get('role')!r}): 'content' must be a string, "
                         f"got {type(c).__name__}")
    return c


def template_system_text(messages: Sequence[Mapping[str, Any]], tools: Optional[Sequence] = None) -> str:
    """The text the 7B/35B template writes right after `<_system>`."""
    system = None
    if messages and messages[0].get("role") == "system":
        system = _content(messages[0], 0)
    if tools:
        head = DEFAULT_SYSTEM_PROMPT if system is None else system
        return head + _TOOLS_HEAD + "".join(_tojson(t) + "\n" for t in tools) + _TOOLS_TAIL
    return (DEFAULT_SYSTEM_PROMPT if system is None else system) + "\n"


def _tool_call_pieces(calls: Any, i: int) -> List[Tuple[str, bool]]:
    """(text, plain) pieces of an assistant turn's tool calls: the `<tool_call>` wrappers are
    template, the name and arguments are content."""
    if isinstance(calls, str):  # the DeepSpeed data stores tool_calls as a JSON string
        try:
            calls = json.loads(calls)
        except json.JSONDecodeError as e:
            raise ValueError(f"message {i}: 'tool_calls' is not valid JSON: {e}") from None
    if not isinstance(calls, (list, tuple)):
        raise ValueError(f"message {i}: 'tool_calls' must be a list")
    out: List[Tuple[str, bool]] = []
    for j, call in enumerate(calls):
        if not isinstance(call, Mapping):
            raise ValueError(f"message {i}: tool call {j} must be an object")
        if "function" in call:
            call = call["function"]
        if "name" not in call:
            raise ValueError(f"message {i}: tool call {j} has no 'name'")
        out += [("<tool_call>" if j == 0 else "\n<tool_call>", False),
                ('\n{"name": "' + str(call["name"]) + '", "arguments": ' + _tojson(call.get("arguments")) + "}\n",
                 True),
                ("</tool_call>", False)]
    return out


def template_pieces(system_text: str, messages: Sequence[Mapping[str, Any]], *,
                    add_generation_prompt: bool = True,
                    final_newline: bool = True) -> List[Tuple[str, bool, bool]]:
    """The template as (text, is_answer, plain) pieces; `"".join(texts)` is the rendered prompt.

    `plain` marks message content (user, assistant and tool text, tool-call names and
    arguments): it is encoded as plain text (`Tokenizer.encode_pieces`), so a message that
    contains `<_user>` or `<_end>` never produces a control id. The template's own text and
    `system_text` (the operator's system prompt, written verbatim after `<_system>`; see
    `template_system_text`: the release's tools section carries `<tool_call>` markup) are not
    plain. A system message at index 0 of `messages` is skipped, elsewhere it is an error. The
    answer pieces of a turn are its content + tool calls + `<_end>`; every change of `is_answer`
    touches a special token (`<_bot>` before, `<_end>` at the end), so the answers' ids can be
    encoded on their own (`answer_runs`). `final_newline=False` drops the `\\n` the template
    writes after the last `<_end>`.
    """
    out: List[Tuple[str, bool, bool]] = [("<_system>", False, False), (system_text, False, False)]
    prev_role = None
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping):
            raise ValueError(f"message {i} must be an object with 'role' and 'content'")
        role = m.get("role")
        if role == "system":
            if i != 0:
                raise ValueError(f"message {i}: a system message is only allowed first")
        elif role == "user":
            out += [("<_user>", False, False), (_content(m, i), False, True)]
        elif role in _BOT_ROLES:
            out += [("<_bot>", False, False), (_content(m, i, optional=True), True, True)]
            if m.get("tool_calls"):
                out += [(t, True, plain) for t, plain in _tool_call_pieces(m["tool_calls"], i)]
            out += [("<_end>", True, False), ("\n", False, False)]
        elif role == "tool":
            head = "\n<tool_response>\n" if prev_role == "tool" else "<_user><tool_response>\n"
            out += [(head, False, False), (_content(m, i), False, True), ("\n</tool_response>", False, False)]
        else:
            raise ValueError(f"message {i}: unknown role {role!r} "
                             "(expected system, user, bot/assistant or tool)")
        prev_role = role
    if not final_newline and out[-1] == ("\n", False, False):
        out.pop()
    if add_generation_prompt:
        out.append(("<_bot>", False, False))
    return [p for p in out if p[0]]


def answer_runs(pieces: Sequence[Tuple[str, bool, bool]]) -> List[Tuple[List[Tuple[str, bool]], bool]]:
    """Consecutive pieces with the same `is_answer`, as ([(text, plain), ...], is_answer)."""
    runs: List[Tuple[List[Tuple[str, bool]], bool]] = []
    for text, is_answer, plain in pieces:
        if not runs or runs[-1][1] != is_answer:
            runs.append(([], is_answer))
        runs[-1][0].append((text, plain))
    return runs


def render_chat_text(messages: Sequence[Mapping[str, Any]], *, tools: Optional[Sequence] = None,
                     add_generation_prompt: bool = True) -> str:
    """The 7B/35B chat template as text (what `apply_chat_template(tokenize=False)` returns)."""
    pieces = template_pieces(template_system_text(messages, tools), messages,
                             add_generation_prompt=add_generation_prompt)
    return "".join(t for t, _, _ in pieces)


def _template_ids(messages, tokenizer, tools, add_generation_prompt) -> List[int]:
    pieces = template_pieces(template_system_text(messages, tools), messages,
                             add_generation_prompt=add_generation_prompt)
    return tokenizer.encode_pieces([(t, plain) for t, _, plain in pieces])


def _rounds(messages: Sequence[Mapping[str, Any]]) -> List[List[Mapping[str, Any]]]:
    """Group non-system messages into rounds, each starting at a user message."""
    rounds: List[List[Mapping[str, Any]]] = []
    for m in messages:
        if m.get("role") == "user" or not rounds:
            rounds.append([])
        rounds[-1].append(m)
    return rounds


def _render_template(messages, tokenizer, tools, add_generation_prompt, max_tokens) -> List[int]:
    system = list(messages[:1]) if messages and messages[0].get("role") == "system" else []
    rounds = _rounds(messages[len(system):])
    for drop in range(max(len(rounds), 1)):
        kept = system + [m for r in rounds[drop:] for m in r]
        ids = _template_ids(kept, tokenizer, tools, add_generation_prompt)
        if max_tokens is None or len(ids) <= max_tokens:
            return ids
    raise ValueError(f"prompt is {len(ids)} tokens, more than max_tokens={max_tokens} "
                     "even with all history dropped")


def _render_115b(messages, tokenizer, add_generation_prompt, max_tokens) -> List[int]:
    parts: List[List[int]] = []
    for i, m in enumerate(messages):
        role = m.get("role") if isinstance(m, Mapping) else None
        if role == "user":
            parts.append([tokenizer.user_id] + tokenizer.encode_text(_content(m, i)))
        elif role in _BOT_ROLES:
            parts.append([tokenizer.bot_id] + tokenizer.encode_text(_content(m, i, optional=True))
                         + [tokenizer.eos_id])
        else:
            raise ValueError(f"message {i}: role {role!r} is not supported by the 115B chat() "
                             "format (only user and bot); use style='template'")
    if not parts:
        raise ValueError("no messages to render")
    if add_generation_prompt:
        if messages[-1].get("role") != "user":
            raise ValueError("the last message must be the user's question when "
                             "add_generation_prompt=True")
        parts[-1] = parts[-1] + [tokenizer.bot_id]
    ids = [tokenizer.bos_id] + parts[-1]
    if max_tokens is not None and len(ids) > max_tokens:
        raise ValueError(f"the question alone is {len(ids)} tokens, more than max_tokens={max_tokens}")
    # History is prepended newest-first and stops at the first message that does not fit,
    # i.e. it is dropped oldest-first (the official code forgets to grow its length counter).
    body = parts[-1]
    for p in reversed(parts[:-1]):
        if max_tokens is not None and 1 + len(p) + len(body) > max_tokens:
            break
        body = p + body
    return [tokenizer.bos_id] + body


def render_chat(messages: Sequence[Mapping[str, Any]], tokenizer, *, style: str = "template",
                tools: Optional[Sequence] = None, add_generation_prompt: bool = True,
                max_tokens: Optional[int] = None) -> List[int]:
    """Prompt ids for `messages` ([{"role", "content"}], roles system/user/bot|assistant/tool).

    style="template": the 7B/35B chat template (system prompt, tools, tool calls/responses).
    style="115b": the 115B `chat()` layout (user/bot only). With `max_tokens`, history is
    dropped oldest-first (whole rounds for the template, single messages for 115b, as the
    official chat() does) until the prompt fits; the system prompt and the last round are
    always kept, and a ValueError says so when even they do not fit.
    """
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise TypeError("messages must be a list of {'role', 'content'} dicts")
    if style == "template":
        return _render_template(list(messages), tokenizer, tools, add_generation_prompt, max_tokens)
    if style == "115b":
        if tools:
            raise ValueError("the 115B chat() format has no tools; use style='template'")
        return _render_115b(list(messages), tokenizer, add_generation_prompt, max_tokens)
    raise ValueError(f"unknown chat style {style!r} (expected 'template' or '115b')")

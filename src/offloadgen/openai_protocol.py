"""OpenAI request bodies in, OpenAI response bodies out: the one translation shared by
`offloadgen serve` and Batch API files run through `generate --input`, so that a request gets
the same prompt, the same sampling and the same answer either way.

Nothing here imports a web framework: `generate` must work without the `serve` extra.
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .errors import OffloadgenError
from .sampling import SamplingParams

KINDS = {"/v1/completions": "completion", "/v1/chat/completions": "chat"}

# Parameters we cannot honour. A client that sets one to a non-default value would silently get
# something other than what it asked for, so it is refused; the default value is accepted.
UNSUPPORTED = {"logprobs": (None, False, 0), "top_logprobs": (None, 0), "best_of": (None, 1), "echo": (None, False),
               "suffix": (None, ""), "frequency_penalty": (None, 0, 0.0), "presence_penalty": (None, 0, 0.0),
               "logit_bias": (None, {}), "tools": (None, []), "functions": (None, []),
               "response_format": (None, {"type": "text"})}


class ApiError(Exception):
    """An error that becomes an OpenAI-style error body with an HTTP status."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class ParsedRequest:
    kind: str  # "completion" or "chat"
    prompt: str  # the text the model continues (for chat: the rendered template)
    prompt_ids: list[int]
    sampling: SamplingParams
    stream: bool = False
    include_usage: bool = False
    model: str | None = None


def _field(body: dict, key: str, types, default=None, check=None, what: str = ""):
    """body[key] if present and not null, of the given types (a bool is never a number), else default."""
    value = body.get(key)
    if value is None:
        return default
    numeric = types in (int, float, (int, float))
    if (numeric and isinstance(value, bool)) or not isinstance(value, types):
        raise ApiError(400, f"'{key}' must be {what or _type_name(types)}, not {type(value).__name__}", param=key,
                       code="invalid_type")
    if check is not None and not check(value):
        raise ApiError(400, f"'{key}' must be {what} (got {value!r})", param=key, code="invalid_value")
    return value


def _type_name(types) -> str:
    names = {int: "an integer", float: "a number", (int, float): "a number", str: "a string", bool: "a boolean",
             dict: "an object", list: "an array"}
    return names.get(types, str(types))


def _stop_strings(body: dict) -> list[str]:
    stop = body.get("stop")
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not (isinstance(stop, list) and all(isinstance(s, str) and s for s in stop)):
        raise ApiError(400, "'stop' must be a non-empty string or an array of them", param="stop", code="invalid_type")
    return stop


def _completion_prompt(body: dict) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]  # a one-element batch is one prompt
    if not isinstance(prompt, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request; token-id prompts are not supported)",
                       param="prompt", code="invalid_type")
    return prompt


def _message_text(content, i: int) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text"
                                         and isinstance(p.get("text"), str) for p in content):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{i}].content must be a string or an array of text parts",
                   param=f"messages[{i}].content", code="invalid_type")


def _chat_prompt(body: dict, tokenizer) -> str:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array", param="messages", code="invalid_type")
    plain = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise ApiError(400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]",
                           code="invalid_type")
        plain.append({"role": m["role"], "content": _message_text(m.get("content"), i)})
    try:
        return tokenizer.apply_chat_template(plain)
    except OffloadgenError as e:
        raise ApiError(400, str(e), param="messages") from None
    except Exception as e:  # a template that raises on these messages (e.g. roles out of order)
        raise ApiError(400, f"cannot render the chat template: {e}", param="messages") from None


def _refuse_unsupported(body: dict) -> None:
    n = _field(body, "n", int, 1)
    if n != 1:
        raise ApiError(400, "only n=1 is supported", param="n", code="invalid_value")
    for key, accepted in UNSUPPORTED.items():
        if key in body and not any(body[key] == a and type(body[key]) is type(a) for a in accepted):
            raise ApiError(400, f"'{key}' is not supported by this server", param=key, code="unsupported_parameter")


def _sampling(body: dict, kind: str, n_prompt: int, max_len: int, defaults: SamplingParams | None) -> SamplingParams:
    base = defaults or SamplingParams(temperature=1.0)  # OpenAI's defaults: temperature 1, top_p 1
    max_tokens = _field(body, "max_tokens", int, check=lambda v: v >= 1, what="an integer >= 1")
    if kind == "chat" and max_tokens is None:
        max_tokens = _field(body, "max_completion_tokens", int, check=lambda v: v >= 1, what="an integer >= 1")
    if n_prompt >= max_len:
        raise ApiError(400, f"the prompt has {n_prompt} tokens; this model's context is {max_len} tokens",
                       param="messages" if kind == "chat" else "prompt", code="context_length_exceeded")
    if max_tokens is None:
        # OpenAI's defaults: 16 new tokens for a completion, the rest of the context for a chat
        max_tokens = base.max_new_tokens if defaults is not None else (16 if kind == "completion" else max_len - n_prompt)
    if n_prompt + max_tokens > max_len:
        raise ApiError(400, f"the prompt ({n_prompt} tokens) plus max_tokens ({max_tokens}) exceeds this model's "
                            f"context of {max_len} tokens", param="max_tokens", code="context_length_exceeded")
    top_k = _field(body, "top_k", int, base.top_k, lambda v: v >= -1, "an integer >= -1 (-1 or 0: no limit)")
    try:
        return SamplingParams(
            max_new_tokens=max_tokens,
            temperature=float(_field(body, "temperature", (int, float), base.temperature, lambda v: 0 <= v <= 2,
                                     "a number from 0 to 2")),
            top_p=float(_field(body, "top_p", (int, float), base.top_p, lambda v: 0 < v <= 1, "a number in (0, 1]")),
            top_k=max(top_k, 0), seed=_field(body, "seed", int, base.seed),
            stop=_stop_strings(body) if body.get("stop") is not None else list(base.stop),
            # extension (as vLLM's): generate exactly max_tokens, as load tests with dummy weights need
            ignore_eos=_field(body, "ignore_eos", bool, base.ignore_eos))
    except OffloadgenError as e:
        raise ApiError(400, str(e)) from None


def parse_request(kind: str, body, tokenizer, max_len: int, defaults: SamplingParams | None = None,
                  model_names: list[str] | None = None) -> ParsedRequest:
    """A request body -> prompt and sampling, or an ApiError that says what is wrong with it.

    max_len: the longest prompt + new tokens a request may take. defaults: sampling for absent
    keys (a job's command-line flags); None means OpenAI's defaults. model_names: the names this
    server answers to (None: any, as a Batch API file written for a hosted model must run)."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = _field(body, "model", str)
    if model_names is not None:
        if model is None:
            raise ApiError(400, "'model' is required", param="model", code="missing_required_parameter")
        if model not in model_names:
            raise ApiError(404, f"the model '{model}' does not exist; this server has {', '.join(model_names)}",
                           param="model", code="model_not_found")
    _refuse_unsupported(body)
    prompt = _chat_prompt(body, tokenizer) if kind == "chat" else _completion_prompt(body)
    try:
        prompt_ids = tokenizer.encode(prompt)
    except Exception as e:  # odd text a tokenizer refuses: the client's fault, not the server's
        raise ApiError(400, f"cannot tokenize the prompt ({type(e).__name__}: {e})") from None
    if not prompt_ids:
        raise ApiError(400, "the prompt is empty", param="prompt", code="invalid_value")
    sampling = _sampling(body, kind, len(prompt_ids), max_len, defaults)
    stream = _field(body, "stream", bool, False)
    options = _field(body, "stream_options", dict, {})
    include_usage = _field(options, "include_usage", bool, False)
    return ParsedRequest(kind, prompt, prompt_ids, sampling, stream, include_usage, model)


class TextAssembler:
    """Token ids as they come -> the text to send. Text that may still turn into a stop string,
    or an unfinished UTF-8 character, is held back; the text ends before the first stop string,
    as `LLM.generate`'s does. Decoding the whole answer each time keeps it exactly the text a
    one-shot decode gives (tokenizers merge spaces and bytes across token boundaries)."""

    def __init__(self, tokenizer, stop: list[str]):
        self.tokenizer, self.stop = tokenizer, stop
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False  # a stop string was found: the answer is complete

    def _text(self) -> str:
        text = self.tokenizer.decode(self.token_ids)
        cut = min((text.index(s) for s in self.stop if s in text), default=None)
        if cut is not None:
            self.stopped = True
            return text[:cut]
        return text

    @property
    def token_ids(self) -> list[int]:
        """The answer's tokens, without a final end-of-sequence token (as generate counts them)."""
        eos = getattr(self.tokenizer, "eos_token_ids", set())
        return self.ids[:-1] if self.ids and self.ids[-1] in eos else self.ids

    def add(self, new_ids: list[int]) -> str:
        """Take new tokens; return the text that is now safe to send."""
        self.ids += new_ids
        text = self._text()
        if not self.stopped:
            text = text.rstrip("\ufffd")
            hold = max((k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0)
            text = text[:len(text) - hold]
        return self._advance(text)

    def finish(self) -> str:
        """The rest of the text, once the answer is complete."""
        return self._advance(self._text())

    def _advance(self, text: str) -> str:
        if not text.startswith(self.sent) or len(text) <= len(self.sent):
            return ""
        delta, self.sent = text[len(self.sent):], text
        return delta


def new_id(kind: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + uuid.uuid4().hex


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def openai_finish_reason(reason: str | None) -> str | None:
    # EOS and stop strings are both "stop" to OpenAI; a cancelled answer ended early, as "length" does
    return {"stop": "stop", "length": "length", "cancelled": "length"}.get(reason, reason)


def response_body(kind: str, request_id: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int, created: int | None = None) -> dict:
    """A whole (non-streamed) answer."""
    choice = {"index": 0, "logprobs": None, "finish_reason": openai_finish_reason(finish_reason)}
    if kind == "chat":
        choice["message"] = {"role": "assistant", "content": text}
    else:
        choice["text"] = text
    return {"id": request_id, "object": "chat.completion" if kind == "chat" else "text_completion",
            "created": created or int(time.time()), "model": model, "choices": [choice],
            "usage": usage(prompt_tokens, completion_tokens)}


def chunk_body(kind: str, request_id: str, model: str, created: int, text: str = "", finish_reason: str | None = None,
               first: bool = False, with_usage_field: bool = False) -> dict:
    """One streamed piece; with include_usage every chunk carries "usage": null but the last."""
    choice = {"index": 0, "logprobs": None, "finish_reason": openai_finish_reason(finish_reason)}
    if kind == "chat":
        choice["delta"] = ({"role": "assistant", "content": text} if first else {"content": text}) \
            if text or first else {}
    else:
        choice["text"] = text
    body = {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [choice]}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk(kind: str, request_id: str, model: str, created: int, prompt_tokens: int,
                completion_tokens: int) -> dict:
    return {"id": request_id, "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
            "created": created, "model": model, "choices": [], "usage": usage(prompt_tokens, completion_tokens)}

"""OpenAI Batch API files, so that a batch prepared for a hosted API runs locally unchanged.

Request lines: {"custom_id": ..., "method": "POST", "url": "/v1/chat/completions" or
"/v1/completions", "body": {...}}; the body is read exactly as `offloadgen serve` reads a request
(openai_protocol.parse_request), with the command's sampling flags for absent keys. Its "model"
is not checked: the file names the hosted model it was written for.

Output lines (--output-format openai-batch): {"id", "custom_id", "response": {"status_code",
"request_id", "body"}, "error"}. A request the server would refuse gets the server's status and
error body; a line that is not a request at all gets "response": null and an "error". Each line
also carries offloadgen's "line" (and resume key), which OpenAI's readers ignore.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass

from .openai_protocol import KINDS, ApiError, ParsedRequest, parse_request, response_body
from .sampling import SamplingParams

OUTPUT_FORMATS = ("jsonl", "openai-batch")


@dataclass
class BatchRequest:
    custom_id: object
    kind: str | None = None  # "chat" or "completion"
    parsed: ParsedRequest | None = None
    error: ApiError | None = None  # a body the server would refuse (status_code, error body)
    line_error: str | None = None  # not a Batch API request line at all


def is_batch_request(rec) -> bool:
    """Whether a JSON input line is a Batch API request line rather than offloadgen's own."""
    return isinstance(rec, dict) and "custom_id" in rec and ("body" in rec or "url" in rec)


def parse_batch_line(rec: dict, tokenizer, max_context: int, defaults: SamplingParams) -> BatchRequest:
    """One request line -> its prompt and sampling, or what is wrong with it; never raises."""
    custom_id = rec.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return BatchRequest(custom_id, line_error="'custom_id' must be a non-empty string")
    if rec.get("method", "POST") != "POST":
        return BatchRequest(custom_id, line_error=f"'method' must be POST, not {rec.get('method')!r}")
    kind = KINDS.get(rec.get("url"))
    if kind is None:
        return BatchRequest(custom_id, line_error=f"'url' must be one of {', '.join(KINDS)}, not {rec.get('url')!r}")
    try:
        parsed = parse_request(kind, rec.get("body"), tokenizer, max_context, defaults=defaults)
    except ApiError as e:
        return BatchRequest(custom_id, kind, error=e)
    return BatchRequest(custom_id, kind, parsed)


def _ids() -> tuple[str, str]:
    return "batch_req_" + uuid.uuid4().hex, "req_" + uuid.uuid4().hex


def output_record(custom_id, kind: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                  completion_tokens: int) -> dict:
    """The output line of an answered request."""
    line_id, request_id = _ids()
    body = response_body(kind, new_id_for(kind, request_id), model, text, finish_reason, prompt_tokens,
                         completion_tokens)
    return {"id": line_id, "custom_id": custom_id,
            "response": {"status_code": 200, "request_id": request_id, "body": body}, "error": None}


def new_id_for(kind: str, request_id: str) -> str:
    return ("chatcmpl-" if kind == "chat" else "cmpl-") + request_id.removeprefix("req_")


def error_output_record(custom_id, message: str, error: ApiError | None = None) -> dict:
    """The output line of a request that got no answer: refused as the server would refuse it
    (error given), or not a request at all."""
    line_id, request_id = _ids()
    if error is not None:
        return {"id": line_id, "custom_id": custom_id,
                "response": {"status_code": error.status, "request_id": request_id, "body": error.body()},
                "error": None}
    return {"id": line_id, "custom_id": custom_id, "response": None,
            "error": {"code": "invalid_request", "message": message}}

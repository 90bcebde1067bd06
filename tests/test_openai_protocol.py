"""The request/response translation shared by the server and Batch API files: defaults, refusals,
and streamed text that never shows a stop string or a piece of one."""
import pytest

from offloadgen.models import preset
from offloadgen.openai_protocol import ApiError, TextAssembler, parse_request
from offloadgen.sampling import SamplingParams
from offloadgen.tokenizer import ByteTokenizer

TOK = ByteTokenizer(preset("opt-125m"))  # one token per byte: tests choose token boundaries exactly


def ids(text):
    return TOK.encode(text)


def test_openai_defaults_and_the_commands_defaults():
    chat = parse_request("chat", {"messages": [{"role": "user", "content": "hi"}]}, TOK, 100)
    assert chat.sampling.max_new_tokens == 100 - len(chat.prompt_ids)  # the rest of the context
    assert chat.sampling.temperature == 1.0
    completion = parse_request("completion", {"prompt": "hi"}, TOK, 100)
    assert completion.sampling.max_new_tokens == 16
    job = parse_request("completion", {"prompt": "hi", "top_p": 0.5}, TOK, 100,
                        defaults=SamplingParams(max_new_tokens=7, temperature=0, stop=["x"]))
    assert (job.sampling.max_new_tokens, job.sampling.temperature, job.sampling.top_p, job.sampling.stop) == \
        (7, 0, 0.5, ["x"])


@pytest.mark.parametrize("body, param", [
    ({"prompt": "hi", "echo": True}, "echo"),
    ({"prompt": "hi", "frequency_penalty": 0.5}, "frequency_penalty"),
    ({"prompt": "hi", "top_k": 1.5}, "top_k"),
    ({"prompt": "hi", "seed": "1"}, "seed"),
    ({"prompt": "hi", "stream": "yes"}, "stream"),
    ({"prompt": ["a", "b"]}, "prompt"),
    ({"prompt": "x" * 100}, "prompt"),
])
def test_refusals_name_the_parameter(body, param):
    with pytest.raises(ApiError) as e:
        parse_request("completion", body, TOK, 100)
    assert e.value.status == 400 and e.value.param == param


def test_default_values_of_unsupported_parameters_are_accepted():
    body = {"prompt": "hi", "echo": False, "frequency_penalty": 0, "logprobs": None, "n": 1, "user": "me"}
    assert parse_request("completion", body, TOK, 100).prompt == "hi"


def test_unknown_model_is_404_only_where_names_are_given():
    with pytest.raises(ApiError) as e:
        parse_request("completion", {"model": "gpt-4", "prompt": "hi"}, TOK, 100, model_names=["ours"])
    assert e.value.status == 404 and e.value.code == "model_not_found"
    assert parse_request("completion", {"model": "gpt-4", "prompt": "hi"}, TOK, 100).model == "gpt-4"


def test_streamed_text_holds_back_what_may_become_a_stop_string():
    asm = TextAssembler(TOK, ["STOP"])
    sent = [asm.add(ids(piece)) for piece in ["Hello ", "S", "T", "O", "P", " after"]]
    assert sent == ["Hello ", "", "", "", "", ""]  # "S", "ST", "STO" might be the start of STOP
    assert asm.stopped and asm.finish() == ""


def test_a_false_start_of_a_stop_string_is_released():
    asm = TextAssembler(TOK, ["STOP"])
    assert asm.add(ids("a ST")) == "a "
    assert asm.add(ids("ART")) == "START"
    assert asm.finish() == "" and not asm.stopped


def test_pieces_add_up_to_the_whole_text_without_eos():
    asm = TextAssembler(TOK, [])
    pieces = [asm.add(ids(c)) for c in "héllo wörld"]  # multi-byte characters arrive in halves
    eos = next(iter(TOK.eos_token_ids))
    pieces += [asm.add([eos]), asm.finish()]
    assert "".join(pieces) == "héllo wörld" and "\ufffd" not in "".join(pieces)
    assert len(asm.token_ids) == len(ids("héllo wörld"))  # the EOS is not counted

import orjson
import pytest
from pydantic import ValidationError

from exaserve.server.protocol import (
    SSE_DONE,
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    chat_choice,
    chat_chunk,
    chat_chunk_choice,
    chat_delta,
    chat_logprobs,
    chat_message,
    chat_response,
    completion_logprobs,
    error_body,
    json_depth_exceeds,
    new_request_id,
    sse_event,
    usage,
    validation_error_message,
)

USER = {"role": "user", "content": "Hi"}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]


def chat(**fields):
    return ChatCompletionRequest.model_validate({"model": "m", "messages": [USER], **fields})


def test_full_chat_request():
    req = chat(
        messages=[
            {"role": "developer", "content": [{"type": "text", "text": "Be"}, {"type": "text", "text": "brief."}]},
            USER,
            {"role": "assistant", "content": None, "reasoning": "thought",
             "tool_calls": [{"id": "call_1", "type": "function",
                             "function": {"name": "get_weather", "arguments": '{"city": "Seoul"}'}}]},
            {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
        ],
        tools=TOOLS, tool_choice={"type": "function", "function": {"name": "get_weather"}},
        stop="END", logit_bias={"42": -100, "7": 5.5}, logprobs=True, top_logprobs=3, stream=True,
        stream_options={"include_usage": True}, chat_template_kwargs={"enable_thinking": False},
        frobnicate=1, response_format={"type": "text"},  # unknown fields are ignored
    )
    assert req.messages[0].content == "Be\nbrief."
    assert req.stop == ["END"] and req.logit_bias == {42: -100.0, 7: 5.5}
    assert req.include_usage and req.parse_tools
    assert req.template_messages() == [
        {"role": "developer", "content": "Be\nbrief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": None, "reasoning_content": "thought",
         "tool_calls": [{"id": "call_1", "type": "function",
                         "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}]},
        {"role": "tool", "content": "sunny", "tool_call_id": "call_1"},
    ]
    assert req.template_tools() == TOOLS
    assert req.to_sampling_kwargs()["logprobs"] == 3


def test_parse_tools_needs_tools_and_a_choice_other_than_none():
    assert not chat().parse_tools
    assert chat(tools=TOOLS).parse_tools
    assert not chat(tools=TOOLS, tool_choice="none").parse_tools


@pytest.mark.parametrize("fields,param", [
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_completion_tokens": -1}, "max_completion_tokens"),
    ({"temperature": -0.1}, "temperature"),
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.01}, "top_p"),
    ({"n": 0}, "n"),
    ({"top_logprobs": 21}, "top_logprobs"),
    ({"logit_bias": {"abc": 1}}, "logit_bias.abc"),
    ({"stop": 5}, "stop"),
    ({"tool_choice": "sometimes"}, "tool_choice"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
    ({"messages": []}, "messages"),
    ({"messages": "hello"}, "messages"),
    ({"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role"),
    ({"messages": [USER, {"content": "x"}]}, "messages[1].role"),
    ({"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, "messages[0].content"),
    ({"messages": [{"role": "user"}]}, "messages[0]"),
    # strict types: a boolean is not an integer, a fraction not an integer, a string not a number
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 1.5}, "max_completion_tokens"),
    ({"n": True}, "n"),
    ({"n": 2.0}, "n"),
    ({"seed": False}, "seed"),
    ({"top_k": True}, "top_k"),
    ({"top_logprobs": True}, "top_logprobs"),
    ({"logprobs": 1}, "logprobs"),
    ({"temperature": "0.5"}, "temperature"),
    ({"temperature": True}, "temperature"),
    ({"stream": "yes"}, "stream"),
    ({"stop_token_ids": [True]}, "stop_token_ids[0]"),
    ({"logit_bias": {"5": True}}, "logit_bias[5]"),
    ({"logit_bias": {"1.5": 1}}, "logit_bias"),
    ({"chat_template_kwargs": {"messages": []}}, "chat_template_kwargs"),
    ({"chat_template_kwargs": {"add_generation_prompt": False}}, "chat_template_kwargs"),
    ({"reasoning_effort": "extreme"}, "reasoning_effort"),
])
def test_bad_chat_requests_name_the_field(fields, param):
    with pytest.raises(ValidationError) as info:
        chat(**fields)
    message, got = validation_error_message(info.value)
    assert got == param and message.startswith(param + ": ")


def test_strict_types_keep_what_openai_accepts():
    req = chat(temperature=1, top_p=1, presence_penalty=0, max_tokens=5, n=2, seed=-3, logit_bias={"7": 1})
    assert req.temperature == 1.0 and isinstance(req.temperature, float) and req.logit_bias == {7: 1.0}
    assert req.max_tokens == 5 and req.n == 2 and req.seed == -3


@pytest.mark.parametrize("prompt", [[True, False], [[1, True]], [1.5], "x".encode()])
def test_token_id_prompts_are_integers(prompt):
    with pytest.raises(ValidationError) as info:
        CompletionRequest.model_validate({"prompt": prompt})
    assert validation_error_message(info.value)[1] == "prompt"
    with pytest.raises(ValidationError):
        DetokenizeRequest.model_validate({"tokens": [1, True]})


def test_reserved_template_kwargs_are_refused_by_name():
    for name in ("messages", "tools", "add_generation_prompt", "bos_token", "eos_token"):
        with pytest.raises(ValidationError) as info:
            TokenizeRequest.model_validate({"messages": [USER], "chat_template_kwargs": {name: 1}})
        message, param = validation_error_message(info.value)
        assert param == "chat_template_kwargs" and repr(name) in message
    # any other name is a template variable, those of render_chat's own parameters included
    assert chat(chat_template_kwargs={"template": "x"}).template_kwargs() == {"template": "x"}


def test_reasoning_effort():
    assert chat().template_kwargs() == {}
    assert chat(reasoning_effort="none").template_kwargs() == {"reasoning_effort": "none", "enable_thinking": False}
    assert chat(reasoning_effort="high").template_kwargs() == {"reasoning_effort": "high"}
    assert chat(reasoning_effort="minimal").template_kwargs() == {"reasoning_effort": "minimal"}
    # chat_template_kwargs say it explicitly: they win
    assert chat(reasoning_effort="none", chat_template_kwargs={"enable_thinking": True}).template_kwargs() == {
        "reasoning_effort": "none", "enable_thinking": True}


def test_suffix_and_best_of_are_refused_unless_they_change_nothing():
    def completion(**fields):
        return CompletionRequest.model_validate({"prompt": "a", **fields})

    assert completion(suffix=None).suffix is None and completion(suffix="").suffix == ""
    assert completion(best_of=None).best_of is None and completion(n=3, best_of=3).best_of == 3
    for fields, param, fragment in (({"suffix": "end"}, "suffix", "not supported"),
                                    ({"best_of": 2}, "best_of", "best_of equal to n"),
                                    ({"n": 2, "best_of": 4}, "best_of", "best_of equal to n")):
        with pytest.raises(ValidationError) as info:
            completion(**fields)
        message, got = validation_error_message(info.value)
        assert got == param and fragment in message


def test_json_depth():
    assert not json_depth_exceeds({"a": [1, {"b": []}]}, 4) and json_depth_exceeds({"a": [1, {"b": []}]}, 3)
    assert json_depth_exceeds({"a": [1, {"b": [[]]}], "c": 1}, 4)
    assert not json_depth_exceeds("text", 0) and not json_depth_exceeds([], 1) and json_depth_exceeds([], 0)
    deep = []
    for _ in range(100_000):  # far past the recursion limit: the check is iterative
        deep = [deep]
    assert json_depth_exceeds({"x": deep}, 64) and not json_depth_exceeds({"x": deep}, 100_002)


def test_error_envelope():
    with pytest.raises(ValidationError) as info:
        chat(temperature=3)
    message, param = validation_error_message(info.value)
    body = error_body(message, param=param)
    assert body == {"error": {"message": "temperature: Input should be less than or equal to 2",
                              "type": "BadRequestError", "param": "temperature", "code": 400}}
    assert error_body("gone", type="NotFoundError", code=404) == {
        "error": {"message": "gone", "type": "NotFoundError", "param": None, "code": 404}}


def test_sampling_kwargs_precedence():
    defaults = {"temperature": 0.6, "top_p": 0.95, "top_k": 20, "max_new_tokens": 99}
    kwargs = chat(temperature=0, seed=7, stop_token_ids=[5]).to_sampling_kwargs(defaults, default_max_tokens=1000)
    assert kwargs == {"temperature": 0, "top_p": 0.95, "top_k": 20, "max_tokens": 1000, "seed": 7, "stop": None,
                      "stop_token_ids": [5], "logit_bias": None, "ignore_eos": False, "min_tokens": 0,
                      "skip_special_tokens": True, "logprobs": None}
    # Without defaults the engine's own defaults apply: the keys are left out.
    assert "temperature" not in chat().to_sampling_kwargs() and "max_tokens" not in chat().to_sampling_kwargs()
    assert chat(max_tokens=5).to_sampling_kwargs(default_max_tokens=1000)["max_tokens"] == 5
    assert chat(max_tokens=5, max_completion_tokens=9).to_sampling_kwargs()["max_tokens"] == 9
    assert chat(logprobs=True).to_sampling_kwargs()["logprobs"] == 0


def test_completion_request():
    assert CompletionRequest(prompt="a").prompts() == ["a"]
    assert CompletionRequest(prompt=["a", "b"]).prompts() == ["a", "b"]
    assert CompletionRequest(prompt=[1, 2]).prompts() == [[1, 2]]
    assert CompletionRequest(prompt=[[1], [2, 3]]).prompts() == [[1], [2, 3]]
    req = CompletionRequest.model_validate({"prompt": "a", "logprobs": 2, "echo": True, "suffix": ""})
    assert req.to_sampling_kwargs({"top_p": 0.5})["max_tokens"] == 16  # the OpenAI default
    assert req.to_sampling_kwargs()["logprobs"] == 2 and req.echo
    assert CompletionRequest(prompt="a", max_tokens=None).to_sampling_kwargs(default_max_tokens=77)["max_tokens"] == 77
    for bad in ({"prompt": []}, {"prompt": [[1], []]}, {"prompt": 3}, {}, {"prompt": "a", "logprobs": 21},
                {"prompt": "a", "max_tokens": 0}):
        with pytest.raises(ValidationError):
            CompletionRequest.model_validate(bad)


def test_tokenize_requests():
    assert TokenizeRequest(prompt="hi").add_special_tokens
    assert TokenizeRequest(messages=[USER]).messages[0].content == "Hi"
    with pytest.raises(ValidationError):
        TokenizeRequest()
    with pytest.raises(ValidationError):
        TokenizeRequest(prompt="hi", messages=[USER])
    assert DetokenizeRequest(tokens=[1, 2]).tokens == [1, 2]
    with pytest.raises(ValidationError):
        DetokenizeRequest(tokens=["x"])


def test_response_builders():
    rid = new_request_id("chatcmpl")
    assert rid.startswith("chatcmpl-") and rid != new_request_id("chatcmpl")
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = chat_response(rid, "m", 123, [chat_choice(0, chat_message(None, "why", [call]), "tool_calls")],
                         usage(3, 4, 2))
    assert body == {
        "id": rid, "object": "chat.completion", "created": 123, "model": "m",
        "choices": [{"index": 0, "logprobs": None, "finish_reason": "tool_calls",
                     "message": {"role": "assistant", "content": None, "reasoning_content": "why", "reasoning": "why",
                                 "tool_calls": [call]}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7,
                  "prompt_tokens_details": {"cached_tokens": 2}},
    }
    chunk = chat_chunk(rid, "m", 123, [chat_chunk_choice(0, chat_delta(content="Hi", reasoning=""))])
    assert "usage" not in chunk and chunk["object"] == "chat.completion.chunk"
    assert chunk["choices"] == [{"index": 0, "delta": {"content": "Hi"}, "logprobs": None, "finish_reason": None}]
    assert sse_event(chunk) == b"data: " + orjson.dumps(chunk) + b"\n\n" and SSE_DONE == b"data: [DONE]\n\n"


def test_logprob_builders():
    tokens = [("Hi", -0.5, [("Hi", -0.5), ("Yo", -1.5)]), ("é", -0.25, [])]
    assert chat_logprobs(tokens) == {"content": [
        {"token": "Hi", "logprob": -0.5, "bytes": [72, 105],
         "top_logprobs": [{"token": "Hi", "logprob": -0.5, "bytes": [72, 105]},
                          {"token": "Yo", "logprob": -1.5, "bytes": [89, 111]}]},
        {"token": "é", "logprob": -0.25, "bytes": [195, 169], "top_logprobs": []},
    ]}
    assert completion_logprobs(tokens, text_offset=4) == {
        "tokens": ["Hi", "é"], "token_logprobs": [-0.5, -0.25], "top_logprobs": [{"Hi": -0.5, "Yo": -1.5}, {}],
        "text_offset": [4, 6]}

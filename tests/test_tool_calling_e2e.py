"""Tool calling end to end: a scripted checkpoint writes a fixed K-EXAONE turn (reasoning, `</think>`, one
`<tool_call>`), served by a live server and read back through the official openai client."""
import json

import pytest
from scripted_checkpoint import ANSWER_TURN, make_scripted_checkpoint

pytest_plugins = ["server_fixture"]

MODEL = "scripted"
REASONING = "I should look up the weather."
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}}}
ASK = [{"role": "user", "content": "What is the weather in Seoul?"}]
GREEDY = {"temperature": 0, "max_tokens": 64}


@pytest.fixture(scope="module")
def server(tmp_path_factory, live_server):
    checkpoint = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))
    with live_server(checkpoint, "--dtype", "float32", "--served-model-name", MODEL) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_tool_call(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], **GREEDY)
    (choice,) = response.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.reasoning_content == choice.message.reasoning == REASONING
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Seoul"})


def test_streamed_tool_call(client):
    stream = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], stream=True, **GREEDY)
    reasoning, content, kinds, pieces, finish = "", "", [], [], None
    for chunk in stream:
        (choice,) = chunk.choices
        delta = choice.delta
        if getattr(delta, "reasoning_content", None):
            reasoning += delta.reasoning_content
            kinds.append("reasoning")
        if delta.content:
            content += delta.content
            kinds.append("content")
        for piece in delta.tool_calls or ():
            pieces.append(piece)
            kinds.append("tool_call")
        finish = choice.finish_reason or finish
    assert (reasoning, content, finish) == (REASONING, "", "tool_calls")
    assert kinds == sorted(kinds, key=["reasoning", "content", "tool_call"].index)
    first, rest = pieces[0], pieces[1:]
    assert (first.index, first.type, first.function.name) == (0, "function", "get_weather")
    assert first.id.startswith("call_")
    assert all(piece.index == 0 and piece.id is None for piece in rest)
    arguments = "".join(piece.function.arguments or "" for piece in pieces)
    assert json.loads(arguments) == {"city": "Seoul"}


def test_thinking_off_answers_with_content(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], **GREEDY,
                                              extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    (choice,) = response.choices
    assert (choice.message.content, choice.message.reasoning_content) == (ANSWER_TURN, None)
    assert (choice.message.tool_calls, choice.finish_reason) == (None, "stop")


def test_tool_choice_none_keeps_the_call_as_text(client):
    response = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="none",
                                              **GREEDY)
    (choice,) = response.choices
    assert choice.message.reasoning_content == REASONING
    assert choice.message.content == '<tool_call>{"name": "get_weather", "arguments": {"city": "Seoul"}}</tool_call>'
    assert (choice.message.tool_calls, choice.finish_reason) == (None, "stop")


def test_named_tool_choice_forces_a_call_to_that_function(client):
    named = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], **GREEDY,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    (call,) = named.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_weather", {"city": "Seoul"})
    # the script calls get_weather; the grammar makes it call get_time instead (with its only arguments, {})
    other = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER, TIME], **GREEDY,
                                           tool_choice={"type": "function", "function": {"name": "get_time"}})
    (choice,) = other.choices
    (call,) = choice.message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("get_time", {})
    assert (choice.message.content, choice.finish_reason) == (None, "tool_calls")
    assert choice.message.reasoning_content == REASONING    # the reasoning before </think> stays free


def test_the_call_and_its_result_go_back_into_the_conversation(client):
    first = client.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], **GREEDY)
    message = first.choices[0].message
    history = ASK + [message.model_dump(exclude_none=True),
                     {"role": "tool", "tool_call_id": message.tool_calls[0].id, "content": '{"sky": "sunny"}'}]
    response = client.chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], **GREEDY)
    # The scripted model answers any prompt that ends inside <think> with the same call.
    assert response.choices[0].finish_reason == "tool_calls"
    assert response.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens

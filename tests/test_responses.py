"""The Responses API (server/responses.py): input items to chat messages, and a live server on a scripted
checkpoint (a fixed K-EXAONE turn: reasoning, `</think>`, one tool call; or, thinking off, a plain answer) read
back through the official openai client's responses.create and responses.stream."""
import json
import time

import httpx
import jsonschema
import openai
import pytest
from scripted_checkpoint import ANSWER_TURN, make_scripted_checkpoint

from exaserve.server.responses import ResponseBuilder, ResponsesRequest

pytest_plugins = ["server_fixture"]

MODEL = "scripted"
REASONING = "I should look up the weather."
WEATHER = {"type": "function", "name": "get_weather", "description": "Current weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}
ASK = "What is the weather in Seoul?"
NO_THINKING = {"effort": "none"}


# ---------------------------------------------------------------- request items (no server)

def test_items_become_chat_turns_with_interleaved_reasoning():
    request = ResponsesRequest.model_validate({"instructions": "Be brief.", "input": [
        {"role": "user", "content": "Weather in Seoul and Busan?"},                       # no type: a message
        {"type": "reasoning", "id": "rs_1", "summary": [], "content": [{"type": "reasoning_text", "text": "Two."}]},
        {"type": "function_call", "call_id": "call_a", "name": "get_weather", "arguments": '{"city": "Seoul"}'},
        {"type": "function_call", "call_id": "call_b", "name": "get_weather", "arguments": '{"city": "Busan"}'},
        {"type": "function_call_output", "call_id": "call_a", "output": "sunny"},
        {"type": "function_call_output", "call_id": "call_b", "output": [{"type": "input_text", "text": "rain"}]},
        {"type": "reasoning", "summary": [{"type": "summary_text", "text": "Now answer."}]},
        {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": "Sunny; rain."}]},
        {"role": "user", "content": [{"type": "input_text", "text": "Thanks"}]},
    ]})
    assert request.messages() == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Seoul and Busan?"},
        {"role": "assistant", "content": None, "reasoning_content": "Two.", "tool_calls": [
            {"id": f"call_{c}", "type": "function",
             "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
            for c, city in (("a", "Seoul"), ("b", "Busan"))]},
        {"role": "tool", "tool_call_id": "call_a", "content": "sunny"},
        {"role": "tool", "tool_call_id": "call_b", "content": "rain"},
        {"role": "assistant", "content": "Sunny; rain.", "reasoning_content": "Now answer."},
        {"role": "user", "content": "Thanks"},
    ]
    assert ResponsesRequest.model_validate({"input": "Hi"}).messages() == [{"role": "user", "content": "Hi"}]


def test_request_maps_onto_the_chat_request():
    request = ResponsesRequest.model_validate({
        "input": "Hi", "tools": [WEATHER], "tool_choice": {"type": "function", "name": "get_weather"},
        "max_output_tokens": 50, "temperature": 0.5, "reasoning": {"effort": "none"}, "parallel_tool_calls": False,
        "text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "object"}, "strict": True}}})
    chat = request.to_chat()
    assert chat["tools"] == [{"type": "function", "function": {k: WEATHER[k] for k in
                                                                 ("name", "description", "parameters")}}]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "get_weather"}}
    assert (chat["max_tokens"], chat["temperature"], chat["reasoning_effort"]) == (50, 0.5, "none")
    assert chat["response_format"] == {"type": "json_schema",
                                       "json_schema": {"name": "w", "schema": {"type": "object"}, "strict": True}}
    echo = request.echo()
    assert echo["parallel_tool_calls"] is False and echo["store"] is False
    assert echo["text"]["format"]["type"] == "json_schema" and echo["tools"][0]["name"] == "get_weather"


@pytest.mark.parametrize("body, message", [
    ({"input": []}, "must not be empty"),
    ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]},
     "only text is supported"),
    ({"input": "Hi", "tools": [{"type": "web_search"}]}, "only function tools are supported"),
    ({"input": "Hi", "previous_response_id": "resp_1"}, "does not store responses"),
    ({"input": [{"type": "computer_call", "call_id": "c"}]}, "does not match any of the expected tags"),
    ({"input": "Hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "needs a schema"),
])
def test_bad_requests_name_the_problem(body, message):
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match=message):
        ResponsesRequest.model_validate(body)


def test_builder_events_accumulate_to_the_response():
    from exaserve.server.parsers import ParsedDelta, ToolCallDelta

    builder = ResponseBuilder("resp_x", "m", ResponsesRequest.model_validate({"input": "Hi"}).echo())
    events = builder.start()
    events += builder.feed(ParsedDelta(reasoning="Think"))
    events += builder.feed(ParsedDelta(reasoning=" more", content="Hel"))
    events += builder.feed(ParsedDelta(content="lo", tool_calls=[ToolCallDelta(0, "call_1", "f", '{"a"')]))
    events += builder.feed(ParsedDelta(tool_calls=[ToolCallDelta(0, arguments=": 1}")]))
    events += builder.finish("tool_calls", {"input_tokens": 1})
    assert [e["sequence_number"] for e in events] == list(range(len(events)))
    kinds = [e["type"].removeprefix("response.") for e in events]
    assert kinds == ["created", "in_progress",
                     "output_item.added", "content_part.added", "reasoning_text.delta", "reasoning_text.delta",
                     "reasoning_text.done", "content_part.done", "output_item.done",
                     "output_item.added", "content_part.added", "output_text.delta", "output_text.delta",
                     "output_text.done", "content_part.done", "output_item.done",
                     "output_item.added", "function_call_arguments.delta", "function_call_arguments.delta",
                     "function_call_arguments.done", "output_item.done", "completed"]
    reasoning, message, call = builder.response()["output"]
    assert reasoning["content"] == [{"type": "reasoning_text", "text": "Think more"}]
    assert message["content"][0]["text"] == "Hello" and message["status"] == "completed"
    assert (call["call_id"], call["name"], call["arguments"]) == ("call_1", "f", '{"a": 1}')
    assert events[-1]["response"]["status"] == "completed"
    assert builder.response()["usage"] == {"input_tokens": 1}


def test_output_items_keep_the_order_the_model_wrote():
    """Text after a tool call in the same step (several tokens per step: MTP, or the end of the output) becomes a
    message item after the call, not before it: the parser's delta keeps its parts in order."""
    from exaserve.server.parsers import OutputParser

    parser = OutputParser(starts_in_reasoning=True, parse_tools=True, id_factory=lambda: "call_1")
    delta = parser.feed('Plan.</think>Checking.<tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call>'
                        "\nDone, see above.")
    tail = parser.finish()
    for kind, value in tail.ordered():
        delta.add(kind, value)
    assert [kind for kind, _ in delta.ordered()] == ["reasoning", "content", "tool_call", "tool_call", "content"]
    assert (delta.reasoning, delta.content) == ("Plan.", "Checking.Done, see above.")
    builder = ResponseBuilder("resp_x", "m", ResponsesRequest.model_validate({"input": "Hi"}).echo())
    builder.feed(delta)
    builder.finish("tool_calls", {})
    output = builder.response()["output"]
    assert [item["type"] for item in output] == ["reasoning", "message", "function_call", "message"]
    assert [output[1]["content"][0]["text"], output[3]["content"][0]["text"]] == ["Checking.", "Done, see above."]
    assert (output[2]["name"], output[2]["arguments"]) == ("f", '{"a": 1}')


def test_builder_fails_the_response_mid_stream():
    from exaserve.server.parsers import ParsedDelta

    builder = ResponseBuilder("resp_x", "m", ResponsesRequest.model_validate({"input": "Hi"}).echo())
    builder.start()
    builder.feed(ParsedDelta(content="Hel"))
    events = builder.fail("the server is shutting down", "server_error")
    assert [e["type"] for e in events] == ["error", "response.output_text.done", "response.content_part.done",
                                           "response.output_item.done", "response.failed"]
    response = events[-1]["response"]
    assert response["status"] == "failed" and response["output"][0]["status"] == "incomplete"
    assert response["error"] == {"code": "server_error", "message": "the server is shutting down"}


# ---------------------------------------------------------------- live server

@pytest.fixture(scope="module")
def server(tmp_path_factory, live_server):
    checkpoint = make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))
    with live_server(checkpoint, "--dtype", "float32", "--served-model-name", MODEL) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return server.openai()


def test_plain_text_with_thinking_off(client):
    response = client.responses.create(model=MODEL, input=ASK, reasoning=NO_THINKING, temperature=0)
    assert response.status == "completed" and response.id.startswith("resp_")
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.status == "completed"
    assert response.output_text == ANSWER_TURN
    usage = response.usage
    assert usage.input_tokens > 0 and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_reasoning_then_a_tool_call_then_the_answer(client):
    first = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], temperature=0)
    assert first.status == "completed"
    reasoning, call = first.output
    assert reasoning.type == "reasoning" and reasoning.content[0].text == REASONING
    assert call.type == "function_call" and call.call_id.startswith("call_") and call.name == "get_weather"
    assert json.loads(call.arguments) == {"city": "Seoul"}
    details = first.usage.output_tokens_details
    assert 0 < details.reasoning_tokens < first.usage.output_tokens
    # the round trip: the output items go back with the tool's result; thinking off, the model answers
    follow_up = [{"role": "user", "content": ASK}, *[item.model_dump(exclude_none=True) for item in first.output],
                 {"type": "function_call_output", "call_id": call.call_id, "output": "sunny, 21 C"}]
    second = client.responses.create(model=MODEL, input=follow_up, tools=[WEATHER], reasoning=NO_THINKING,
                                     temperature=0)
    assert second.output_text == ANSWER_TURN and [item.type for item in second.output] == ["message"]
    assert second.usage.input_tokens > first.usage.input_tokens + 5       # the reasoning, call and result
    # the reasoning item passed back is rendered into the assistant turn (interleaved thinking)
    without = client.responses.create(model=MODEL, input=[follow_up[0], *follow_up[2:]], tools=[WEATHER],
                                      reasoning=NO_THINKING, temperature=0, max_output_tokens=1)
    assert without.usage.input_tokens < second.usage.input_tokens


def streamed(client, **kwargs):
    events = []
    with client.responses.stream(model=MODEL, **kwargs) as stream:
        for event in stream:
            events.append(event)
        final = stream.get_final_response()
    return events, final


def test_stream_events_in_order_and_equal_to_the_full_response(client):
    events, final = streamed(client, input=ASK, tools=[WEATHER], temperature=0)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    kinds = [e.type.removeprefix("response.") for e in events]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1] or not k.endswith("delta")]
    assert collapsed == ["created", "in_progress",
                         "output_item.added", "content_part.added", "reasoning_text.delta", "reasoning_text.done",
                         "content_part.done", "output_item.done",
                         "output_item.added", "function_call_arguments.delta", "function_call_arguments.done",
                         "output_item.done", "completed"]
    assert "".join(e.delta for e in events if e.type == "response.reasoning_text.delta") == REASONING
    arguments = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    full = client.responses.create(model=MODEL, input=ASK, tools=[WEATHER], temperature=0)
    assert [(i.type, getattr(i, "name", None)) for i in final.output] == [(i.type, getattr(i, "name", None))
                                                                          for i in full.output]
    assert final.output[0].content[0].text == full.output[0].content[0].text == REASONING
    assert final.output[1].arguments == arguments and json.loads(arguments) == json.loads(full.output[1].arguments)
    assert [i.status for i in final.output] == [i.status for i in full.output] == ["completed", "completed"]
    assert final.status == full.status == "completed"
    assert final.usage.model_dump() == full.usage.model_dump()
    assert (final.tools, final.tool_choice, final.parallel_tool_calls) == (full.tools, full.tool_choice, True)

    events, final = streamed(client, input=ASK, reasoning=NO_THINKING, temperature=0)
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == final.output_text == ANSWER_TURN
    assert [e.type for e in events if "content_part" in e.type] == ["response.content_part.added",
                                                                    "response.content_part.done"]


def test_max_output_tokens_leaves_the_response_incomplete(client, server):
    response = client.responses.create(model=MODEL, input=ASK, max_output_tokens=1, temperature=0)
    assert response.status == "incomplete" and response.incomplete_details.reason == "max_output_tokens"
    (reasoning,) = response.output      # cut inside the reasoning
    assert reasoning.type == "reasoning" and reasoning.status == "incomplete"
    assert response.usage.output_tokens == response.usage.output_tokens_details.reasoning_tokens == 1
    lines = httpx.post(f"{server.url}/v1/responses", timeout=60, json={
        "model": MODEL, "input": ASK, "max_output_tokens": 1, "stream": True}).text
    assert lines.count("event: response.incomplete\n") == 1 and "[DONE]" not in lines


def test_json_schema_through_text_format(client):
    schema = {"type": "object", "properties": {"kind": {"enum": ["capital", "port"]},
                                               "rank": {"type": "integer", "minimum": 0, "maximum": 9}},
              "required": ["kind", "rank"], "additionalProperties": False}
    response = client.responses.create(model=MODEL, input=ASK, reasoning=NO_THINKING, temperature=0,
                                       text={"format": {"type": "json_schema", "name": "city", "schema": schema}})
    jsonschema.validate(json.loads(response.output_text), schema)
    assert response.text.format.type == "json_schema"


def test_bad_input_is_400_and_the_server_keeps_serving(client):
    for kwargs, message in [({"previous_response_id": "resp_123"}, "does not store responses"),
                            ({"tools": [{"type": "web_search"}]}, "only function tools"),
                            ({"tool_choice": {"type": "function", "name": "nope"}, "tools": [WEATHER]},
                             "unknown tool 'nope'"),
                            ({"max_output_tokens": 0}, "max_output_tokens"),
                            ({"extra_body": {"background": True}}, "no background responses"),
                            ({"extra_body": {"conversation": "conv_1"}}, "keeps no conversations")]:
        with pytest.raises(openai.BadRequestError, match=message) as info:
            client.responses.create(model=MODEL, input=ASK, **kwargs)
        assert info.value.status_code == 400 and info.value.response.json()["error"]["type"] == "BadRequestError"
    with pytest.raises(openai.NotFoundError):
        client.responses.create(model="other", input=ASK)
    assert client.responses.create(model=MODEL, input=ASK, reasoning=NO_THINKING).status == "completed"


def test_disconnect_aborts_the_request(server):
    before = server.metrics()["exaserve_request_aborts_total"]
    body = {"model": MODEL, "input": ASK, "max_output_tokens": 3000, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/responses", json=body, timeout=60) as response:
        lines = response.iter_lines()
        assert next(lines) == "event: response.created"
        # the request is running in the engine: it sent a token (as the chat endpoint's disconnect test waits)
        assert any(line.startswith("event: ") and line.endswith("_text.delta") for line in lines)
    deadline = time.monotonic() + 60
    while server.metrics()["exaserve_request_aborts_total"] != before + 1:
        assert time.monotonic() < deadline, "the request was not aborted"
        time.sleep(0.05)
    assert server.metrics()["exaserve_num_requests_running"] == 0

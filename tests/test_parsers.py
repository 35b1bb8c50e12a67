import itertools
import random
import re

import pytest

from exaserve.server.parsers import OutputParser, ParsedOutput, ToolCall, new_tool_call_id, parse_full


def counting_ids():
    counter = itertools.count()
    return lambda: f"call_{next(counter)}"


def call(n, name, arguments):
    return ToolCall(f"call_{n}", name, arguments)


WEATHER = '<tool_call>{"name": "get_weather", "arguments": {"city": "서울", "unit": "c"}}</tool_call>'
TIME = '<tool_call>{"name": "get_time", "arguments": "{\\"tz\\": \\"KST\\"}"}</tool_call>'

# (name, output text, starts_in_reasoning, parse_tools, expected)
CASES = [
    ("reasoning only", "  Thinking hard\nabout it.  \n", True, True,
     ParsedOutput("Thinking hard\nabout it.", None, [])),
    ("reasoning and answer", "Let me think.\n</think>\n\nThe answer is 4.\n", True, True,
     ParsedOutput("Let me think.", "The answer is 4.\n", [])),
    ("empty reasoning", "\n</think>\n\nHi", True, True, ParsedOutput(None, "Hi", [])),
    ("repeated <think> opener", "<think>\nhmm\n</think>\n\nHi", True, True, ParsedOutput("hmm", "Hi", [])),
    ("reasoning and one call", "I need the weather.\n</think>\n\n" + WEATHER, True, True,
     ParsedOutput("I need the weather.", None, [call(0, "get_weather", '{"city": "서울", "unit": "c"}')])),
    ("two calls", "Two lookups.\n</think>\n\n" + WEATHER + "\n" + TIME + "\n", True, True,
     ParsedOutput("Two lookups.", None, [call(0, "get_weather", '{"city": "서울", "unit": "c"}'),
                                         call(1, "get_time", '{"tz": "KST"}')])),
    ("content then call", "ok\n</think>\n\nLet me check.\n" + WEATHER, True, True,
     ParsedOutput("ok", "Let me check.", [call(0, "get_weather", '{"city": "서울", "unit": "c"}')])),
    ("text after a call", WEATHER + "\n\nDone <b>here</b>.", False, True,
     ParsedOutput(None, "Done <b>here</b>.", [call(0, "get_weather", '{"city": "서울", "unit": "c"}')])),
    ("call without arguments", '<tool_call>{"name": "ping"}</tool_call>', False, True,
     ParsedOutput(None, None, [call(0, "ping", "{}")])),
    ("malformed calls stay content",
     'A <tool_call>{"name": 1}</tool_call>\n<tool_call>not json</tool_call> '
     '<tool_call>{"name": "f", "arguments": [1]}</tool_call>\n' + TIME, False, True,
     ParsedOutput(None, 'A <tool_call>{"name": 1}</tool_call>\n<tool_call>not json</tool_call> '
                        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
                  [call(0, "get_time", '{"tz": "KST"}')])),
    ("unclosed call", "r\n</think>\n\nSure. <tool_call>{\"name\": \"get_weather\", \"argu", True, True,
     ParsedOutput("r", "Sure. <tool_call>{\"name\": \"get_weather\", \"argu", [])),
    ("unclosed call before a good one", "x <tool_call>{\"na\n" + WEATHER, False, True,
     ParsedOutput(None, "x <tool_call>{\"na", [call(0, "get_weather", '{"city": "서울", "unit": "c"}')])),
    ("thinking off", "\n Hello <world> </thin", False, True, ParsedOutput(None, "Hello <world> </thin", [])),
    ("stray think block, thinking off", " <think>\nplan\n</think>\n\nAnswer <think>", False, True,
     ParsedOutput("plan", "Answer <think>", [])),
    ("lone tag prefix at the end", "abc</think>\n\n<tool_c", True, True, ParsedOutput("abc", "<tool_c", [])),
    ("parse_tools off", "r</think>\n" + WEATHER, True, False, ParsedOutput("r", WEATHER, [])),
    ("reasoning cut short", "partial </thi", True, True, ParsedOutput("partial </thi", None, [])),
]


def stream(pieces, starts_in_reasoning, parse_tools):
    parser = OutputParser(starts_in_reasoning=starts_in_reasoning, parse_tools=parse_tools, id_factory=counting_ids())
    return ParsedOutput.from_deltas([parser.feed(piece) for piece in pieces] + [parser.finish()])


@pytest.mark.parametrize("name,text,in_reasoning,tools,expected", CASES, ids=[c[0] for c in CASES])
def test_whole_text(name, text, in_reasoning, tools, expected):
    assert parse_full(text, starts_in_reasoning=in_reasoning, parse_tools=tools, id_factory=counting_ids()) == expected


@pytest.mark.parametrize("name,text,in_reasoning,tools,expected", CASES, ids=[c[0] for c in CASES])
def test_stream_equals_whole_text_for_any_split(name, text, in_reasoning, tools, expected):
    for cut in range(len(text) + 1):
        assert stream([text[:cut], text[cut:]], in_reasoning, tools) == expected, cut
    assert stream(list(text), in_reasoning, tools) == expected
    rng = random.Random(name)
    for _ in range(20):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 8))))
        pieces = [text[a:b] for a, b in zip([0] + cuts, cuts + [len(text)])]
        assert stream(pieces, in_reasoning, tools) == expected, pieces


def test_stream_emits_text_as_soon_as_it_is_decided():
    parser = OutputParser(starts_in_reasoning=True, parse_tools=True)
    assert parser.feed("Some reasoning").reasoning == "Some reasoning"
    assert parser.feed(" more \n</th").reasoning == " more"  # whitespace and a tag prefix are held back
    assert parser.feed("ink>\n\nAnswer: <").content == "Answer:"
    assert parser.feed("b>").content == " <b>"
    assert not parser.finish()


def test_tool_call_deltas_have_the_openai_stream_shape():
    parser = OutputParser(starts_in_reasoning=False, parse_tools=True, id_factory=lambda: "call_x")
    assert parser.feed(WEATHER[:20]).tool_calls == []
    pieces = [delta.to_openai() for delta in parser.feed(WEATHER[20:] + TIME).tool_calls]
    assert pieces == [
        {"index": 0, "id": "call_x", "type": "function", "function": {"name": "get_weather", "arguments": ""}},
        {"index": 0, "function": {"arguments": '{"city": "서울", "unit": "c"}'}},
        {"index": 1, "id": "call_x", "type": "function", "function": {"name": "get_time", "arguments": ""}},
        {"index": 1, "function": {"arguments": '{"tz": "KST"}'}},
    ]


def test_tool_call_to_openai_and_default_ids():
    out = parse_full(WEATHER + TIME, starts_in_reasoning=False, parse_tools=True)
    first, second = (c.to_openai() for c in out.tool_calls)
    assert first["type"] == "function" and first["function"]["name"] == "get_weather"
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", first["id"]) and first["id"] != second["id"]
    assert re.fullmatch(r"call_[A-Za-z0-9]{24}", new_tool_call_id())


def test_stream_equals_whole_text_on_random_tag_soup():
    atoms = ["<think>", "</think>", "<tool_call>", "</tool_call>", '{"name": "f", "arguments": {"a": 1}}',
             '{"name": "g"}', "{bad", "<", "</", "think>", "tool_call>", "</th", " ", "\n", "x y"]
    rng = random.Random(0)
    for _ in range(2000):
        text = "".join(rng.choice(atoms) for _ in range(rng.randint(0, 10)))
        in_reasoning, tools = rng.random() < 0.5, rng.random() < 0.7
        expected = parse_full(text, starts_in_reasoning=in_reasoning, parse_tools=tools, id_factory=counting_ids())
        assert stream(list(text), in_reasoning, tools) == expected, text

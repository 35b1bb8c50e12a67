"""Scripted checkpoints: greedy decoding through the real engine returns exactly the scripted turn."""
import json

import pytest
from safetensors import safe_open
from scripted_checkpoint import (
    ANSWER_TURN,
    NO_THINKING,
    THINKING,
    TOOL_CALL_TURN,
    make_scripted_checkpoint,
    split_pieces,
)

from exaserve.engine import LLM, SamplingParams
from exaserve.engine.chat_template import render_chat
from exaserve.engine.tokenizer import Tokenizer
from exaserve.server.parsers import parse_full

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Current weather",
          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
ASK = [{"role": "user", "content": "What is the weather in Seoul?"}]
GREEDY = SamplingParams(temperature=0, max_tokens=64)


def prompt_ids(path, messages, **kwargs) -> list[int]:
    tok = Tokenizer.from_pretrained(path)
    return tok.encode(render_chat(tok.chat_template, messages, **kwargs))


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return make_scripted_checkpoint(tmp_path_factory.mktemp("scripted"))


def test_tiny_moe_shape_with_hidden_at_least_vocab(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    assert config["hidden_size"] >= config["vocab_size"] >= Tokenizer.from_pretrained(ckpt).vocab_size
    assert config["mlp_layer_types"] == ["dense", "sparse", "sparse", "sparse"]
    assert set(config["layer_types"]) == {"sliding_attention", "full_attention"}


def test_greedy_output_is_the_script_with_and_without_thinking(ckpt):
    thinking = prompt_ids(ckpt, ASK, tools=TOOLS)
    no_thinking = prompt_ids(ckpt, ASK, tools=TOOLS, enable_thinking=False)
    outs = LLM(str(ckpt), dtype="float32").generate([thinking, no_thinking], GREEDY)
    assert [o.outputs[0].text for o in outs] == [TOOL_CALL_TURN, ANSWER_TURN]
    assert [o.outputs[0].finish_reason for o in outs] == ["stop", "stop"]
    assert len(outs[0].outputs[0].token_ids) == len(split_pieces(TOOL_CALL_TURN)) + 1  # one token a piece + EOS

    parsed = parse_full(outs[0].outputs[0].text, starts_in_reasoning=True, parse_tools=True)
    assert parsed.reasoning == "I should look up the weather."
    assert [(c.name, json.loads(c.arguments)) for c in parsed.tool_calls] == [("get_weather", {"city": "Seoul"})]


def test_explicit_pieces_mtp_and_a_longer_conversation(tmp_path):
    pieces = ["Tool said", " sunny.\n", "</think>", "\n\nIt is", " sunny."]
    path = make_scripted_checkpoint(tmp_path, {THINKING: pieces, NO_THINKING: "Sunny."}, hidden_size=1088,
                                    with_mtp=True)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        assert "mtp.fc.weight" in f.keys()
    history = ASK + [
        {"role": "assistant", "reasoning_content": "I should look up the weather.", "content": "",
         "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Seoul"}}}]},
        {"role": "tool", "content": "sunny"},
    ]
    out = LLM(str(path), dtype="float32").generate(prompt_ids(path, history, tools=TOOLS), GREEDY)[0].outputs[0]
    assert (out.text, out.finish_reason, len(out.token_ids)) == ("".join(pieces), "stop", len(pieces) + 1)


def test_split_pieces_keeps_tags_alone_and_joins_whitespace():
    assert split_pieces("a\n</think>\n\n<tool_call>{}</tool_call>\n") == [
        "a\n", "</think>", "\n\n<tool_call>", "{}", "</tool_call>\n"]


@pytest.mark.parametrize("scripts, error", [
    ({THINKING: "x<tool_call>a</tool_call>", NO_THINKING: "<tool_call>b</tool_call>"}, "'<tool_call>' occurs twice"),
    ({THINKING: ["same", "same"]}, "'same' occurs twice"),
    ({THINKING: "Sunny.", NO_THINKING: "Sunny."}, "'Sunny.' occurs twice"),
    ({THINKING: ["hi", "\n"]}, "occurs twice"),  # "\n" is the THINKING key's token
    ({THINKING: "café"}, "decodes to"),  # byte-level decoding reads an added token with no space as bytes
])
def test_clashing_or_undecodable_pieces_are_refused(tmp_path, scripts, error):
    with pytest.raises(ValueError, match=error):
        make_scripted_checkpoint(tmp_path, scripts)

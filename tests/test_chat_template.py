import datetime
import re

import pytest

from exaserve.engine.chat_template import ChatTemplateError, prompt_ends_in_reasoning, render_chat

# A small template in the K-EXAONE shape, exercising what real templates use.
TEMPLATE = """{{ bos_token }}{% if tools %}
<|tool_declare|>
# Tools
{% for tool in tools %}
<tool>{{ tool | tojson }}</tool>
{% endfor %}
<|endofturn|>
{% endif %}
{% for message in messages %}
{% if message.role not in ['system', 'user', 'assistant', 'tool'] %}
{{ raise_exception('Unsupported role: ' + message.role) }}
{% endif %}
<|{{ message.role }}|>
{{ message.content }}<|endofturn|>
{% endfor %}
{% if add_generation_prompt %}
<|assistant|>
{% if enable_thinking is defined and not enable_thinking %}
<think>

</think>

{% else %}
<think>
{% endif %}
{% endif %}"""


def test_renders_messages_tools_and_generation_prompt():
    tools = [{"type": "function", "function": {"name": "날씨", "parameters": {"b": 1, "a": 2}}}]
    prompt = render_chat(TEMPLATE, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}],
                         tools=tools, bos_token="<s>")
    assert prompt == (
        '<s><|tool_declare|>\n# Tools\n<tool>{"type": "function", "function": {"name": "날씨", '
        '"parameters": {"b": 1, "a": 2}}}</tool>\n<|endofturn|>\n'
        "<|system|>\nBe brief.<|endofturn|>\n<|user|>\nHi<|endofturn|>\n<|assistant|>\n<think>\n"
    )
    assert prompt_ends_in_reasoning(prompt)


def test_developer_messages_are_system_messages():
    as_system = render_chat(TEMPLATE, [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}])
    assert render_chat(TEMPLATE, [{"role": "developer", "content": "Be brief."},
                                  {"role": "user", "content": "Hi"}]) == as_system


def test_chat_template_kwargs_reach_the_template():
    messages = [{"role": "user", "content": "Hi"}]
    prompt = render_chat(TEMPLATE, messages, enable_thinking=False)
    assert prompt.endswith("<|assistant|>\n<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning(prompt)
    assert render_chat(TEMPLATE, messages, add_generation_prompt=False) == "<|user|>\nHi<|endofturn|>\n"


def test_tojson_arguments_and_strftime_now():
    template = ("{{ x | tojson(indent=2) }}|{{ x | tojson(separators=(',', ':'), sort_keys=true) }}|"
                "{{ strftime_now('%Y') }}")
    years = {str(datetime.date.today().year)}
    out = render_chat(template, [], x={"b": "é", "a": [1]})
    years.add(str(datetime.date.today().year))  # in case it ran across New Year's midnight
    head, year = out.rsplit("|", 1)
    assert head == '{\n  "b": "é",\n  "a": [\n    1\n  ]\n}|{"a":[1],"b":"é"}' and year in years


@pytest.mark.parametrize("template,messages,message", [
    (TEMPLATE, [{"role": "robot", "content": "x"}], "Unsupported role: robot"),
    ("{{ messages[0].content + 1 }}", [{"role": "user", "content": "x"}], "can only concatenate str"),
    ("{% for m in messages %}{{ m }", [], "unexpected '}'"),
    ("{% if %}", [], "Expected an expression"),
])
def test_template_errors_become_chat_template_errors(template, messages, message):
    with pytest.raises(ChatTemplateError, match="^" + re.escape(message)):
        render_chat(template, messages)


def test_template_is_sandboxed():
    with pytest.raises(ChatTemplateError):
        render_chat("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def test_prompt_ends_in_reasoning():
    assert prompt_ends_in_reasoning("<|assistant|>\n<think>\n")
    assert not prompt_ends_in_reasoning("<|assistant|>\n<think>\n\n</think>\n\n")
    assert not prompt_ends_in_reasoning("<|user|>\nno tags")
    assert prompt_ends_in_reasoning("<think>a</think> then <think>b")
    assert prompt_ends_in_reasoning("<|assistant|>\n<seed:think>", start="<seed:think>", end="</seed:think>")

"""Our Jinja2-subset chat-template evaluator against jinja2 configured as transformers does it.

The oracle is jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
extensions=[loopcontrols]) with HF's tojson filter (ensure_ascii=False) and raise_exception.
"""
import json
import pathlib
import random
import time

import pytest

jinja2 = pytest.importorskip("jinja2")
from jinja2.sandbox import ImmutableSandboxedEnvironment  # noqa: E402

from inference_pio.tokenizer.chat_template import ChatTemplate, TemplateError  # noqa: E402

# The hybrid-thinking Qwen3 (0.6B..32B) template: tools, <think> handling, enable_thinking.
QWEN3 = (pathlib.Path(__file__).parent.parent / "data" / "qwen3_chat_template.jinja").read_text()

SMOLLM2 = ("{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
           "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
           "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
           "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
           "{{ '<|im_start|>assistant\n' }}{% endif %}")

# ChatML written over several lines without '-': exercises trim_blocks / lstrip_blocks.
CHATML_PLAIN = """{{ bos_token }}
{% for message in messages %}
    {# a comment line #}
    {% if message.role == 'system' %}
  <<SYS>> {{ message.content | trim }} <</SYS>>
    {% else %}
{{ '<|im_start|>' ~ message.role }}
{{ message['content'] }}<|im_end|>
    {% endif %}
    {% if loop.last and message.role == 'user' %}   [last user #{{ loop.index }}/{{ loop.length }}]
    {% endif %}
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}
{{- eos_token if not add_generation_prompt else '' -}}
"""

# Llama-3 style with a default system message and tools rendered with tojson(indent=4).
LLAMA3ISH = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "Default system prompt. ünïcode ✓" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{%- if tools is not none %}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if not (message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' -}}
        {{- '{"name": "' + tool_call.name + '", ' }}
        {{- '"parameters": ' }}
        {{- tool_call.arguments | tojson }}
        {{- "}" }}
        {{- "<|eot_id|>" }}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping or message.content is iterable and message.content is not string %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""


def _oracle_env():
    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    return env


ENV = _oracle_env()


def oracle(source, **kw):
    return ENV.from_string(source).render(**kw)


TOOLS = [
    {"type": "function", "function": {
        "name": "get_weather", "description": "Météo actuelle — current weather",
        "parameters": {"type": "object", "properties": {
            "city": {"type": "string", "description": "City name, e.g. \"Zürich\""},
            "unit": {"type": "string", "enum": ["c", "f"]}}, "required": ["city"]}}},
    {"type": "function", "function": {"name": "now", "description": "Time",
                                      "parameters": {"type": "object", "properties": {}}}},
]

CALL_DICT = {"type": "function", "function": {"name": "get_weather",
                                              "arguments": {"city": "Zürich", "unit": "c"}}}
CALL_STR = {"type": "function", "function": {"name": "now", "arguments": "{\"tz\": \"UTC\"}"}}
CALL_FLAT = {"name": "get_weather", "arguments": {"city": "Paris"}}

CONVERSATIONS = {
    "single_user": [{"role": "user", "content": "Hello!"}],
    "system_user": [{"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Hi  "}],
    "multi_turn": [{"role": "user", "content": "1+1?"},
                   {"role": "assistant", "content": "2"},
                   {"role": "user", "content": "and 2+2?"}],
    "multi_turn_assistant_last": [{"role": "system", "content": "sys"},
                                  {"role": "user", "content": "a"},
                                  {"role": "assistant", "content": "b"},
                                  {"role": "user", "content": "c"},
                                  {"role": "assistant", "content": "d"}],
    "reasoning_content": [{"role": "user", "content": "q1"},
                          {"role": "assistant", "content": "a1", "reasoning_content": "r1"},
                          {"role": "user", "content": "q2"},
                          {"role": "assistant", "content": "a2", "reasoning_content": "\nr2\n"}],
    "think_in_content": [{"role": "user", "content": "q1"},
                         {"role": "assistant", "content": "<think>\nold thoughts\n</think>\n\nold answer"},
                         {"role": "user", "content": "q2"},
                         {"role": "assistant", "content": "<think>\nnew thoughts\n</think>\n\nnew answer"}],
    "tool_call_dict": [{"role": "system", "content": "Use tools."},
                       {"role": "user", "content": "Weather in Zürich?"},
                       {"role": "assistant", "content": "", "tool_calls": [CALL_DICT]},
                       {"role": "tool", "content": "{\"temp\": 21}"}],
    "tool_call_str_and_consecutive_tools": [
        {"role": "user", "content": "Weather and time?"},
        {"role": "assistant", "content": "Let me check.", "tool_calls": [CALL_DICT, CALL_STR]},
        {"role": "tool", "content": "21C"},
        {"role": "tool", "content": "12:00"},
        {"role": "assistant", "content": "It is 21C at 12:00.", "reasoning_content": "combine"},
        {"role": "user", "content": "thanks"}],
    "tool_call_flat_after_query": [
        {"role": "user", "content": "Paris?"},
        {"role": "assistant", "content": "<think>need tool</think>", "tool_calls": [CALL_FLAT]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "<think>\nok\n</think>\n\nSunny."}],
    "user_tool_response_text": [
        {"role": "user", "content": "<tool_response>\nx\n</tool_response>"},
        {"role": "user", "content": "real query"},
        {"role": "assistant", "content": "<think>t</think>answer"}],
    "none_content": [{"role": "user", "content": "go"},
                     {"role": "assistant", "content": None, "tool_calls": [CALL_STR]},
                     {"role": "tool", "content": "done"}],
}

THINKING = [{}, {"enable_thinking": True}, {"enable_thinking": False}]


@pytest.mark.parametrize("conv", sorted(CONVERSATIONS))
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("thinking", range(len(THINKING)))
@pytest.mark.parametrize("with_tools", [False, True])
def test_qwen3_matches_jinja2(conv, gen, thinking, with_tools):
    kw = dict(messages=CONVERSATIONS[conv], add_generation_prompt=gen,
              tools=TOOLS if with_tools else None, **THINKING[thinking])
    ours = ChatTemplate(QWEN3).render(**kw)
    assert ours == oracle(QWEN3, **kw)


SIMPLE_CONVS = [k for k in sorted(CONVERSATIONS)
                if all(m.get("content") is not None and "tool_calls" not in m and m["role"] != "tool"
                       for m in CONVERSATIONS[k])]


@pytest.mark.parametrize("conv", SIMPLE_CONVS)
@pytest.mark.parametrize("gen", [True, False])
@pytest.mark.parametrize("source", ["SMOLLM2", "CHATML_PLAIN", "LLAMA3ISH"])
def test_chatml_style_matches_jinja2(conv, gen, source):
    src = globals()[source]
    kw = dict(messages=CONVERSATIONS[conv], add_generation_prompt=gen, tools=None,
              bos_token="<s>", eos_token="</s>")
    assert ChatTemplate(src).render(**kw) == oracle(src, **kw)


def test_llama3ish_tools_and_tool_calls():
    msgs = [{"role": "system", "content": "  sys  "},
            {"role": "user", "content": "w?"},
            {"role": "assistant", "tool_calls": [CALL_DICT]},
            {"role": "tool", "content": {"temp": 21}},
            {"role": "tool", "content": "plain"}]
    kw = dict(messages=msgs, add_generation_prompt=True, tools=TOOLS, bos_token="<s>")
    assert ChatTemplate(LLAMA3ISH).render(**kw) == oracle(LLAMA3ISH, **kw)
    msgs[2] = {"role": "assistant", "tool_calls": [CALL_DICT, CALL_DICT]}
    with pytest.raises(TemplateError, match="single tool-calls"):
        ChatTemplate(LLAMA3ISH).render(**kw)


# ------------------------------------------------------------- whitespace control, fuzzed

_TEXTS = ["", " ", "  ", "\n", "\n\n", " \n  ", "\t", "x", "a b", "\n  y\n", "  \n\t"]
_OPENERS = [("{% if c %}", "{% endif %}"), ("{%- if c %}", "{% endif -%}"),
            ("{%+ if c -%}", "{%- endif %}"), ("{% for i in xs %}", "{% endfor %}"),
            ("{%- for i in xs -%}", "{%+ endfor %}")]
_LEAVES = ["{{ v }}", "{{- v }}", "{{ v -}}", "{{- v -}}", "{# c #}", "{#- c -#}", "{#+ c #}",
           "{% set z = 1 %}", "{%- set z = 2 -%}", "{{ i }}"]


def _random_template(rng, depth=0):
    parts = []
    for _ in range(rng.randint(1, 5)):
        parts.append(rng.choice(_TEXTS))
        r = rng.random()
        if r < 0.3 and depth < 3:
            o, c = rng.choice(_OPENERS)
            parts += [o, _random_template(rng, depth + 1), rng.choice(_TEXTS), c]
        else:
            parts.append(rng.choice(_LEAVES))
    parts.append(rng.choice(_TEXTS))
    return "".join(parts)


def test_whitespace_control_fuzz():
    seed = time.time_ns() % 100000
    print("seed", seed)
    rng = random.Random(seed)
    for _ in range(800):
        src = _random_template(rng)
        for c in (True, False):
            kw = dict(c=c, v="V", xs=[1, 2])
            assert ChatTemplate(src).render(**kw) == oracle(src, **kw), (seed, src, c)


# ------------------------------------------------------------------ expression subset

EXPRS = [
    "{{ 1 + 2 * 3 - 4 / 2 }}", "{{ 7 // 2 }}|{{ 7 % 3 }}|{{ 2 ** 10 }}|{{ -3 + +1 }}",
    "{{ 'a' ~ 1 ~ none ~ undefined_var }}", "{{ 'ab' + \"cd\" 'ef' }}",
    "{{ [1, 2, 3][::-1] }}{{ 'hello'[1:3] }}{{ 'hello'[-1] }}{{ xs[1:] }}{{ xs[:-1] }}",
    "{{ {'a': 1, 'b': [2, 3]}['b'][0] }}{{ d.a }}{{ d['a'] }}{{ d.missing }}{{ xs[10] }}",
    "{{ 1 < 2 < 3 }}{{ 3 > 2 >= 2 }}{{ 1 == 1.0 }}{{ 'a' != 'b' }}",
    "{{ 'b' in 'abc' }}{{ 4 not in xs }}{{ 'a' in d }}{{ not 1 }}{{ not (1 and 0) }}",
    "{{ 0 or 'x' }}{{ 1 and 'y' }}{{ none or [] }}",
    "{{ 'yes' if xs else 'no' }}{{ 'a' if 0 }}{{ 1 if 0 else 2 if 0 else 3 }}",
    "{{ undefined_var is defined }}{{ d is mapping }}{{ xs is sequence }}{{ 's' is string }}"
    "{{ 1 is number }}{{ none is none }}{{ xs is iterable }}{{ d.a is not none }}"
    "{{ undefined_var is undefined }}{{ 3 is odd }}{{ 4 is divisibleby(2) }}{{ true is true }}",
    "{{ xs | length }}{{ '  pad ' | trim }}{{ 'AbC' | lower }}{{ 'AbC' | upper }}"
    "{{ undefined_var | default('dflt') }}{{ '' | default('e', true) }}{{ xs | join(', ') }}"
    "{{ xs | first }}{{ xs | last }}{{ 'ab' | list }}{{ d | items | list }}{{ 12 | string }}",
    "{{ 'a-b-c' | replace('-', '+') }}{{ 'x,y'.split(',') }}{{ ' s '.strip() }}"
    "{{ 'abc'.startswith('a') }}{{ 'abc'.endswith('bc') }}{{ '\\nq'.lstrip('\\n') }}"
    "{{ 'q  '.rstrip() }}{{ d.get('a') }}{{ d.get('zz', 9) }}",
    "{{ {'k': 'ü', 'n': [1, none, true]} | tojson }}{{ d | tojson(indent=2) }}",
    "{% for k, v in d.items() %}{{ loop.index0 }}{{ k }}={{ v }};{% endfor %}",
    "{% for x in xs %}{{ loop.index }}/{{ loop.length }}{{ loop.first }}{{ loop.last }}"
    "{{ loop.revindex }} {% endfor %}",
    "{% for x in xs if x > 1 %}{{ x }}{% else %}none{% endfor %}{% for x in [] %}{% else %}E{% endfor %}",
    "{% for x in xs %}{% if x == 2 %}{% continue %}{% endif %}{% if x == 3 %}{% break %}{% endif %}"
    "{{ x }}{% endfor %}",
    "{% set a = 1 %}{% for x in xs %}{% set a = x %}{{ a }}{% endfor %}{{ a }}",
    "{% set ns = namespace(a=1, b='s') %}{% for x in xs %}{% set ns.a = ns.a + x %}{% endfor %}"
    "{{ ns.a }}{{ ns.b }}",
    "{% set a, b = [1, 2] %}{{ a }}{{ b }}{% set t = 1, 2 %}{{ t }}",
    "{% if 0 %}a{% elif none %}b{% elif 'x' %}c{% else %}d{% endif %}",
    "{{ range(3) | list }}{{ [1, 2] + [3] }}{{ (1, 2) }}{{ 'ab' * 2 }}{{ 1.5 }}{{ true }}{{ none }}",
    "{{ xs }}{{ d }}{{ [] }}{{ undefined_var }}{{ undefined_var | length }}",
]


@pytest.mark.parametrize("src", EXPRS)
def test_expression_subset_matches_jinja2(src):
    kw = dict(xs=[1, 2, 3], d={"a": 1, "b": "two"})
    assert ChatTemplate(src).render(**kw) == oracle(src, **kw)


def test_render_api_defaults():
    t = ChatTemplate("{{ messages | length }}|{{ add_generation_prompt }}|{{ tools }}|{{ x }}")
    assert t.render(messages=[{}], add_generation_prompt=True, x=5) == "1|True|None|5"
    assert t.render() == "0|False|None|"


# ------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("src, fragment", [
    ("{% macro m() %}x{% endmacro %}", "unsupported tag 'macro' (line 1, column 1)"),
    ("ab\n  {% include 'x' %}", "unsupported tag 'include' (line 2, column 3)"),
    ("{% raw %}x{% endraw %}", "unsupported tag 'raw'"),
    ("{% call foo() %}{% endcall %}", "unsupported tag 'call'"),
    ("{% filter upper %}x{% endfilter %}", "unsupported tag 'filter'"),
    ("{% set x %}block{% endset %}", "block form"),
    ("{% frobnicate %}", "unknown or misplaced tag 'frobnicate'"),
    ("{% if x %}a", "unclosed block"),
    ("{% for x in y %}a{% endif %}", "unknown or misplaced tag 'endif'"),
    ("{% endfor %}", "misplaced tag 'endfor'"),
    ("{{ x ", "unclosed tag"),
    ("{# never closed", "unclosed comment"),
    ("{{ 1 + }}", "unexpected end of tag"),
    ("{{ (1 }}", "expected ')'"),
    ("{{ a b }}", "unexpected 'b' (line 1, column 6)"),
    ("{{ x | nosuchfilter }}", "unsupported filter 'nosuchfilter'"),
    ("{{ x is nosuchtest }}", "unsupported test 'nosuchtest'"),
    ("{{ x $ 1 }}", "unexpected character '$'"),
    ("{{ }}", "empty expression"),
    ("{% %}", "expected a statement name"),
    ("{% for x in xs recursive %}{% endfor %}", "recursive"),
])
def test_parse_errors(src, fragment):
    with pytest.raises(TemplateError) as ei:
        ChatTemplate(src)
    assert fragment in str(ei.value)


@pytest.mark.parametrize("src, fragment", [
    ("{{ raise_exception('Conversation roles must alternate') }}", "roles must alternate"),
    ("{{ nope.attr }}", "'nope' is undefined"),
    ("{{ nope['k'] }}", "'nope' is undefined"),
    ("{{ nope + 1 }}", "is undefined"),
    ("{{ d.missing.deeper }}", "'missing' is undefined"),
    ("{{ d.__class__ }}", "not allowed"),
    ("{{ xs.append(4) }}", "unsupported sequence method 'append'"),
    ("{{ d.pop('a') }}", "unsupported mapping method 'pop'"),
    ("{{ 's'.format(1) }}", "unsupported string method 'format'"),
    ("{{ 1 / 0 }}", "division by zero"),
    ("{{ d() }}", "not callable"),
    ("{% set d.a = 1 %}", "non-namespace"),
    ("{% set a, b = [1] %}", "cannot unpack"),
    ("{% break %}", "outside of a for-loop"),
    ("{{ nope | tojson }}", "tojson"),
])
def test_render_errors(src, fragment):
    with pytest.raises(TemplateError) as ei:
        ChatTemplate(src).render(xs=[1, 2], d={"a": 1})
    assert fragment in str(ei.value)


def test_undefined_behaviour_matches_jinja2():
    src = "[{{ u }}]{% if u %}T{% else %}F{% endif %}{% for x in u %}x{% endfor %}{{ u | length }}" \
          "{{ u == u }}{{ u is none }}{{ 'a' in u }}"
    assert ChatTemplate(src).render() == oracle(src)

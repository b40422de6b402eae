"""Garrison's chat-template renderer against transformers' apply_chat_template, template by template.

transformers is imported here, in the test, and never by the daemon: the renderer rebuilds its
Jinja environment on jinja2 alone, and these tests hold the two equal.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from chat_conversation import CONVERSATION, TOOLS, llama_cpp_templates

from garrison.engine.chat_template import render
from garrison.errors import InvalidRequest

TEMPLATES = llama_cpp_templates()


def _reference(tokenizer: Any, template: str, **kwargs: Any) -> str | Exception:
    try:
        return str(tokenizer.apply_chat_template(CONVERSATION, tools=TOOLS, chat_template=template, tokenize=False,
                                                 add_generation_prompt=True, **kwargs))
    except Exception as exc:  # what transformers cannot render, ours must refuse too
        return exc


@pytest.fixture(scope="module")
def qwen3_tokenizer(real_tokenizer_dir: Callable[[str], Path]) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(real_tokenizer_dir("qwen3"))


def test_the_sdist_ships_seventy_templates() -> None:
    if not TEMPLATES:
        pytest.skip("no llama-cpp-python source distribution in the wheelhouse (install.sh keeps one)")
    assert len(TEMPLATES) == 70


@pytest.mark.parametrize("name", list(TEMPLATES) or ["(none)"])
def test_each_template_renders_as_transformers_does(name: str, qwen3_tokenizer: Any) -> None:
    if name not in TEMPLATES:
        pytest.skip("no llama-cpp-python source distribution in the wheelhouse")
    expected = _reference(qwen3_tokenizer, TEMPLATES[name])
    if isinstance(expected, Exception):
        with pytest.raises(InvalidRequest):
            render(TEMPLATES[name], CONVERSATION, tools=TOOLS, special_tokens=qwen3_tokenizer.special_tokens_map)
        pytest.skip(f"transformers cannot render {name} either: {type(expected).__name__}: {expected}")
    got = render(TEMPLATES[name], CONVERSATION, tools=TOOLS, special_tokens=qwen3_tokenizer.special_tokens_map)
    assert got == expected


def test_what_transformers_environment_has() -> None:
    template = ("{% for m in messages %}{% if loop.index > 1 %}{% break %}{% endif %}"
                "{% generation %}{{ m.content | tojson }}{% endgeneration %}{% endfor %}"
                "|{{ strftime_now('%Y') }}|{{ flag }}|{{ bos_token is defined }}")
    from datetime import datetime

    out = render(template, [{"role": "user", "content": "Zürich <&>'"}, {"role": "user", "content": "x"}],
                 special_tokens={"bos_token": None, "eos_token": "</s>"}, kwargs={"flag": False})
    assert out == f"\"Zürich <&>'\"|{datetime.now().year}|False|False"


def test_refusals_name_their_cause() -> None:
    with pytest.raises(InvalidRequest) as refused:
        render("{{ raise_exception('no system role') }}", [{"role": "system", "content": "x"}])
    assert refused.value.code == "chat_template_refused" and "no system role" in str(refused.value)
    with pytest.raises(InvalidRequest) as broken:
        render("{% for %}", [{"role": "user", "content": "x"}])
    assert broken.value.code == "chat_template_error"
    with pytest.raises(InvalidRequest) as sandboxed:
        render("{{ messages.__class__.__mro__ }}", [{"role": "user", "content": "x"}])
    assert sandboxed.value.code == "chat_template_error"
    with pytest.raises(InvalidRequest) as reserved:
        render("{{ x }}", [], kwargs={"messages": []})
    assert reserved.value.param == "chat_template_kwargs"
    with pytest.raises(InvalidRequest) as none:
        render(None, [{"role": "user", "content": "x"}])
    assert none.value.code == "no_chat_template"

"""The request-field table: what the operator guide says is ignored is what the table ignores."""

from __future__ import annotations

from pathlib import Path

import pytest

from garrison.errors import InvalidRequest
from garrison.serving.openai_fields import ROUTE_FIELDS, check_fields, ignored_fields
from garrison.serving.openai_format import choice_count, completion_prompts, sampling_params

GUIDE = Path(__file__).resolve().parents[2] / "docs" / "operator-guide.md"


def test_the_operator_guide_names_every_field_accepted_without_effect() -> None:
    text = GUIDE.read_text()
    missing = {f.name for fields in ignored_fields().values() for f in fields if f"`{f.name}`" not in text}
    assert not missing, f"list these in docs/operator-guide.md (Request parameters): {sorted(missing)}"


def test_fields_openai_defines_for_each_route_are_accepted() -> None:
    # As the official client sends them (openai-python's create() parameters), a few per route.
    for route, names in {"chat": ["messages", "store", "metadata", "service_tier", "prediction", "n",
                                  "logit_bias", "max_completion_tokens", "stream_options", "user"],
                         "completion": ["prompt", "echo", "best_of", "suffix", "logit_bias", "n", "user"],
                         "embedding": ["input", "dimensions", "encoding_format", "user"]}.items():
        assert set(names) <= set(ROUTE_FIELDS[route]), route


def test_unknown_and_unhonourable_fields_are_named() -> None:
    with pytest.raises(InvalidRequest) as err:
        check_fields({"model": "m", "prompt": "x", "zeta": 1, "alpha": 2}, "completion", allow_unknown=False)
    assert err.value.param == "alpha" and "'zeta'" in err.value.message
    with pytest.raises(InvalidRequest) as suffix:
        check_fields({"model": "m", "prompt": "x", "suffix": "tail"}, "completion", allow_unknown=False)
    assert suffix.value.code == "unsupported_parameter"


def test_request_shapes() -> None:
    assert completion_prompts({"prompt": "a"}) == ["a"]
    assert completion_prompts({"prompt": [1, 2]}) == [[1, 2]]
    assert completion_prompts({"prompt": ["a", "b"]}) == ["a", "b"]
    assert completion_prompts({"prompt": [[1], [2, 3]]}) == [[1], [2, 3]]
    for bad in ([], [[]], [1, "a"], [-1], [True], "", [["a"]]):
        with pytest.raises(InvalidRequest):
            completion_prompts({"prompt": bad})
    assert choice_count({}) == 1 and choice_count({"n": 3}) == 3
    with pytest.raises(InvalidRequest):
        choice_count({"n": 0})
    params = sampling_params({"logit_bias": {"5": -100, "7": 2.5}}, default_max_tokens=None)
    assert params.logit_bias == ((5, -100.0), (7, 2.5)) and params.max_tokens is None
    for bad_bias in ({"x": 1}, {"5": 100.5}, {"5": True}, [[5]]):
        with pytest.raises(InvalidRequest):
            sampling_params({"logit_bias": bad_bias}, default_max_tokens=None)

"""JSON schema to GBNF for `response_format`, in the daemon, without loading llama.cpp.

The converter is llama-cpp-python's pure-Python `llama_grammar.py`. Importing it as
`llama_cpp.llama_grammar` would run the package's __init__, which loads libllama and ggml
into the daemon; the daemon runs no native model code, so the module is loaded from its
file on its own (it imports only the standard library).
"""

from __future__ import annotations

import importlib.util
import json
from functools import cache
from types import ModuleType
from typing import Any

from garrison.errors import InvalidRequest


class InvalidGrammar(InvalidRequest):
    """llama.cpp could not parse the GBNF grammar (or the schema converted to one)."""

    code = "invalid_grammar"


class InvalidSchema(InvalidGrammar):
    """The JSON schema cannot become a grammar (an unknown type, a broken pattern, a malformed schema)."""

    code = "invalid_schema"


@cache
def _converter() -> ModuleType:
    from garrison.engine.cpu_kernels import llama_lib_dir

    path = llama_lib_dir().parent / "llama_grammar.py"
    spec = importlib.util.spec_from_file_location("garrison_llama_grammar", path)
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """GBNF for a JSON schema (response_format json_schema), via llama-cpp-python's converter.

    Unsupported schema constructs surface as InvalidGrammar rather than a 500, since they
    are the caller's input.
    """
    text = schema if isinstance(schema, str) else json.dumps(schema)
    try:
        return str(_converter().json_schema_to_gbnf(text))
    except Exception as err:  # the converter asserts on some inputs: any failure is the schema's
        # The message names the failure, never the schema: a client's schema does not go to the log.
        raise InvalidSchema(f"cannot convert the JSON schema to a grammar ({type(err).__name__}: {str(err)[:120]})",
                            param="response_format") from None

"""JSON schema to GBNF for `response_format`, in the daemon, without loading llama.cpp.

The converter is llama-cpp-python's pure-Python `llama_grammar.py`. Importing it as
`llama_cpp.llama_grammar` would run the package's __init__, which loads libllama and ggml
into the daemon; the daemon runs no native model code, so the module is loaded from its
file on its own (it imports only the standard library).
"""

from __future__ import annotations

import hashlib
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


class SchemaTooComplex(InvalidSchema):
    """Larger than MAX_SCHEMA_BYTES: the converter's cost grows faster than the schema (an enum of
    80,000 values took 33 s of CPU), so size is bounded before any work."""

    code = "schema_too_complex"


#: The largest JSON schema (as compact JSON) turned into a grammar; real response formats are far smaller.
MAX_SCHEMA_BYTES = 64 * 1024
_CACHE_SIZE = 256
_cache: dict[str, str] = {}


def _schema_text(schema: dict[str, Any] | str, param: str, sort_keys: bool = True) -> str:
    text = schema if isinstance(schema, str) else json.dumps(schema, sort_keys=sort_keys, separators=(",", ":"))
    if len(text.encode("utf-8", "surrogatepass")) > MAX_SCHEMA_BYTES:
        raise SchemaTooComplex(f"the JSON schema is larger than {MAX_SCHEMA_BYTES // 1024} KiB", param=param)
    return text


def _cached(key: str, build: Any, param: str) -> str:
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).hexdigest()
    cached = _cache.get(digest)
    if cached is not None:
        return cached
    try:
        grammar = str(build())
    except Exception as err:  # the converter asserts on some inputs: any failure is the schema's
        # The message names the failure, never the schema: a client's schema does not go to the log.
        raise InvalidSchema(f"cannot convert the JSON schema to a grammar ({type(err).__name__}: {str(err)[:120]})",
                            param=param) from None
    if len(_cache) >= _CACHE_SIZE:
        _cache.pop(next(iter(_cache)))  # the oldest entry: insertion order
    _cache[digest] = grammar
    return grammar


def schema_grammar(schema: dict[str, Any], rule: str, root: str, *, param: str) -> str:
    """GBNF whose `rule` is the schema's JSON and whose root is `root` (GBNF that uses `rule`): a JSON
    value inside a frame of text, such as a tool call inside its markers. Cached and bounded as
    json_schema_grammar is. Properties keep the schema's order (a model writes a tool's arguments in
    the order its schema lists them), `name` first."""
    text = _schema_text(schema, param, sort_keys=False)

    def build() -> str:
        converter = _converter().SchemaConverter(prop_order={"name": 0}, allow_fetch=False, dotall=False,
                                                 raw_pattern=False)
        converter.visit(converter.resolve_refs(json.loads(text), "request"), rule)
        return f"{converter.format_grammar()}\nroot ::= {root}"

    return _cached(f"{rule}\0{root}\0{text}", build, param)


def json_schema_grammar(schema: dict[str, Any] | str) -> str:
    """GBNF for a JSON schema (response_format json_schema), via llama-cpp-python's converter.

    Unsupported schema constructs surface as InvalidSchema rather than a 500, since they are the
    caller's input. Grammars are cached by the schema's digest, so a client that sends the same
    schema with every request pays for it once. CPU-bound: callers on an event loop run it in a thread.
    """
    text = _schema_text(schema, "response_format")
    return _cached(text, lambda: _converter().json_schema_to_gbnf(text), "response_format")

"""One tokenization rule for a rendered conversation, so the ids a model is trained on are the ids it is served.

Serving renders the chat template (garrison.engine.chat_template) and tokenizes the prompt
string as a whole: llama.cpp with `parse_special=True, add_special=False` (the template writes
the BOS itself), the ONNX engine with `tokenizers` likewise. Generation then starts at a fresh
token. Training used to tokenize the whole conversation at once, so a token could straddle the
generation-prompt boundary: a template ending in ``assistant: `` gave the trained sequence
``... ':' '▁Your' ...`` while the served prompt ends ``... ':' '▁'`` and the model, never having
seen a lone ``'▁'`` there, answered with a fragment. The rule, used by training and checked by
the export parity gate:

1. A prompt's ids are the Hugging Face tokenizer's ids of the whole rendered string, special
   tokens in it parsed and none added (`prompt_ids`); the parity gate refuses an artifact whose
   own tokenizer gives other ids for rendered sample conversations (`tokenizer_mismatch`).
2. In a training sequence no token crosses a cut (each generation-prompt boundary, and the end
   of each trained turn): the text up to the first cut is tokenized as a prompt, and each later
   piece continues the ids before it (`continue_ids`). A token that would straddle the cut is
   re-segmented: its part after the cut is tokenized by the tokenizer's model alone, in the
   token alphabet (``'▁Your'`` -> ``'▁'`` | ``'Your'``), so the served prompt's ids are the
   trained prompt's and the completion's ids decode to the same text.

Works on a fast (Rust) tokenizer, duck-typed: nothing here imports transformers.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class BoundaryError(ValueError):
    """The tokenizer's tokens cannot be re-segmented at a cut (no model access, or forms that disagree)."""


def prompt_ids(tokenizer: Any, text: str) -> list[int]:
    """A rendered prompt's ids: the whole string, special tokens in it parsed, none added (as served)."""
    return [int(i) for i in tokenizer(text, add_special_tokens=False)["input_ids"]]


def _forms(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each token in the tokenizer's own alphabet ('▁' for a SentencePiece space, 'Ġ' for a byte-level one),
    byte-fallback tokens as their byte: concatenated, they are the same whatever the segmentation."""
    out = []
    for piece in tokenizer.convert_ids_to_tokens(list(ids)):
        match = _BYTE_TOKEN.match(piece or "")
        out.append(bytes([int(match.group(1), 16)]) if match else (piece or "").encode("utf-8"))
    return out


def _model_ids(tokenizer: Any, form: bytes) -> list[int]:
    """Ids of text already in the token alphabet, from the tokenizer's model alone (no normalizer, no
    pre-tokenizer, hence no dummy prefix)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise BoundaryError("a slow tokenizer: no model to re-segment with")
    try:
        text = form.decode("utf-8")
    except UnicodeDecodeError:
        raise BoundaryError("the cut falls inside a character") from None
    ids = [int(t.id) for t in backend.model.tokenize(text)]
    if b"".join(_forms(tokenizer, ids)) != form:
        raise BoundaryError(f"the tokenizer's model does not reproduce {text!r}")
    return ids


def continue_ids(tokenizer: Any, ids: list[int], text: str) -> list[int]:
    """Ids for `text`, given `ids` for a prefix of it that ends at a cut: `ids` kept, no token crossing the cut."""
    full = prompt_ids(tokenizer, text)
    if full[:len(ids)] == ids:
        return full
    have = b"".join(_forms(tokenizer, ids))
    forms = _forms(tokenizer, full)
    if not b"".join(forms).startswith(have):
        raise BoundaryError("the tokens of the prefix are not a prefix of the tokens of the text")
    end, j = 0, 0
    while j < len(forms) and end < len(have):
        end += len(forms[j])
        j += 1
    gap = b"".join(forms)[len(have):end]
    return ids + (_model_ids(tokenizer, gap) if gap else []) + full[j:]


def cut_ids(tokenizer: Any, text: str, cuts: Sequence[int]) -> tuple[list[int], dict[int, int]]:
    """`text`'s ids with no token crossing a cut, and how many ids come before each cut (0 and len(text) too).

    Raises BoundaryError when the tokenizer cannot be re-segmented; the caller decides what then.
    """
    points = sorted({c for c in cuts if 0 < c < len(text)})
    marks = {0: 0}
    ids: list[int] = []
    for n, point in enumerate([*points, len(text)]):
        ids = prompt_ids(tokenizer, text[:point]) if n == 0 else continue_ids(tokenizer, ids, text[:point])
        marks[point] = len(ids)
    return ids, marks

"""Records as the vault's plaintext lines, and the plain chat shape decoded a block at a time.

A version's plaintext is one record per line, `json.dumps(ensure_ascii=False, separators=(",", ":"))`
exactly (`encode_record`). Nearly every record delivered for fine-tuning has the plain chat shape,

    {"messages": [{"role": "<one of CHAT_ROLES>", "content": "<string>"}, ...]}   (an assistant among them)

and for those the per-record Python work (a dict per message, a check, a walk, a dump) costs more
than parsing does. `decode_chat_block` decodes and validates a whole block of such lines in C, into
msgspec structs that `encode_chat_records` writes back as the same bytes `encode_record` would
write for the same value. A block with anything else in it (another shape, a blank or bad line, a
byte-order mark) is refused as a whole, and the caller parses it line by line, which is where line
numbers and reasons come from: this fast path never decides that a line is bad.

Kept light on imports: redaction worker processes import it.
"""

from __future__ import annotations

import json
from typing import Annotated, Any, Literal

import msgspec
import orjson

__all__ = ["ROLES", "ChatMessage", "ChatRecord", "decode_chat_block", "encode_chat_records", "encode_record"]

MAX_MESSAGES = 4096
#: The chat roles accepted (formats.CHAT_ROLES): the schema below checks them in C.
Role = Literal["system", "developer", "user", "assistant", "tool", "function"]
ROLES = frozenset(Role.__args__)  # type: ignore[attr-defined]

_ENCODER = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))


def encode_record(record: Any, *, has_float: bool | None = None) -> bytes:
    """A record as one line of the version's plaintext: compact JSON, UTF-8, newline.

    The bytes are json.dumps(ensure_ascii=False, separators=(",", ":")) exactly. orjson writes
    the same bytes ~15x faster except for floats (it writes 1e-05 as 0.00001) and integers
    beyond 64 bits (it refuses them); those records, or any it refuses, go through json.
    `has_float` is what the caller already knows (None: look).
    """
    if has_float is None:
        has_float = _has_float(record)
    if not has_float:
        try:
            return orjson.dumps(record, option=orjson.OPT_APPEND_NEWLINE)
        except orjson.JSONEncodeError:
            pass
    return _ENCODER.encode(record).encode() + b"\n"


def _has_float(v: Any) -> bool:
    if isinstance(v, dict):
        return any(_has_float(x) for x in v.values())
    if isinstance(v, list | tuple):
        return any(_has_float(x) for x in v)
    return isinstance(v, float)


# gc=False: these hold only strings and lists of structs, never a cycle, and a block makes
# thousands of them; keeping them out of the cyclic collector's lists is most of the saving.
class ChatMessage(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """One message; fields in this order, so that it encodes role first, as the general path writes."""

    role: Role
    content: str


class ChatRecord(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    messages: Annotated[list[ChatMessage], msgspec.Meta(min_length=1, max_length=MAX_MESSAGES)]


_decode = msgspec.json.Decoder(ChatRecord).decode
_encode_lines = msgspec.json.Encoder().encode_lines


def decode_chat_block(data: bytes) -> list[ChatRecord] | None:
    """Every line of `data` (whole lines, no final newline) as a plain chat record, or None if any
    line is not one: the caller then takes the general, line-by-line path for the whole block.

    Lines are decoded one by one, not with msgspec's `decode_lines`: that reads a stream of values,
    so a value split over two lines, or two values on one line, would pass for records.
    """
    try:
        records = [_decode(line) for line in data.split(b"\n")]
    except (msgspec.MsgspecError, ValueError):  # ValueError: invalid UTF-8 comes as UnicodeDecodeError
        return None
    for record in records:
        for message in record.messages:
            if message.role == "assistant":
                break
        else:
            return None  # no answer in it: the general path refuses the line, with its reason
    return records


def encode_chat_records(records: list[ChatRecord]) -> bytes:
    """The records as vault lines, each ending in a newline: the bytes `encode_record` writes."""
    return _encode_lines(records)

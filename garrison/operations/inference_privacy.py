"""Privacy on the inference path: the ingestion PII detectors applied to prompts and responses.

The policy file's `[inference_privacy]` table says, per entity type of the detector table
(garrison.ingest.pii_detectors.ENTITY_TYPES) and per direction, what happens to a value found:

    [inference_privacy.prompts]       # every message content / prompt / embedding input
    secret = "redact"                 # the model sees "[SECRET]" instead of the value
    payment_card = "deny"             # 400 prompt_contains_pii, details.entity_types = ["payment_card"]
    default = "allow"                 # every type not named

    [inference_privacy.responses]     # the generated text, streamed or not
    email = "redact"
    default = "allow"

Without the table (or without one of its two sub-tables) the built-in rules apply: prompts
redact secrets (an API key pasted into a chat must not reach a model, its KV cache or a log),
everything else is allowed. A sub-table that is present replaces its built-in rules whole, so
`[inference_privacy.prompts] default = "allow"` turns prompt screening off.

A redacted value becomes the tag ingestion writes (`[PAYMENT_CARD]`), from the same Redactor,
so a model fine-tuned on redacted data sees the same placeholders at inference. A denied value
in a response ends it: the text before the value is delivered (redacted) and the response's
finish_reason is "content_filter", as OpenAI's own filters report it.

Streaming (`ResponseFilter`): text is released only once no detectable value can still cross
it. Three rules bound what is held back:
- the last HOLD_CHARS characters (longer than any value of a bounded detector row: a card,
  a quoted password, an e-mail address);
- a trailing run of RUN_CHARS (the rows whose values have no length bound are tokens made of
  these characters: JWTs, bearer tokens, API keys, e-mail addresses), back to its start;
- an open PEM block, from its "-----BEGIN" to its "-----END ...-----" line.
A value found that straddles the release point holds back from its start. The stream's text
is then exactly what screening the whole response at once gives (the tests check every split).
"""

from __future__ import annotations

import asyncio
import functools
import re
import secrets
import string
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal, cast

from garrison.engine.types import Finish, TokenEvent
from garrison.errors import InvalidRequest
from garrison.ingest.pii import Redactor, Span
from garrison.ingest.pii_detectors import ENTITY_TYPES

__all__ = [
    "ACTIONS",
    "HOLD_CHARS",
    "MARKER_ROWS",
    "RUN_CHARS",
    "RUN_ROWS",
    "Action",
    "DirectionRules",
    "InferencePrivacyPolicy",
    "ResponseFilter",
]

Action = Literal["allow", "redact", "deny"]
ACTIONS: tuple[Action, ...] = ("allow", "redact", "deny")
_DIRECTIONS = ("prompts", "responses")

#: Characters held back at the end of a stream: more than the longest value of every detector row
#: whose value has a length bound (a quoted password: 200; an e-mail address: 254).
HOLD_CHARS = 256
#: Characters of the values that have no length bound; a trailing run of them is held back whole.
RUN_CHARS = frozenset(string.ascii_letters + string.digits + "._-~+/=@%:")
#: The detector rows whose values may be longer than HOLD_CHARS and are made of RUN_CHARS only
#: (the tests check the table against these two lists, so a new unbounded row cannot slip by).
RUN_ROWS = frozenset({"github_token", "slack_token", "slack_webhook", "openai_key", "stripe_key", "jwt",
                      "bearer_token", "email", "ipv6"})
#: Rows held back by an opening marker until their closing line.
MARKER_ROWS = frozenset({"pem_private_key"})
_MARKERS = re.compile(r"-----BEGIN|-----END (?:[A-Z0-9]+ )*[A-Z0-9]+-----")
#: Characters before the undecided text that a scan includes, for the detectors' look-behinds and keywords.
_CONTEXT_CHARS = HOLD_CHARS
#: Prompts above this many characters are scanned on a worker thread. Measured (2-core VM): clean
#: prose costs 0.07 ms per 100,000 characters (the native prefilter clears it), text dense with
#: PII about 0.25 ms per 1,000 (the validators run), so inline scans stay near a millisecond.
THREAD_ABOVE_CHARS = 4096


# ---------------------------------------------------------------------------------------- policy

def _bad(key: str, message: str) -> InvalidRequest:
    return InvalidRequest(message, code="invalid_policy", param=key)


@dataclass(frozen=True)
class DirectionRules:
    """Per entity type an action for one direction (prompts or responses); `default` for the rest."""

    actions: Mapping[str, Action] = field(default_factory=dict)
    default: Action = "allow"

    def action_for(self, entity: str) -> Action:
        return self.actions.get(entity, self.default)

    @property
    def active(self) -> bool:
        """Whether anything is redacted or denied (an all-allow direction costs nothing)."""
        return self.default != "allow" or any(a != "allow" for a in self.actions.values())

    @classmethod
    def from_dict(cls, data: Any, *, where: str) -> DirectionRules:
        if not isinstance(data, Mapping):
            raise _bad(where, f"[{where}] must be a table of entity type = action")
        actions: dict[str, Action] = {}
        default: Action = "allow"
        for key, value in data.items():
            dotted = f"{where}.{key}"
            if key != "default" and key not in ENTITY_TYPES:
                raise _bad(dotted, f"unknown entity type {dotted}; expected one of {', '.join(ENTITY_TYPES)} "
                                   "or default")
            if value not in ACTIONS:
                raise _bad(dotted, f"{dotted}: unknown action {value!r}; expected one of {', '.join(ACTIONS)}")
            if key == "default":
                default = cast(Action, value)
            else:
                actions[key] = cast(Action, value)
        return cls(actions=actions, default=default)


DEFAULT_PROMPTS = DirectionRules(actions={"secret": "redact"})
ALLOW_ALL = DirectionRules()


@dataclass(frozen=True)
class InferencePrivacyPolicy:
    """What the inference routes do with personal data in prompts and responses."""

    prompts: DirectionRules = DEFAULT_PROMPTS
    responses: DirectionRules = ALLOW_ALL

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None, *,
                  where: str = "inference_privacy") -> InferencePrivacyPolicy:
        if data is None:
            return cls()
        unknown = sorted(set(data) - set(_DIRECTIONS))
        if unknown:
            raise _bad(f"{where}.{unknown[0]}", f"unknown key {where}.{unknown[0]}; expected "
                                                f"{where}.prompts and/or {where}.responses")
        prompts = data.get("prompts")
        responses = data.get("responses")
        return cls(
            prompts=DEFAULT_PROMPTS if prompts is None else DirectionRules.from_dict(prompts, where=f"{where}.prompts"),
            responses=ALLOW_ALL if responses is None else DirectionRules.from_dict(responses,
                                                                                  where=f"{where}.responses"))

    # ------------------------------------------------------------------------------- prompts

    async def screen_prompts(self, texts: Sequence[str], fields: Sequence[str]) -> list[str]:
        """The texts as the model may see them; raises 400 prompt_contains_pii if a denied type occurs.

        `fields` names each text's field for the error's `param` ("messages[2].content"). Neither
        the error nor the log carries anything of the prompt: only entity type names.
        """
        if not self.prompts.active:
            return list(texts)
        if sum(map(len, texts)) > THREAD_ABOVE_CHARS or not _finder_built():
            return await asyncio.to_thread(self._screen_prompts, texts, fields)
        return self._screen_prompts(texts, fields)

    def _screen_prompts(self, texts: Sequence[str], fields: Sequence[str]) -> list[str]:
        finder = _finder()
        found = finder.find_many(texts)
        rules = self.prompts
        denied = {s.type for spans in found for s in spans if rules.action_for(s.type) == "deny"}
        if denied:
            first = next(i for i, spans in enumerate(found) if any(s.type in denied for s in spans))
            types = [t for t in ENTITY_TYPES if t in denied]
            raise InvalidRequest(f"the prompt contains personal data that the privacy policy refuses: "
                                 f"{', '.join(types)}", code="prompt_contains_pii", param=fields[first],
                                 details={"entity_types": types})
        return [_redacted(finder, text, [s for s in spans if rules.action_for(s.type) == "redact"])
                for text, spans in zip(texts, found, strict=True)]

    async def screen_messages(self, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Chat messages with each text content screened (roles untouched; an assistant turn of tool
        calls alone keeps its null content)."""
        texts = [i for i, m in enumerate(messages) if isinstance(m.get("content"), str)]
        contents = await self.screen_prompts([messages[i]["content"] for i in texts],
                                             [f"messages[{i}].content" for i in texts])
        screened = dict(zip(texts, contents, strict=True))
        return [{**m, "content": screened[i]} if i in screened else m for i, m in enumerate(messages)]

    # ------------------------------------------------------------------------------- responses

    async def response_filter(self) -> ResponseFilter | None:
        """A filter for one response (streamed or not: both go through it), or None when responses
        are not screened."""
        if not self.responses.active:
            return None
        if not _finder_built():
            await asyncio.to_thread(_finder)  # the first build compiles the prefilter: not on the event loop
        return ResponseFilter(self.responses)


@functools.lru_cache(maxsize=1)
def _finder() -> Redactor:
    """The built-in detector table with ingestion's tag replacement. Built on first use (compiling the
    prefilter takes a fraction of a second); the HMAC key is never used, since inference only tags."""
    return Redactor(None, secrets.token_bytes(32))


def _finder_built() -> bool:
    return _finder.cache_info().currsize > 0


def _redacted(finder: Redactor, text: str, spans: list[Span]) -> str:
    if not spans:
        return text
    out: list[str] = []
    pos = 0
    for s in spans:
        out.append(text[pos:s.start])
        out.append(finder.replacement(s.type, text[s.start:s.end]))
        pos = s.end
    out.append(text[pos:])
    return "".join(out)


# ---------------------------------------------------------------------------------------- streaming

class ResponseFilter:
    """One response's text, released as it becomes safe: `feed` each piece, then `finish`.

    After a denied value is reached, `denied` names its types and nothing more is released:
    the caller ends the response with finish_reason "content_filter".
    """

    def __init__(self, rules: DirectionRules) -> None:
        self.rules = rules
        self.denied: tuple[str, ...] = ()
        self._buf = ""
        self._done = 0          # text before this index is decided (released or withheld)
        self._run_start = 0     # where the trailing run of RUN_CHARS begins
        self._open: int | None = None  # an unclosed PEM block's "-----BEGIN"
        self._markers_to = 0    # markers are looked for from here on

    def feed(self, text: str) -> str:
        """The text that may be shown now (often empty: it is being held back)."""
        if self.denied or not text:
            return ""
        start = len(self._buf)
        self._buf += text
        self._track(start)
        safe = min(len(self._buf) - HOLD_CHARS, self._run_start,
                   len(self._buf) if self._open is None else self._open)
        return self._release(safe, final=False)

    def finish(self) -> str:
        """Everything still held, screened: the end of the response."""
        return "" if self.denied else self._release(len(self._buf), final=True)

    def screen(self, text: str) -> str:
        """A whole response at once (what a stream of it releases in total)."""
        if text:
            self._buf += text
        return self.finish()

    def _track(self, start: int) -> None:
        buf = self._buf
        i = len(buf)
        while i > start and buf[i - 1] in RUN_CHARS:
            i -= 1
        if i > start:  # the new text has a character that ends any run
            self._run_start = i
        scan_from = max(self._markers_to, start - HOLD_CHARS)
        for m in _MARKERS.finditer(buf, scan_from):
            if m.group().startswith("-----BEGIN"):
                if self._open is None:
                    self._open = m.start()
            else:
                self._open = None
            self._markers_to = m.end()

    def _release(self, safe: int, *, final: bool) -> str:
        done = self._done
        if safe <= done:
            return ""
        ctx = max(0, done - _CONTEXT_CHARS)
        finder = _finder()
        rules = self.rules
        spans = [Span(s.start + ctx, s.end + ctx, s.type, s.detector) for s in finder.find(self._buf[ctx:])
                 if rules.action_for(s.type) != "allow" and s.end + ctx > done]
        if not final:
            for s in spans:
                if s.start < safe < s.end:  # not settled: the value may still grow
                    safe = s.start
                    break
            if safe <= done:
                return ""
        out: list[str] = []
        pos = done
        for s in spans:
            if s.start >= safe:
                break
            start = max(s.start, done)
            out.append(self._buf[pos:start])
            if rules.action_for(s.type) == "deny":
                self.denied = tuple(t for t in ENTITY_TYPES
                                    if any(x.type == t and x.start < safe and rules.action_for(t) == "deny"
                                           for x in spans))
                self._done = len(self._buf)
                return "".join(out)
            out.append(finder.replacement(s.type, self._buf[s.start:s.end]))
            pos = s.end
        out.append(self._buf[pos:safe])
        self._done = safe
        return "".join(out)


async def filtered_events(events: AsyncGenerator[TokenEvent | Finish, None], screen: ResponseFilter,
                          prompt_tokens: int) -> AsyncGenerator[TokenEvent | Finish, None]:
    """A generation's events with their text screened; a denied value ends them with a Finish whose
    finish_reason is "content_filter", and closes `events` (which cancels the generation)."""
    count = 0
    try:
        async for item in events:
            if isinstance(item, Finish):
                text = screen.feed(item.text) + screen.finish()
                yield replace(item, text=text,
                              finish_reason="content_filter" if screen.denied else item.finish_reason)
                return
            count += 1
            text = screen.feed(item.text)
            if screen.denied:
                yield Finish(finish_reason="content_filter", prompt_tokens=prompt_tokens, completion_tokens=count,
                             cached_tokens=0, text=text)
                return
            if text:
                yield TokenEvent(text=text, token_id=item.token_id)
    finally:
        await events.aclose()

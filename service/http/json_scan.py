"""How many JSON values a request body holds, counted as its bytes arrive, before any parsing.

A token-id body costs a Python int per id to parse (2M ids: ~70 MB and most of a second of the
event loop), where a text of the same size is one string. `ValueCounter` counts the commas
outside strings, an upper bound on the values, with C-speed byte searches: one Python step per
string, and strings are bounded too. A body over either bound is refused after the first
bytes that prove it, long before it is read whole or parsed.
"""

from __future__ import annotations

_QUOTES = b'"'


class TooManyValues(Exception):
    """The body holds more values (`kind` "values") or strings than any request the server
    takes (`limit`)."""

    def __init__(self, kind: str, limit: int) -> None:
        super().__init__(f"more than {limit} {kind}")
        self.kind = kind
        self.limit = limit


class ValueCounter:
    """Feed a body's chunks in order (`feed`); raises TooManyValues as soon as the commas outside
    strings exceed `max_values` or the strings exceed `max_strings`.

    Escapes are dropped first (every `\\\\` pair, then every `\\"`), so every quote left
    opens or closes a string: all of it is `bytes.replace`, `count` and `find`, whatever the
    body. A stray backslash outside a string is invalid JSON: the parser stops there."""

    def __init__(self, max_values: int, max_strings: int) -> None:
        self.max_values = max_values
        self.max_strings = max_strings
        self.values = 0  # commas outside strings seen so far
        self.strings = 0
        self._in_string = False  # the last chunk ended inside a string
        self._backslash = b""  # an odd backslash at the end of the last chunk: it escapes on

    def feed(self, chunk: bytes) -> None:
        data = self._backslash + chunk if self._backslash else chunk
        if b"\\" in data:  # a one-byte search (memchr): token ids and most text have none, and
            # the two-byte replaces below cost several times the rest of a chunk's count
            run = len(data) - len(data.rstrip(b"\\"))
            self._backslash = b"\\" if run % 2 else b""
            data = data[:len(data) - run % 2].replace(b"\\\\", b"").replace(b'\\"', b"")
        quotes = data.count(_QUOTES)
        if self.strings + (quotes + 1) // 2 > self.max_strings:
            raise TooManyValues("strings", self.max_strings)
        pos = 0
        while True:
            if self._in_string:
                pos = data.find(_QUOTES, pos) + 1
                if pos == 0:
                    return
                self._in_string = False
            quote = data.find(_QUOTES, pos)
            self.values += data.count(b",", pos, len(data) if quote < 0 else quote)
            if self.values > self.max_values:
                raise TooManyValues("values", self.max_values)
            if quote < 0:
                return
            self.strings += 1
            self._in_string = True
            pos = quote + 1

"""How many JSON values a request body holds, counted as its bytes arrive, before any parsing.

A token-id body costs a Python int per id to parse (2M ids: ~70 MB and most of a second of the
event loop), where a text of the same size is one string. `ValueCounter` counts the commas
outside strings, an upper bound on the values, with C-speed byte searches: one Python step per
string, and strings are bounded too. It also counts the commas of each run of numbers between
brackets (a list of token ids is one), so a list longer than one input may be is refused after
its first few KB, naming the field and the input it is; brackets and braces are bounded, so the
Python steps they take are too. A body over any bound is refused after the first bytes that
prove it, long before it is read whole or parsed.
"""

from __future__ import annotations

import re

_QUOTES = b'"'
_CONTAINER = re.compile(rb"([\[\]{}])")  # split keeps each mark between its pieces
_OPEN = (b"[", b"{")
_KEY_BYTES = 64  # of a key kept to name a field


class TooManyValues(Exception):
    """The body holds more values (`kind` "values"), strings or brackets and braces
    ("containers") than any request the server takes (`limit`), or a list of more numbers than
    one input may hold ("ids"): `field` is the top-level key it is under and `index` the input
    it is (None when the list is not an input's)."""

    def __init__(self, kind: str, limit: int, field: str = "body",
                 index: int | None = None) -> None:
        super().__init__(f"more than {limit} {kind}")
        self.kind = kind
        self.limit = limit
        self.field = field
        self.index = index


class _Container:
    """An open `[` or `{`: the commas directly inside it, and for an object its latest string
    (before a value, its key)."""

    __slots__ = ("commas", "key", "object")

    def __init__(self, mark: bytes) -> None:
        self.object = mark == b"{"
        self.commas = 0
        self.key = b""


class ValueCounter:
    """Feed a body's chunks in order (`feed`); raises TooManyValues as soon as the commas outside
    strings exceed `max_values`, the strings `max_strings`, the brackets and braces
    `max_containers`, or a list holds more than `max_ids` values with no string or list in it.

    Escapes are dropped first (every `\\\\` pair, then every `\\"`), so every quote left
    opens or closes a string: all of it is `bytes.replace`, `count` and `find`, whatever the
    body. A stray backslash outside a string is invalid JSON: the parser stops there."""

    def __init__(self, max_values: int, max_strings: int, max_ids: int | None = None,
                 max_containers: int | None = None) -> None:
        self.max_values = max_values
        self.max_strings = max_strings
        self.max_ids = max_values + 1 if max_ids is None else max_ids
        self.max_containers = 2 * max_strings if max_containers is None else max_containers
        self.values = 0  # commas outside strings seen so far
        self.strings = 0
        self.containers = 0  # brackets and braces seen so far
        self.run = 0  # commas since the last bracket, brace or string: a list of numbers' so far
        self._open: list[_Container] = []
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
                close = data.find(_QUOTES, pos)
                self._keep_key(data, pos, len(data) if close < 0 else close)
                if close < 0:
                    return
                pos = close + 1
                self._in_string = False
            quote = data.find(_QUOTES, pos)
            end = len(data) if quote < 0 else quote
            self.values += data.count(b",", pos, end)
            if self.values > self.max_values:
                raise TooManyValues("values", self.max_values)
            self._outside(data, pos, end)
            if quote < 0:
                return
            self.strings += 1
            self.run = 0  # a string: what follows is no list of ids
            if self._open and self._open[-1].object:
                self._open[-1].key = b""
            self._in_string = True
            pos = quote + 1

    def _keep_key(self, data: bytes, start: int, end: int) -> None:
        """A string directly inside an object may be a key: keep its first bytes."""
        if self._open and self._open[-1].object:
            top = self._open[-1]
            if len(top.key) < _KEY_BYTES:
                top.key += data[start:min(end, start + _KEY_BYTES - len(top.key))]

    def _outside(self, data: bytes, start: int, end: int) -> None:
        """Count the commas of data[start:end] (outside strings) per container and per run."""
        marks = (data.count(b"[", start, end) + data.count(b"]", start, end)
                 + data.count(b"{", start, end) + data.count(b"}", start, end))
        if not marks:
            self._piece(data.count(b",", start, end))
            return
        self.containers += marks
        if self.containers > self.max_containers:
            raise TooManyValues("containers", self.max_containers)
        pieces = _CONTAINER.split(data[start:end])
        self._piece(pieces[0].count(b","))
        for mark, piece in zip(pieces[1::2], pieces[2::2], strict=True):
            if mark in _OPEN:
                self._open.append(_Container(mark))
            elif self._open:
                self._open.pop()
            self.run = 0
            self._piece(piece.count(b","))

    def _piece(self, commas: int) -> None:
        if self._open:
            self._open[-1].commas += commas
        self.run += commas
        if self.run >= self.max_ids:  # n commas: n + 1 values
            raise TooManyValues("ids", self.max_ids, *self._where())

    def _where(self) -> tuple[str, int | None]:
        """The top-level field the current list is under, and the input it is."""
        path = self._open
        if len(path) < 2 or not path[0].object:
            return "body", None
        field = path[0].key.decode("utf-8", "replace")
        if field != "input" or len(path) > 3:
            return field, None
        return field, path[1].commas if len(path) == 3 else 0

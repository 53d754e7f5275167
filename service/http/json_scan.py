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

_QUOTES = b'"'
_MARKS = (b"[", b"]", b"{", b"}")
_OPENING = (0, 2)  # indexes in _MARKS
_BRACE = 2
_WINDOW = 16 << 10  # bytes of a piece counted before the rest: 513 ids of 6 digits take ~3.6 KB
_KEY_BYTES = 64  # of a key kept to name a field
_SMALL = 32  # bytes outside strings searched as one slice
_BETWEEN = frozenset((b",", b", ", b":", b": ", b""))  # what usually separates two strings


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

    def __init__(self, is_object: bool) -> None:
        self.object = is_object
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
        pos = 0
        while True:
            if self._in_string:
                close = data.find(_QUOTES, pos)
                if self._open and self._open[-1].object:
                    self._keep_key(data, pos, len(data) if close < 0 else close)
                if close < 0:
                    return
                pos = close + 1
                self._in_string = False
            quote = data.find(_QUOTES, pos)
            self._outside(data, pos, len(data) if quote < 0 else quote)
            if quote < 0:
                return
            self.strings += 1
            if self.strings > self.max_strings:
                raise TooManyValues("strings", self.max_strings)
            self.run = 0  # a string: what follows is no list of ids
            if self._open and self._open[-1].object:
                self._open[-1].key = b""
            self._in_string = True
            pos = quote + 1

    def _keep_key(self, data: bytes, start: int, end: int) -> None:
        """A string directly inside an object may be a key: keep its first bytes."""
        top = self._open[-1]
        if len(top.key) < _KEY_BYTES:
            top.key += data[start:min(end, start + _KEY_BYTES - len(top.key))]

    def _outside(self, data: bytes, start: int, end: int) -> None:
        """Count the commas of data[start:end] (outside strings) between its brackets and
        braces, found with one memchr pass per kind of mark (`find`: `count` and `re` take a
        nanosecond or more a byte); one Python step per mark, and marks are bounded."""
        if end - start <= _SMALL:  # between two strings, mostly: `", "`, `": "`
            small = data[start:end]
            if small in _BETWEEN:  # the commonest, checked at once
                if small[:1] == b",":
                    self._count(1)
                return
            if not (b"[" in small or b"]" in small or b"{" in small or b"}" in small):
                commas = small.count(b",")
                if commas:
                    self._count(commas)
                return
        find, count, stack = data.find, data.count, self._open
        ahead = [find(mark, start, end) for mark in _MARKS]
        ahead = [end if at < 0 else at for at in ahead]
        pos = start
        while True:
            at = min(ahead)
            if at > pos:  # a piece with no mark or string: the current list's, if it is one;
                # its first _WINDOW bytes first, so a list too long is refused without
                # counting the rest of a large chunk
                split = min(at, pos + _WINDOW)
                commas = count(b",", pos, split)
                if split < at and self.run + commas < self.max_ids:
                    commas += count(b",", split, at)
                if commas:
                    self._count(commas)
            if at == end:
                return
            self.containers += 1
            if self.containers > self.max_containers:
                raise TooManyValues("containers", self.max_containers)
            kind = ahead.index(at)
            if kind in _OPENING:
                stack.append(_Container(kind == _BRACE))
            elif stack:
                stack.pop()
            self.run = 0
            pos = at + 1
            found = find(_MARKS[kind], pos, end)
            ahead[kind] = end if found < 0 else found

    def _count(self, commas: int) -> None:
        self.run += commas
        self.values += commas
        if self._open:
            self._open[-1].commas += commas
        if self.values > self.max_values:
            raise TooManyValues("values", self.max_values)
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

"""File names are data, never text: printable ids for display and JSON, exact bytes for hashing.

On Linux a file name is any byte string; Python decodes the bytes that are not UTF-8 to lone
surrogates (``b'\\xe9'`` becomes ``'\\udce9'``), which cannot be encoded to UTF-8 or written as
strict JSON, and a name may hold newlines or terminal control characters that forge log lines.
Every image id is therefore kept twice on :class:`~vitcircuits.data.images.ImageItem`:

* ``name``: the path as the operating system gave it, used to open the file and hashed by its
  bytes (:func:`name_bytes`);
* ``id``: :func:`display_id` of the name, used everywhere the id is shown or stored (logs, batches,
  figures, manifests, CSV, JSON, the explorer).
"""

from __future__ import annotations

_SHORT_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "$": "\\x24"}


def display_id(name: str) -> str:
    """Printable form of a file name or id: every character is printable and valid UTF-8.

    Printable characters are kept (so ``café/猫.jpg`` reads as itself) except two, and the rest is
    escaped the way Python's ``repr`` does:

    * ``\\`` becomes ``\\\\`` (so the escaping is reversible and two names never share an id);
    * ``$`` becomes ``\\x24`` (matplotlib reads ``$…$`` in figure text as maths);
    * newline, carriage return and tab become ``\\n``, ``\\r``, ``\\t``;
    * a byte that is not UTF-8 (a ``surrogateescape`` surrogate U+DC80–U+DCFF) becomes ``\\xNN``,
      the byte itself; other ASCII control characters become ``\\xNN`` too;
    * any other non-printable character (C1 controls, bidi overrides, zero-width and non-ASCII
      spaces, unpaired surrogates) becomes ``\\uXXXX`` or ``\\UXXXXXXXX``, its code point.

    Ids returned by :func:`~vitcircuits.data.images.resolve_source` are already in this form; do not
    apply it twice (backslashes would double again).
    """
    return "".join(_escape_char(char, strict=True) for char in name)


def printable_text(text: str) -> str:
    """Free text (an error reason) on one printable line: whitespace runs become one space and
    non-printable characters are escaped as in :func:`display_id`; backslashes and ``$`` are kept."""
    return "".join(_escape_char(char, strict=False) for char in " ".join(text.split()))


def name_bytes(name: str) -> bytes:
    """The bytes of a name as the operating system stores it (UTF-8 with ``surrogateescape``, as
    ``os.fsencode`` on Linux); unpaired surrogates that no byte decodes to are kept with
    ``surrogatepass``, so no name fails to encode."""
    try:
        return name.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogatepass")


def _escape_char(char: str, *, strict: bool) -> str:
    if strict and char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    if char.isprintable():
        return char
    code = ord(char)
    if code < 0x80:
        return f"\\x{code:02x}"
    if 0xDC80 <= code <= 0xDCFF:
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"

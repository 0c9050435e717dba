"""Domain names on the wire and as text: the pieces of the wire format
(``networkd.dns.wire``, which re-exports them) that deal in labels."""

from __future__ import annotations


def name_to_wire(name: str) -> bytes:
    """``a.b`` -> ``\\x01a\\x01b\\x00`` (the name must be valid)."""
    out = bytearray()
    for label in name.strip(".").split("."):
        if label:
            raw = label.encode("ascii")
            out.append(len(raw))
            out += raw
    out.append(0)
    return bytes(out)


_PLAIN_BYTES = bytes(b for b in range(0x21, 0x7F) if b not in (0x2E, 0x5C))  # kept as they are in text


def wire_to_text(qname: bytes) -> str:
    """Lower-case dotted text of an uncompressed wire name.  A label may hold
    any byte (RFC 2181 s11): a dot, a backslash, a byte outside printable
    ASCII is written ``\\DDD`` (RFC 1035 s5.1), so the text still splits into
    its labels at dots and no such label equals a local name's; a name under
    a local wildcard matches it whatever its other labels hold."""
    labels = []
    offset = 0
    while qname[offset]:
        length = qname[offset]
        label = qname[offset + 1: offset + 1 + length].lower()
        if not label.translate(None, _PLAIN_BYTES):
            labels.append(label.decode("ascii"))
        else:
            labels.append("".join(chr(b) if 0x21 <= b <= 0x7E and b not in (0x2E, 0x5C) else f"\\{b:03d}"
                                  for b in label))
        offset += 1 + length
    return ".".join(labels)


def fold_question(question: bytes) -> bytes:
    """The question with its name's ASCII letters lower-cased; type and class
    stay as they are (bytes.lower() over all of it made HTTPS, 65, into 97)."""
    return question[:-4].lower() + question[-4:]


def name_ends_at_first_zero(data: bytes) -> bool:
    """No label of the (well-formed) question name holds a zero byte, which
    question_key and has_fixed_bytes would take for the name's end."""
    offset = 12
    while data[offset]:
        offset += 1 + data[offset]
    return data.find(b"\x00", 12) == offset

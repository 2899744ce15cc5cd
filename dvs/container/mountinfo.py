"""Parsing /proc/PID/mountinfo (proc(5)): one line per mount of that process's namespace.

``ID PARENT MAJ:MIN ROOT MOUNT_POINT OPTIONS [OPTIONAL...] - FSTYPE SOURCE SUPER_OPTIONS``;
paths escape space, tab, newline and backslash as ``\\ooo`` (octal). Lines appear in mount
order, so of several mounts on one mount point the last listed is the visible one.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    mount_id: int
    parent_id: int
    root: str
    mount_point: str
    fstype: str
    source: str
    super_options: str


def unescape(text: str) -> str:
    """Undo mountinfo's ``\\ooo`` escapes."""
    if "\\" not in text:
        return text
    out = []
    i = 0
    while i < len(text):
        octal = text[i + 1 : i + 4]
        if text[i] == "\\" and len(octal) == 3 and all(c in "01234567" for c in octal):
            out.append(chr(int(octal, 8)))
            i += 4
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def parse(text: str) -> list[MountEntry]:
    entries = []
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        tail = right.split()
        if not sep or len(fields) < 5 or len(tail) < 2:
            continue
        entries.append(
            MountEntry(
                mount_id=int(fields[0]),
                parent_id=int(fields[1]),
                root=unescape(fields[3]),
                mount_point=unescape(fields[4]),
                fstype=tail[0],
                source=unescape(tail[1]),
                super_options=tail[2] if len(tail) > 2 else "",
            )
        )
    return entries


def read(pid: int | str = "self") -> list[MountEntry]:
    with open(f"/proc/{pid}/mountinfo") as f:
        return parse(f.read())

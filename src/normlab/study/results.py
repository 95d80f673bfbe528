"""results.jsonl: one JSON object per finished run, appended so that an interruption loses nothing.

Writing: each record is serialized to one complete line and handed to the kernel in a single
``os.write`` on a descriptor opened with O_APPEND, then fsync'ed. A run is either fully in the file or not
at all; a crash can at worst leave a partial last line (e.g. a full disk or power loss mid-write).

Reading: complete lines are parsed; a trailing partial line (no final newline) or an unparsable line is
ignored. `repair` cuts such a partial tail off before new lines are appended, so it cannot glue itself to
the next record.
"""

from __future__ import annotations

import json
import os
from pathlib import Path


def append_record(path: str | Path, record: dict) -> None:
    """Append ``record`` as one line: a single write of the complete line, O_APPEND, then fsync."""
    line = (json.dumps(record, sort_keys=True, allow_nan=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        written = os.write(fd, line)
        while written < len(line):  # regular files take the whole line at once; loop only as a safeguard
            written += os.write(fd, line[written:])
        os.fsync(fd)
    finally:
        os.close(fd)


def read_records(path: str | Path) -> tuple[list[dict], int]:
    """The records of every complete, well-formed line, and how many lines were skipped."""
    path = Path(path)
    if not path.exists():
        return [], 0
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail: after the last newline, a partial line or b""
    records, skipped = [], int(bool(tail.strip()))
    for raw in complete:
        if not raw.strip():
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            skipped += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            skipped += 1
    return records, skipped


def repair(path: str | Path) -> int:
    """Cut a partial last line (bytes after the last newline) off the file; returns the bytes removed."""
    path = Path(path)
    if not path.exists():
        return 0
    data = path.read_bytes()
    keep = data.rfind(b"\n") + 1
    if keep == len(data):
        return 0
    os.truncate(path, keep)
    return len(data) - keep

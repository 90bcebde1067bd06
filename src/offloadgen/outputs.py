"""Result files of jobs and prompt runs: what may be written into, by whom, and how.

- An output is locked (flock) for as long as a job writes it: a second job on the same file is
  refused and told which process holds it, so no line is answered twice.
- A regular file is read back before anything is appended: every line must be one of our
  records (a JSON object starting with `{"key": `, with an int "line" and a "text" or "error"),
  else the file is someone else's and is refused, untouched. The one exception is a last line
  without its newline that is a prefix of a record: a write of ours cut short, dropped and redone.
  A damaged record elsewhere is refused with its line number and how to drop it (its input line
  is then answered again). Records of an older offloadgen (no "key": it resumed by input line
  number) are given their keys by the job that reads them (jobs.legacy_keys) and rewritten once.
- A pipe, a terminal or another non-regular file is written only: no resume scan (reading a
  pipe would hang), no lock, no rewrite.
- Appends are all-or-nothing: a batch's bytes are written, then fsynced; a failed write (a full
  disk) cuts the file back to where the batch began, so no record is ever half there.
- A symlinked output is written through: the link stays, its target gets the records.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import stat
import sys
from pathlib import Path

from .errors import OffloadgenError

RECORD_START = b'{"key": '  # how every record begins: a torn last line is a prefix of this shape


def encode_record(rec: dict) -> bytes:
    """One JSON line, "key" first. allow_nan=False: NaN is not JSON (ids are cleaned before this).
    A lone surrogate (an input's "\\ud800") goes back out as the same JSON escape: UTF-8 has no
    byte form for it."""
    rec = {"key": rec["key"], **rec}
    return json.dumps(rec, ensure_ascii=False, allow_nan=False).encode("utf-8", "backslashreplace") + b"\n"


def parse_record(raw: bytes) -> dict | None:
    """The record on a line we wrote (an older offloadgen's has no "key"), or None when the line
    is not one."""
    try:
        rec = json.loads(raw)
    except (ValueError, RecursionError):  # UnicodeDecodeError is a ValueError
        return None
    if not (isinstance(rec, dict) and isinstance(rec.get("key", ""), str) and type(rec.get("line")) is int
            and ("text" in rec or "error" in rec)):
        return None
    return rec


def looks_like_ours(raw: bytes) -> bool:
    """A line that begins as our records do but is no JSON (cut short, or bytes changed), or is
    cut short before saying: a damaged record of ours, not another program's line."""
    raw = raw.strip()
    if RECORD_START.startswith(raw):
        return True
    try:
        json.loads(raw)
        return False  # whole JSON, but not a record's shape: someone else's
    except (ValueError, RecursionError):
        return raw.startswith(RECORD_START)


def scan_records(data: bytes, name: str) -> tuple[list[dict], int, bool]:
    """(records, bytes to keep, whether a newline must follow them) of an output's content;
    refuses content that is not ours."""
    records, pos, line_no = [], 0, 0
    while pos < len(data):
        line_no += 1
        end = data.find(b"\n", pos)
        raw = data[pos:] if end < 0 else data[pos:end]
        rec = parse_record(raw) if raw.strip() else None
        if rec is not None:
            records.append(rec)
        elif end < 0 and (not raw.strip() or RECORD_START.startswith(raw) or raw.startswith(RECORD_START)):
            if raw.strip():
                print(f"offloadgen: {name}: dropping a torn last line (a write cut short); it will be redone",
                      file=sys.stderr)
            return records, pos, False
        elif raw.strip() and looks_like_ours(raw):
            raise OffloadgenError(f"{name}: line {line_no} is a damaged offloadgen record (cut short or edited): "
                                  f"delete that line (sed -i '{line_no}d' {name}) and run again; its input line is "
                                  "then answered again")
        elif raw.strip():
            raise OffloadgenError(f"{name}: line {line_no} is not an offloadgen record: refusing to write into a "
                                  "file that another program wrote (choose another --output)")
        if end < 0:
            return records, len(data), True  # a whole record whose newline was cut off
        pos = end + 1
    return records, len(data), False


def lock_holder(fd: int) -> int | None:
    """The pid holding a flock on fd's file, from /proc/locks (Linux), or None if not found."""
    st = os.fstat(fd)
    ident = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                parts = line.split()
                if len(parts) > 5 and parts[1] == "FLOCK" and parts[5] == ident and parts[4].isdigit():
                    return int(parts[4])
    except OSError:
        pass
    return None


def lock_exclusive(fd: int, what: str, wait: bool = False) -> None:
    """flock(LOCK_EX) on fd. Without wait, refuse at once naming the holder; with wait, say who
    is waited for, then wait."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return
    except BlockingIOError:
        pid = lock_holder(fd)
    who = f"process {pid}" if pid else "another process"
    if not wait:
        raise OffloadgenError(f"{what} is in use by {who} (another offloadgen run writing it): wait for it to "
                              "finish, or choose another file")
    print(f"offloadgen: {what} is being written by {who}; waiting for it", file=sys.stderr)
    fcntl.flock(fd, fcntl.LOCK_EX)


def check_output_path(path: str | os.PathLike) -> None:
    """Refuse an output that cannot be written, before any work: a folder, a missing folder, no
    write permission. Creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise OffloadgenError(f"--output {path} is a folder; give a file name")
    if p.exists():
        if not os.access(p, os.W_OK):
            raise OffloadgenError(f"--output {path}: no permission to write it")
        return
    parent = Path(os.path.realpath(p)).parent
    if not parent.is_dir():
        raise OffloadgenError(f"--output {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OffloadgenError(f"--output {path}: no permission to create files in {parent}")


def is_regular_or_new(path: str | os.PathLike) -> bool:
    """A regular file (through symlinks) or nothing yet: a file we may read back and lock."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except FileNotFoundError:
        return True


class JobOutput:
    """An output file opened for a run: locked, its earlier records read, appended to whole
    batches at a time. Use as a context manager; closing releases the lock."""

    def __init__(self, path: str | os.PathLike, legacy_keys=None):
        """legacy_keys(record) -> key: the key of an older offloadgen's record (which has none);
        None: such records are refused, with what to do."""
        self.name = str(path)
        self.legacy_keys = legacy_keys
        check_output_path(path)
        try:
            self.regular = is_regular_or_new(path)
            # A symlink's target is what we read, lock, append to and (--ordered) replace.
            self.path = Path(os.path.realpath(path)) if self.regular else Path(path)
            flags = os.O_RDWR | os.O_CREAT | os.O_APPEND if self.regular else os.O_WRONLY
            self.fd = os.open(self.path, flags | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise OffloadgenError(f"--output {path}: cannot open it ({e.strerror})") from None
        self.done: dict[str, int] = {}  # key -> input line number, of every record in the file
        try:
            if self.regular:
                lock_exclusive(self.fd, f"--output {path}")
                self._read_back()
        except BaseException:
            os.close(self.fd)
            raise

    def _read_all(self) -> tuple[bytes, list[dict], int, bool]:
        size = os.fstat(self.fd).st_size
        data = os.pread(self.fd, size, 0) if size else b""
        return (data, *scan_records(data, self.name))

    def _read_back(self) -> None:
        data, records, keep, needs_newline = self._read_all()
        if any("key" not in r for r in records):
            records = self._key_legacy(records)  # the file rewritten: a torn last line goes with it
        elif keep < len(data):
            os.ftruncate(self.fd, keep)
        elif needs_newline:
            os.write(self.fd, b"\n")
        self.done = {r["key"]: r["line"] for r in records}

    def _key_legacy(self, records: list[dict]) -> list[dict]:
        """An older offloadgen's records (no "key") with the keys resume matches by now, written
        back once (atomically), so that later runs need not derive them again."""
        old = sum(1 for r in records if "key" not in r)
        if self.legacy_keys is None:
            raise OffloadgenError(f"--output {self.name} holds {old} record{'s' * (old != 1)} of an older offloadgen (without \"key\"): "
                                  "resume it with --input and the input file it was made from, which gives them keys, "
                                  "or choose another --output")
        records = [r if "key" in r else {"key": self.legacy_keys(r), **r} for r in records]
        self._replace_with(records, "give the older records their keys")
        print(f"offloadgen: {self.name}: gave {old} record{'s' * (old != 1)} of an older offloadgen their keys (by input line number, "
              "as it resumed); the file is rewritten with them", file=sys.stderr)
        return records

    def _replace_with(self, records: list[dict], why: str) -> None:
        """The file's content replaced by records, atomically (a temporary file renamed over it),
        and kept open and locked: the new file is locked before it takes the name."""
        tmp = self.path.with_name(self.path.name + ".tmp")
        fd = None
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND | os.O_CLOEXEC, 0o644)
            fcntl.flock(fd, fcntl.LOCK_EX)
            data = memoryview(b"".join(encode_record(r) for r in records))
            while data:
                data = data[os.write(fd, data):]
            os.fsync(fd)
            os.replace(tmp, self.path)
        except OSError as e:
            if fd is not None:
                os.close(fd)
            tmp.unlink(missing_ok=True)
            raise OffloadgenError(f"cannot rewrite --output {self.name} to {why} ({e.strerror}); it is kept as it "
                                  "was") from None
        os.close(self.fd)
        self.fd = fd

    def append(self, records: list[dict]) -> None:
        """Write the records and fsync; on failure nothing of them stays, and one line says why."""
        data = b"".join(encode_record(r) for r in records)
        if not data:
            return
        start = None
        try:
            start = os.lseek(self.fd, 0, os.SEEK_END) if self.regular else None
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
            if self.regular:
                os.fsync(self.fd)
        except OSError as e:
            if start is not None:
                try:
                    os.ftruncate(self.fd, start)
                except OSError:
                    pass  # then the next run finds a torn last line and redoes it
            hint = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
            raise OffloadgenError(f"cannot write to --output {self.name} ({e.strerror}); the results written before "
                                  f"are kept: {hint} and run the same command again to resume") from None
        self.done.update((r["key"], r["line"]) for r in records)

    def rewrite_in_order(self, position: dict[str, int]) -> None:
        """Rewrite the file sorted by position[key] (records of keys without one last, as they
        were), atomically: a temporary file renamed over the target, so a symlink stays a link."""
        _, records, _, _ = self._read_all()
        records.sort(key=lambda r: position.get(r["key"], len(position)))
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            with open(tmp, "wb") as f:
                f.write(b"".join(encode_record(r) for r in records))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OffloadgenError(f"cannot rewrite --output {self.name} in input order ({e.strerror}); "
                                  "its results are kept as they were") from None

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # releases the lock
            self.fd = None

    def __enter__(self) -> "JobOutput":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

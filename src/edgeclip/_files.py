"""Opening files that users were handed: regular files only, bounded, never blocking. stdlib only.

A path may name a FIFO (reading blocks forever), a device (/dev/zero never ends), a folder or a
link out of where it should be. `open_regular` checks the path before opening it, opens it so that
a FIFO swapped in after the check cannot block (O_NONBLOCK), and checks what it opened (fstat).
Errors are the caller's typed error, naming the file and what it is instead.
"""
from __future__ import annotations

import os
import stat

_KINDS = ((stat.S_ISDIR, "a folder (directory)"), (stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISLNK, "a symbolic link"))


def file_kind(mode: int) -> str:
    return next((kind for test, kind in _KINDS if test(mode)), "not a regular file")


def _not_regular(error, what: str, path, mode: int):
    return error(f"{what} {path} is {file_kind(mode)}, not a regular file; pass a plain file (reading a pipe "
                 "or device could block forever or never end)")


def open_regular(path, error, what: str, *, max_bytes: int | None = None, follow_links: bool = True,
                 size_error=None, name: str | None = None) -> int:
    """A read-only fd of `path` if it is a regular file (of at most `max_bytes`), else `error`.

    `follow_links=False` refuses a symbolic link itself; `size_error` is raised for an oversized file
    (default `error`); `name` is how messages show the path (default: as given)."""
    shown = path if name is None else name
    try:
        st = os.stat(path) if follow_links else os.lstat(path)
    except FileNotFoundError:
        raise error(f"{what} not found: {shown} (no such file); check the path") from None
    except (OSError, ValueError) as e:
        raise error(f"{what} {shown} cannot be read ({getattr(e, 'strerror', None) or e})") from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_regular(error, what, shown, st.st_mode)
    _check_size(st.st_size, max_bytes, size_error or error, what, shown)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0)
    if not follow_links:
        flags |= getattr(os, "O_NOFOLLOW", 0)
    try:
        fd = os.open(path, flags)
    except OSError as e:
        raise error(f"{what} {shown} cannot be opened ({e.strerror or e})") from None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):  # swapped after the check
        os.close(fd)
        raise _not_regular(error, what, shown, st.st_mode)
    return fd


def _check_size(size: int, max_bytes: int | None, error, what: str, path) -> None:
    if max_bytes is not None and size > max_bytes:
        limit = f"{max_bytes >> 20} MiB" if max_bytes >= 1 << 20 else f"{max_bytes:,} bytes"
        raise error(f"{what} {path} is {size:,} bytes, larger than {limit} (the limit for a {what})")


def read_regular(path, error, what: str, max_bytes: int, *, follow_links: bool = True, size_error=None) -> bytes:
    """The bytes of a regular file, at most `max_bytes` even where its size lies (/proc files say 0)."""
    fd = open_regular(path, error, what, max_bytes=max_bytes, follow_links=follow_links, size_error=size_error)
    with os.fdopen(fd, "rb") as f:
        data = f.read(max_bytes + 1)
    if len(data) > max_bytes:
        _check_size(len(data), max_bytes, size_error or error, what, path)
    return data


def size_text(n: int) -> str:
    """A byte count as people read it: "1.2 MB", or "34.5 kB" under 0.1 MB."""
    return f"{n / 1e6:.1f} MB" if n >= 1e5 else f"{n / 1e3:.1f} kB"

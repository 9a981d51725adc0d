"""Whole-file writes that a crash cannot leave half done.

A plan or profile file is either the old one or the new one: the text goes to a temporary
file in the same directory, is flushed to disk, and is renamed over the target
(``os.replace`` is atomic on POSIX and Windows within one file system).
"""
from __future__ import annotations

import os
import tempfile


def write_text_atomic(path, text: str, *, prefix: str = ".tmp-", suffix: str = "") -> None:
    """Write ``text`` to ``path`` atomically, creating its directory; the file gets the mode any
    new file would (the umask), not ``mkstemp``'s 0600. On any error nothing is left behind."""
    path = os.fspath(path)
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=prefix, suffix=suffix, dir=d)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise

"""``execute_and_return``: run a program and capture its output, safely (bitsandbytes' helper for
querying tools such as ``nvidia-smi``)."""
from __future__ import annotations

import math
import os
import shlex
import subprocess
from typing import Mapping, Optional, Sequence, Union

__all__ = ["execute_and_return", "CommandFailed"]


class CommandFailed(subprocess.CalledProcessError):
    """A non-zero exit status under ``check=True``; the message includes stderr."""

    def __str__(self) -> str:
        err = (self.stderr or "").strip()
        tail = f": {err[-2000:]}" if err else ""
        return f"{shlex.join(self.cmd)} exited with status {self.returncode}{tail}"


def _argv(command) -> list[str]:
    if isinstance(command, str):
        argv = shlex.split(command)
    elif isinstance(command, (bytes, bytearray)):
        raise TypeError("command must be a str or a sequence of str, got bytes")
    elif isinstance(command, Sequence):
        argv = list(command)
    else:
        raise TypeError(f"command must be a str or a sequence of str, got "
                        f"{type(command).__name__}")
    if not argv:
        raise ValueError("command is empty")
    for i, arg in enumerate(argv):
        if isinstance(arg, os.PathLike):
            arg = argv[i] = os.fspath(arg)
        if not isinstance(arg, str):
            raise TypeError(f"command[{i}] must be a str or os.PathLike, got "
                            f"{type(arg).__name__}")
        if "\x00" in arg:
            raise ValueError(f"command[{i}] contains a NUL byte")
    return argv


def execute_and_return(command_string: Union[str, Sequence[Union[str, os.PathLike]]],
                       timeout: Optional[float] = 60.0, *, check: bool = False,
                       cwd: Optional[Union[str, os.PathLike]] = None,
                       env: Optional[Mapping[str, str]] = None) -> tuple[str, str]:
    """Run a program without a shell and return its ``(stdout, stderr)`` (bitsandbytes 0.50
    ``bitsandbytes.utils.execute_and_return(command_string)``, same first argument; the rest
    is opsq's: bitsandbytes waits without a time limit).

    Args:
        command_string: an argument list
            (``["nvidia-smi", "--query-gpu=name", "--format=csv"]``), or a string split with
            POSIX ``shlex`` rules. No shell is involved either way: ``;``, ``|``, ``>``,
            ``$VAR`` and globs are passed to the program literally. Error messages call it
            ``command`` (``command[1]`` is its second word).
        timeout: seconds before the program is killed (> 0), or None to wait indefinitely.
        check: raise :class:`CommandFailed` on a non-zero exit status.
        cwd: working directory. env: the complete environment (default: inherited).
    Returns:
        stdout and stderr, decoded as UTF-8 (undecodable bytes replaced) and stripped.
    Raises:
        TypeError: ``command_string`` is not a str / sequence of str. ValueError: an empty
        command, a NUL byte, a bad ``timeout``. NotADirectoryError: ``cwd`` is not a directory.
        FileNotFoundError: the program was not found. PermissionError: it is not executable.
        TimeoutError: it ran longer than ``timeout`` (it was killed).
        CommandFailed (a ``subprocess.CalledProcessError``): non-zero exit with ``check=True``.
    """
    argv = _argv(command_string)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float))
                                or not math.isfinite(timeout) or timeout <= 0):
        raise ValueError(f"timeout must be a positive number of seconds or None, got {timeout!r}")
    if cwd is not None and not os.path.isdir(cwd):
        raise NotADirectoryError(f"cwd is not a directory: {os.fspath(cwd)!r}")
    try:
        proc = subprocess.run(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, timeout=timeout, cwd=cwd,
                              env=None if env is None else dict(env), shell=False, check=False)
    except FileNotFoundError:
        raise FileNotFoundError(f"program not found: {argv[0]!r} (command {shlex.join(argv)})") \
            from None
    except PermissionError:
        raise PermissionError(f"program not executable: {argv[0]!r}") from None
    except subprocess.TimeoutExpired:
        raise TimeoutError(f"{shlex.join(argv)} did not finish within {timeout} s and was "
                           "killed") from None
    out = proc.stdout.decode("utf-8", errors="replace").strip()
    err = proc.stderr.decode("utf-8", errors="replace").strip()
    if check and proc.returncode != 0:
        raise CommandFailed(proc.returncode, argv, out, err)
    return out, err

"""The sidecar's local `Mesh` listener on a Unix domain socket that only the sidecar's user can open.

Whoever reaches the sidecar's plaintext `Mesh` service calls the mesh as the sidecar's identity. On loopback TCP
that is any process on the host; a Unix socket is guarded by file permissions instead: the socket is 0600 in a
folder of its own (0700), both owned by the sidecar's user, so only that user's processes (the agent it fronts)
can connect. gRPC speaks `unix:PATH` natively in every language (Python, grpc-js, grpc-go, ...), so a plain agent
only changes the address it dials.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Final

import grpc

log = logging.getLogger(__name__)

_MAX_PATH_BYTES: Final = 107
"""sun_path holds 108 bytes on Linux, the terminating NUL included."""


def default_socket_path(state: Path) -> Path:
    """`<state folder>/run/sidecar-<pid>.sock` (unique among live sidecars sharing a state folder); when that is
    too long for a socket address, `<tmp>/hivemesh-<uid>/sidecar-<pid>.sock` (a folder of this user's, 0700)."""
    name = f"sidecar-{os.getpid()}.sock"
    path = (state / "run" / name).absolute()
    if len(os.fsencode(path)) <= _MAX_PATH_BYTES:
        return path
    return Path(tempfile.gettempdir()) / f"hivemesh-{os.geteuid()}" / name


def _private_folder(folder: Path) -> None:
    """Create folder 0700, or accept an existing one this user owns; warn when others may enter it."""
    if not folder.exists():
        folder.mkdir(mode=0o700, parents=True)
        os.chmod(folder, 0o700)  # mkdir's mode is masked by the umask
        return
    st = folder.stat()
    if st.st_uid != os.geteuid():
        raise PermissionError(f"the socket folder {folder} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        log.warning("the socket folder %s is open to other users (mode %04o): the socket's own 0600 is then the "
                    "only barrier; a folder of its own (0700) is safer", folder, stat.S_IMODE(st.st_mode))


def _refuse_live_or_foreign(path: Path) -> None:
    """gRPC replaces an existing socket file when it binds: never one a live process still serves, nor a file."""
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket; refusing to replace it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(1.0)
        probe.connect(str(path))
    except OSError:
        return  # stale: left by a process that died
    finally:
        probe.close()
    raise OSError(f"another process serves {path}; give this sidecar its own --mesh-socket")


def bind_private_socket(server: grpc.aio.Server, path: Path) -> str:
    """Add an insecure port on the Unix socket at path (folder 0700, socket 0600); returns its `unix:` address."""
    path = path.absolute()
    if len(os.fsencode(path)) > _MAX_PATH_BYTES:
        raise ValueError(f"the socket path {path} is longer than the {_MAX_PATH_BYTES} bytes a Unix socket "
                         "allows; choose a shorter --mesh-socket")
    _private_folder(path.parent)
    _refuse_live_or_foreign(path)
    address = f"unix:{path}"
    old = os.umask(0o177)  # the socket is born 0600: no moment when another user could connect
    try:
        if server.add_insecure_port(address) == 0:
            raise OSError(f"cannot listen on {address}")
    except RuntimeError as exc:
        raise OSError(f"cannot listen on {address}: {exc}") from None
    finally:
        os.umask(old)
    os.chmod(path, 0o600)
    return address


def remove_socket(path: Path) -> None:
    """Remove the socket file once its server stopped (gRPC usually has already)."""
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(path.lstat().st_mode):
            path.unlink()


__all__ = ["bind_private_socket", "default_socket_path", "remove_socket"]

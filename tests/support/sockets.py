"""The kernel's view of this process's TCP connections, for tests that check what a component keeps open."""

from __future__ import annotations

import os


def connections_to(port: int) -> set[str]:
    """The established TCP connections (socket inodes) this process holds to `port`: the kernel's view, /proc."""
    inodes = set()
    for fd in os.listdir("/proc/self/fd"):
        try:
            link = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:["):-1])
    found = set()
    for table in ("/proc/self/net/tcp", "/proc/self/net/tcp6"):
        with open(table) as f:
            next(f)
            for line in f:
                fields = line.split()
                remote, state, inode = fields[2], fields[3], fields[9]
                if state == "01" and int(remote.rsplit(":", 1)[1], 16) == port and inode in inodes:
                    found.add(inode)
    return found

"""Starting Ray: the ports a job uses."""

from __future__ import annotations

import socket


def free_port() -> int:
    """A TCP port nothing listens on now (for a local Ray's dashboard, whose address its job is told)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]

"""Offline by construction: a connection to anything but loopback fails inside the test run."""

import _socket
import socket

import pytest
from pytest_socket import SocketConnectBlockedError


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_non_loopback_connect_is_blocked() -> None:
    # The guard must be installed before anything is attempted, so nothing can leave the machine.
    assert socket.socket.connect is not _socket.socket.connect, "pytest-socket guard is not active"
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with pytest.raises(SocketConnectBlockedError):
        s.connect(("192.0.2.1", 9))  # TEST-NET-1, documentation-only range
    s.close()


def test_loopback_is_allowed() -> None:
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    client = socket.create_connection(server.getsockname(), timeout=5)
    client.close()
    server.close()

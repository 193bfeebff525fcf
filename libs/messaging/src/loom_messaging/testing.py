"""For tests of any member: a private RabbitMQ node for fault tests (DESIGN §14,
SERVICES.md) with its own node name, AMQP and distribution ports and data directory, so a
test may stop and restart it without touching the shared broker on 5672.

`RabbitNode.start()` / `stop()` / `kill()` may be called again and again: the node keeps
its name, ports and data (durable queues and persistent messages survive a restart).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

__all__ = ["RabbitNode", "rabbitmq_installed"]

SERVER = "rabbitmq-server"
CTL = "rabbitmqctl"


def rabbitmq_installed() -> bool:
    return shutil.which(SERVER) is not None and shutil.which(CTL) is not None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.2):
            return True
    except OSError:
        return False


class RabbitNode:
    """One private node on loopback. `url` is its AMQP URL (guest/guest)."""

    def __init__(self, *, consumer_timeout_ms: int = 5000) -> None:
        self.name = f"loomtest-{uuid.uuid4().hex[:8]}@localhost"
        self.amqp_port = free_port()
        self.dist_port = free_port()
        self.url = f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"
        self.dir = Path(tempfile.mkdtemp(prefix="loom-rabbit-"))
        (self.dir / "enabled_plugins").write_text("[].\n")
        (self.dir / "rabbitmq.conf").write_text(
            f"consumer_timeout = {consumer_timeout_ms}\nloopback_users = none\n"
        )
        # Without a channel tick the consumer timeout is checked once a minute.
        (self.dir / "advanced.config").write_text("[{rabbit,[{channel_tick_interval,1000}]}].\n")
        shutil.chown(self.dir, "rabbitmq", "rabbitmq")
        for path in self.dir.iterdir():
            shutil.chown(path, "rabbitmq", "rabbitmq")
        self.env = {
            **os.environ,
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.amqp_port),
            # Its default (AMQP port + 20000) fails above 45535.
            "RABBITMQ_DIST_PORT": str(self.dist_port),
            "RABBITMQ_MNESIA_BASE": str(self.dir / "mnesia"),
            "RABBITMQ_LOG_BASE": str(self.dir / "log"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(self.dir / "enabled_plugins"),
            "RABBITMQ_CONFIG_FILE": str(self.dir / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(self.dir / "advanced.config"),
            "ERL_CRASH_DUMP": str(self.dir / "erl_crash.dump"),
            "RABBITMQ_PID_FILE": str(self.dir / "node.pid"),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
            "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
        }

    def start(self, timeout: float = 60) -> float:
        """Start the node and wait until it accepts AMQP connections; returns the seconds
        that took. `-detached` fails silently, so a node that does not come up is started
        once more in the foreground to show why."""
        began = time.monotonic()
        subprocess.run([SERVER, "-detached"], env=self.env, check=True, timeout=60)
        while not _accepts(self.amqp_port):
            if time.monotonic() - began > timeout:
                shown = subprocess.run(
                    ["timeout", "20", SERVER],
                    env=self.env,
                    capture_output=True,
                    text=True,
                    check=False,
                )
                raise RuntimeError(
                    f"RabbitMQ node {self.name} did not start in {timeout} s:\n"
                    f"{shown.stdout[-3000:]}{shown.stderr[-2000:]}"
                )
            time.sleep(0.1)
        return time.monotonic() - began

    def ensure_started(self) -> None:
        """Start the node if it is down (a test that stopped it may have failed)."""
        if not _accepts(self.amqp_port):
            self.start()

    def stop(self) -> None:
        """A clean shutdown (clients see CONNECTION_FORCED); returns once it is gone."""
        subprocess.run(
            [CTL, "-n", self.name, "shutdown"],
            env=self.env,
            check=False,
            capture_output=True,
            timeout=60,
        )
        deadline = time.monotonic() + 30
        while _accepts(self.amqp_port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def kill(self) -> None:
        """SIGKILL the node's Erlang VM: a crash, no goodbye to the clients. (A quorum
        queue declared less than ~2 s before may be lost, SERVICES.md.)"""
        pid_file = self.dir / "node.pid"
        if pid_file.exists():
            with contextlib.suppress(ProcessLookupError, ValueError):
                os.kill(int(pid_file.read_text().strip()), signal.SIGKILL)
        deadline = time.monotonic() + 30
        while _accepts(self.amqp_port) and time.monotonic() < deadline:
            time.sleep(0.1)

    def remove(self) -> None:
        """Stop the node and delete its data."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

"""Toy engine and front-end entry points for the supervisor's tests: the process lifecycle
without a model (the real ones load a backbone, which the service's own tests cover)."""

from __future__ import annotations

import os
import signal
import socket
import sys
import time
from typing import Any

from service.engine.control import ControlBlock
from service.engine.shm import SlotPool
from service.supervisor import Layout, Supervisor


def engine(layout: Layout, payload: Any, generation: int) -> None:
    control = ControlBlock.attach(layout.control)
    time.sleep(payload.get("engine_start_s", 0.0))
    control.set_engine(os.getpid(), generation, True)
    signal.sigwait({signal.SIGTERM})


def frontend(
    layout: Layout, payload: Any, index: int, incarnation: int, sock: socket.socket
) -> None:
    import uvicorn

    pool = SlotPool(layout.slots(index, incarnation), 4, (3, 2, 2))  # a segment of its own

    async def app(scope, receive, send):  # answers with who it is and the engine's state
        if scope["type"] != "http":
            return
        control = ControlBlock.attach(layout.control)
        _, generation, ready, _ = control.engine()
        body = f"{os.getpid()} {index} {generation} {int(ready)}".encode()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": body})

    try:
        uvicorn.Server(uvicorn.Config(app, log_level="warning")).run(sockets=[sock])
    finally:
        pool.close()


if __name__ == "__main__":  # python -m tests.processes.toy PORT N
    port, n = int(sys.argv[1]), int(sys.argv[2])
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    sock.listen(128)
    sock.set_inheritable(True)
    raise SystemExit(Supervisor(engine, frontend, {}, n, sock, drain_timeout_s=5).run())

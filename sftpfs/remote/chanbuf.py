"""A receive buffer for paramiko channels that does not copy what passes through it.

paramiko's BufferedPipe keeps received data in an `array.array`: every SSH
packet is copied in, and a read copies it out twice (a slice, then
`tobytes`). A cold read of a big file moves every byte through it; those
copies held the GIL for a seventh of the whole read. Here packets stay the
`bytes` objects paramiko made and a read that takes everything joins them
once (or hands back the only one, uncopied).

It replaces `Channel.in_buffer` before the channel carries data, with the same
interface and locking (paramiko's transport thread feeds it, the reader reads).
"""

from __future__ import annotations

import collections
import threading
import time

from paramiko.buffered_pipe import BufferedPipe, PipeTimeout


class ChunkPipe(BufferedPipe):
    def __init__(self) -> None:
        super().__init__()
        self._chunks: collections.deque[bytes] = collections.deque()
        self._size = 0

    def set_event(self, event: threading.Event) -> None:
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data: bytes | str) -> None:
        if isinstance(data, str):
            data = data.encode()
        with self._lock:
            if self._event is not None:
                self._event.set()
            if data:
                self._chunks.append(bytes(data))
                self._size += len(data)
            self._cv.notify_all()

    def read_ready(self) -> bool:
        with self._lock:
            return self._size > 0

    def read(self, nbytes: int, timeout: float | None = None) -> bytes:
        with self._lock:
            if self._size == 0:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                while self._size == 0 and not self._closed:
                    then = time.time()
                    self._cv.wait(timeout)
                    if timeout is not None:
                        timeout -= time.time() - then
                        if timeout <= 0.0:
                            raise PipeTimeout()
                if self._size == 0:
                    return b""
            out = self._take(nbytes)
            if self._size == 0 and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def _take(self, n: int) -> bytes:
        chunks = self._chunks
        if n >= self._size:
            out = chunks[0] if len(chunks) == 1 else b"".join(chunks)
            chunks.clear()
            self._size = 0
            return out
        parts = []
        need = n
        while need:
            c = chunks[0]
            if len(c) <= need:
                parts.append(chunks.popleft())
                need -= len(c)
            else:
                parts.append(c[:need])
                chunks[0] = c[need:]
                need = 0
        self._size -= n
        return b"".join(parts)

    def empty(self) -> bytes:
        with self._lock:
            out = self._take(self._size) if self._size else b""
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def __len__(self) -> int:
        with self._lock:
            return self._size

"""Request slots that many tasks can take several at a time without deadlock."""

from __future__ import annotations

import trio


class Slots:
    """A pool of request slots; `take(n)` gets n of them at once or waits.

    Taking several units one by one from a plain semaphore deadlocks when many
    tasks each hold some and wait for more (64 prefetches holding the OPEN
    slot of their file, each waiting for a READ slot). Here one task at a time
    gathers several units; single units need no turn.
    """

    def __init__(self, total: int) -> None:
        self.total = total
        self._sem = trio.Semaphore(total)
        self._turn = trio.Lock()

    def take(self, n: int = 1) -> _Taken:
        return _Taken(self, min(n, self.total))


class _Taken:
    def __init__(self, pool: Slots, n: int) -> None:
        self.pool, self.n, self.got = pool, n, 0

    async def __aenter__(self) -> None:
        sem = self.pool._sem
        try:
            if self.n == 1:
                await sem.acquire()
                self.got = 1
            else:
                async with self.pool._turn:
                    while self.got < self.n:
                        await sem.acquire()
                        self.got += 1
        except BaseException:
            await self.__aexit__()
            raise

    async def __aexit__(self, *exc: object) -> None:
        for _ in range(self.got):
            self.pool._sem.release()
        self.got = 0

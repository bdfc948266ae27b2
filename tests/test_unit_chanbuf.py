"""ChunkPipe: paramiko's channel buffer contract (BufferedPipe), without the copies."""

import random
import threading
import time

import pytest
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout

from sftpfs.remote.chanbuf import ChunkPipe


@pytest.mark.parametrize("cls", [BufferedPipe, ChunkPipe])
def test_reads_return_the_fed_bytes_in_order_whatever_the_cuts(cls):
    rng = random.Random(4)
    data = rng.randbytes(200_000)
    pipe, fed, got = cls(), 0, bytearray()
    while len(got) < len(data):
        if fed < len(data) and (rng.random() < 0.6 or len(pipe) == 0):
            n = rng.randrange(1, 40_000)
            pipe.feed(data[fed:fed + n])
            fed += len(data[fed:fed + n])
        else:
            before = len(pipe)
            want = rng.choice([1, 7, 4096, before, before + 10, 10**9])
            out = pipe.read(want, timeout=0)
            assert len(out) == min(want, before) and len(pipe) == before - len(out)
            got += out
    assert bytes(got) == data


def test_taking_everything_of_one_packet_is_not_a_copy():
    pipe = ChunkPipe()
    packet = bytes(range(256)) * 100
    pipe.feed(packet)
    assert pipe.read(10**9) is packet


def test_event_follows_whether_data_is_buffered():
    pipe, ev = ChunkPipe(), threading.Event()
    pipe.set_event(ev)
    assert not ev.is_set()
    pipe.feed(b"abc")
    assert ev.is_set() and pipe.read_ready()
    assert pipe.read(2) == b"ab" and ev.is_set()
    assert pipe.read(5) == b"c" and not ev.is_set() and not pipe.read_ready()
    pipe.feed(b"xyz")
    assert pipe.empty() == b"xyz" and not ev.is_set()
    pipe.close()
    assert ev.is_set()


def test_a_read_waits_for_data_or_close_and_times_out():
    pipe = ChunkPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0)
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.05)
    threading.Timer(0.05, pipe.feed, (b"late",)).start()
    assert pipe.read(10, timeout=5) == b"late"
    threading.Timer(0.05, pipe.close).start()
    t0 = time.monotonic()
    assert pipe.read(10) == b""  # closed: end of stream
    assert time.monotonic() - t0 < 5
    pipe2 = ChunkPipe()
    pipe2.feed(b"rest")
    pipe2.close()
    assert pipe2.read(10) == b"rest" and pipe2.read(10) == b""

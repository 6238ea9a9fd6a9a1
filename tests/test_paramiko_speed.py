"""The copy-avoiding channel buffer behaves exactly like paramiko's own BufferedPipe."""

from hypothesis import given, settings
from hypothesis import strategies as st
from paramiko.buffered_pipe import BufferedPipe

from scriptsftp.server.frontends.ssh.paramiko_ext.speed import ChunkPipe

ops = st.lists(
    st.one_of(
        st.tuples(st.just("feed"), st.binary(min_size=0, max_size=300)),
        st.tuples(st.just("read"), st.integers(min_value=1, max_value=700)),
        st.tuples(st.just("empty"), st.none()),
        st.tuples(st.just("len"), st.none()),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(ops)
def test_chunk_pipe_matches_buffered_pipe(sequence):
    original, ours = BufferedPipe(), ChunkPipe()
    for op, arg in sequence:
        if op == "feed":
            original.feed(arg)
            ours.feed(arg)
        elif op == "read":
            if len(original) == 0:
                continue  # would block in both
            assert ours.read(arg, timeout=0) == original.read(arg, timeout=0)
        elif op == "empty":
            assert ours.empty() == original.empty()
        assert len(ours) == len(original)
        assert ours.read_ready() == original.read_ready()
    ours.close()
    original.close()
    assert ours.read(10) == original.read(10)


def test_reads_whole_chunks_without_copy():
    pipe = ChunkPipe()
    chunk = b"x" * 65536
    pipe.feed(chunk)
    assert pipe.read(65536) is chunk


def test_wait_for_input_wakes_on_data_kick_or_close_and_times_out():
    """What the SFTP stream waits on (sftp_stream.SFTPStream._wait_for_input)."""
    import socket
    import threading
    import time

    import pytest

    pipe = ChunkPipe()
    t0 = time.monotonic()
    with pytest.raises(socket.timeout):
        pipe.wait_for_input(lambda: t0 + 0.05)
    assert time.monotonic() - t0 < 5
    pipe.feed(b"abc")
    pipe.wait_for_input(lambda: t0)  # bytes buffered: no wait, even past the deadline
    assert len(pipe) == 3
    pipe.drop()
    assert len(pipe) == 0 and pipe.read_ready() is False
    threading.Timer(0.05, pipe.kick).start()
    pipe.wait_for_input(None)
    assert not pipe.kicked  # the kick is taken by the wait
    threading.Timer(0.05, pipe.close).start()
    pipe.wait_for_input(None)

"""The shortest path a user takes: start the daemon, log in with a key, round-trip a file."""

from conftest import sftp_batch


def test_put_get_roundtrip(daemon, alice_key, tmp_path):
    data = tmp_path / "up.bin"
    data.write_bytes(b"x" * 100_000)
    sftp_batch(daemon, f"put {data} /up.bin\nget /up.bin {tmp_path / 'down.bin'}\n", alice_key, check=True)
    assert (daemon.home("alice") / "up.bin").read_bytes() == data.read_bytes()
    assert (tmp_path / "down.bin").read_bytes() == data.read_bytes()

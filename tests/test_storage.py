"""Storage: the same reads from a local folder and from a real S3 API (a local moto server)."""

import fsspec

from vlpretrain import storage


def test_reads_and_lists_local_and_s3_alike(tmp_path, s3_server):
    bucket = s3_server.bucket()
    (tmp_path / "a.tar").write_bytes(b"x" * 10)
    (tmp_path / "sizes.json").write_text('{"a.tar": 3}')
    with fsspec.open(f"s3://{bucket}/d/a.tar", "wb") as f:
        f.write(b"x" * 10)
    with fsspec.open(f"s3://{bucket}/d/sizes.json", "wb") as f:
        f.write(b'{"a.tar": 3}')
    for folder in (str(tmp_path), f"s3://{bucket}/d"):
        assert storage.list_sizes(folder) == {"a.tar": 10, "sizes.json": 12}
        assert storage.read_bytes(storage.join(folder, "sizes.json")) == b'{"a.tar": 3}'
        assert storage.read_bytes(storage.join(folder, "absent.json")) is None
        with storage.open_stream(storage.join(folder, "a.tar")) as f:
            assert f.read() == b"x" * 10
        assert storage.parent(storage.join(folder, "a.tar")) == folder
    assert storage.list_sizes(f"s3://{bucket}/nothing-here") == {}
    assert storage.is_remote("s3://b/x") and storage.is_remote("pipe:cat x") and not storage.is_remote("file:/x")

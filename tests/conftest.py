"""Shared fixtures: quiet, single-threaded torch and the CPU DeepSpeed accelerator for every test."""

import os

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser("~/.cache/vlpretrain/torch_extensions"))

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


class S3Server:
    """A real S3 API on 127.0.0.1 (moto's server mode), for object-storage tests: `env` holds the variables a
    process needs to reach it (botocore and s3fs read AWS_ENDPOINT_URL), `bucket()` makes a fresh bucket."""

    def __init__(self) -> None:
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        self._server.start()
        host, port = self._server.get_host_and_port()
        self.endpoint = f"http://{host}:{port}"
        self.env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                    "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": self.endpoint}
        self._made = 0

    def bucket(self) -> str:
        import boto3

        self._made += 1
        name = f"bucket-{self._made}"
        boto3.client("s3", endpoint_url=self.endpoint, **_aws_kwargs(self.env)).create_bucket(Bucket=name)
        return name

    def stop(self) -> None:
        self._server.stop()


def _aws_kwargs(env: dict[str, str]) -> dict[str, str]:
    return {"aws_access_key_id": env["AWS_ACCESS_KEY_ID"], "aws_secret_access_key": env["AWS_SECRET_ACCESS_KEY"],
            "region_name": env["AWS_DEFAULT_REGION"]}


@pytest.fixture(scope="session")
def s3_server():
    """One local S3 server for the whole session, its variables set in this process (and so in subprocesses
    started with a copy of os.environ); stopped at the end."""
    server = S3Server()
    saved = {k: os.environ.get(k) for k in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture
def tmpfs():
    """`tmpfs(folder, size)` mounts a small RAM file system there (a disk that fills up), unmounted at the end;
    the test is skipped where mounting is not permitted. Returns a `resize(size)` callable (space freed)."""
    import subprocess

    mounted = []

    def mount(folder, size: str):
        folder.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip()[:200]}")
        mounted.append(folder)

        def resize(new_size: str) -> None:
            subprocess.run(["mount", "-o", f"remount,size={new_size}", str(folder)], check=True)
        return resize

    try:
        yield mount
    finally:
        for folder in mounted:
            subprocess.run(["umount", "-l", str(folder)], capture_output=True)

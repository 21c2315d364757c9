"""Fault injection: each test reproduces a defect a user hit (issue #11) and pins the fix.

Runs go through tests/train_synthetic.py or the console scripts in subprocesses, as a user would run them; every
refusal must be one line on stderr, exit status 2, no traceback, and leave nothing half done.
"""

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from helpers import REPO, SCRIPT, free_port, subprocess_env, write_folder_tree, write_wds

from vlpretrain.config import ModelConfig
from vlpretrain.engine.checkpoint import safe_torch_load
from vlpretrain.errors import CheckpointError
from vlpretrain.models import build_model, export_model, load_model

ENV = subprocess_env()


def train(out: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), str(out), *args], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def trained(out: Path, *args: str) -> subprocess.CompletedProcess:
    """`train`, which must succeed: a failure shows the run's last error lines, not a truncated repr."""
    r = train(out, *args)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def cli(*args: str, module: str = "vlpretrain.cli") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", module, *args], env=ENV, capture_output=True, text=True,
                          timeout=600, cwd=REPO)


def one_line_error(r: subprocess.CompletedProcess) -> str:
    """The refusal's message, after checking its form: exit 2, no traceback, one `error:` line."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert "Traceback" not in r.stderr, r.stderr[-2000:]
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, r.stderr[-2000:]
    return lines[0]


def checkpoints(out: Path) -> list[str]:
    return sorted(p.name for p in (out / "checkpoints").glob("step_*"))


class Boom:
    """Unpickling this runs a command: what a crafted checkpoint file would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ---- 1. a reused run folder ------------------------------------------------------------------------------------

def test_fresh_run_in_a_used_folder_is_refused_then_overwritten(tmp_path):
    out = tmp_path / "run"
    trained(out, "train.steps=4", "train.save_every=2")
    assert checkpoints(out) == ["step_00000002", "step_00000004"]
    msg = one_line_error(train(out, "train.steps=2"))
    assert "--resume latest" in msg and "--overwrite" in msg and "step_00000004" in msg
    assert checkpoints(out) == ["step_00000002", "step_00000004"]  # nothing touched
    r = subprocess.run([sys.executable, "-c", (
        "import sys; from vlpretrain.config import load_config; from vlpretrain.data import EpochBatches; "
        "from vlpretrain.trainer import train; import torch\n"
        "def epoch(e, b):\n"
        "    for i in range(b, 3):\n"
        "        g = torch.Generator().manual_seed(e * 10 + i)\n"
        "        yield torch.randn(4, 3, 28, 28, generator=g), torch.randint(1, 4000, (4, 16), generator=g)\n"
        f"cfg = load_config(None, ['data.train=x', 'train.output_dir={out}', 'train.steps=2', 'train.warmup_steps=1',"
        " 'train.progress=false', 'data.batch_size=4', 'train.log_every=1'])\n"
        "train(cfg, data=EpochBatches(epoch), overwrite=True)")], env=ENV, capture_output=True, text=True,
        timeout=600, cwd=REPO)
    assert r.returncode == 0, r.stderr[-2000:]
    assert checkpoints(out) == ["step_00000002"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000002"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == [1, 2]  # the old run's rows are gone


@pytest.mark.slow
def test_two_runs_started_together_into_one_folder(tmp_path):
    """A double submit: both start at once; whichever takes the folder's lock trains, the other stops in one line
    naming it, before touching the folder; so does every rank of a two-process run resumed into it meanwhile. The
    winner holds its first batch until the others have exited, so they always meet a held lock, never a finished
    run."""
    out, go = tmp_path / "run", tmp_path / "go"
    procs = {steps: subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--hold-until", str(go),
                                      f"train.steps={steps}", "train.save_every=1", "train.keep_last=5",
                                      "train.warmup_steps=1"],
                                     env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for steps in (2, 3)}
    give_up = time.monotonic() + 300  # a bound, not a check: without a lock both would wait here forever
    while all(p.poll() is None for p in procs.values()) and time.monotonic() < give_up:
        time.sleep(0.2)
    # ranks of one run share the refusal: rank 0 asks for the lock and tells rank 1; --resume asks too
    pair = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           f"--master_port={free_port()}", str(SCRIPT), str(out), "train.steps=4", "--resume",
                           "latest"],
                          env=ENV, cwd=REPO, capture_output=True, text=True, timeout=600)
    go.touch()
    results = {steps: (p, *p.communicate(timeout=600)) for steps, p in procs.items()}
    (lost, (loser, _, err)), = [(s, r) for s, r in results.items() if r[0].returncode != 0]
    (won, (winner, _, werr)), = [(s, r) for s, r in results.items() if r[0].returncode == 0]
    msg = one_line_error(subprocess.CompletedProcess(loser.args, loser.returncode, "", err))
    assert f"another run is using this folder (host {socket.gethostname()}, pid {winner.pid}, started " in msg
    assert pair.returncode != 0
    assert [line for line in pair.stderr.splitlines() if line.startswith("error:")] == [msg] * 2, pair.stderr[-3000:]
    assert "2 processes (torchrun), master 127.0.0.1:" in pair.stdout
    # only the winner's files: its config, one metrics row per step, its checkpoints, its summary
    assert yaml.safe_load((out / "config.yaml").read_text())["train"]["steps"] == won
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows if "loss" in row] == list(range(1, won + 1))
    assert checkpoints(out) == [f"step_{s:08d}" for s in range(1, won + 1)]
    assert [p.name for p in out.glob("summary_rank*.json")] == ["summary_rank0.json"]
    assert json.loads((out / "summary_rank0.json").read_text())["steps"] == won
    assert (out / ".vlpretrain.lock").read_text() == ""  # released at the end, its record cleared


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    out = tmp_path / "run"
    trained(out, "train.steps=6", "train.save_every=2", "train.keep_last=1")
    assert checkpoints(out) == ["step_00000006"]
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_00000006"


# ---- 2. checkpoints never run code -----------------------------------------------------------------------------

def test_crafted_checkpoint_is_refused_on_resume_export_and_upcycle(tmp_path):
    out = tmp_path / "run"
    trained(out, "train.steps=2")
    ckpt = out / "checkpoints" / "step_00000002"
    marker = tmp_path / "pwned"
    state = ckpt / "mp_rank_00_model_states.pt"
    torch.save({"module": Boom(marker)}, state)

    msg = one_line_error(train(out, "train.steps=4", "--resume", "latest"))
    assert str(state) in msg and "refusing" in msg
    assert not marker.exists()

    (ckpt / "model.safetensors").unlink()  # export must not fall back to unpickling DeepSpeed's state
    msg = one_line_error(cli("export", str(ckpt), str(tmp_path / "x.safetensors")))
    assert str(ckpt) in msg and not marker.exists()

    msg = one_line_error(cli("upcycle", "--from", str(state), "--config", str(REPO / "configs" / "demo-moe.yaml"),
                             "--out", str(tmp_path / "moe.safetensors"), "--arch", "tiny-vit"))
    assert str(state) in msg and not marker.exists()
    with pytest.raises(CheckpointError, match="refusing"):
        safe_torch_load(state)
    assert not marker.exists()


def test_truncated_state_file_names_it(tmp_path):
    out = tmp_path / "run"
    trained(out, "train.steps=2")
    state = out / "checkpoints" / "step_00000002" / "mp_rank_00_model_states.pt"
    state.write_bytes(state.read_bytes()[:1000])
    msg = one_line_error(train(out, "train.steps=4", "--resume", "latest"))
    assert str(state) in msg and "truncated or corrupt" in msg


def test_resume_with_another_architecture_is_one_line(tmp_path):
    out = tmp_path / "run"
    trained(out, "train.steps=2")
    msg = one_line_error(train(out, "train.steps=4", "model.moe.num_experts=2", "model.moe.top_k=1",
                               "model.moe.normalize_weights=false", "--resume", "latest"))
    assert "step_00000002" in msg


# ---- 5. evaluation data is found before training ---------------------------------------------------------------

def test_missing_eval_data_fails_before_the_first_step(tmp_path):
    out = tmp_path / "run"
    (tmp_path / "bench").mkdir()
    msg = one_line_error(train(out, "train.steps=2", "eval.benchmarks=[cifar10]", f"eval.root={tmp_path / 'bench'}"))
    assert "cifar10" in msg or "cifar-10" in msg
    assert not (out / "checkpoints").exists() and not (out / "metrics.jsonl").exists()


# ---- 6. one line instead of a traceback ------------------------------------------------------------------------

def test_unwritable_output_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    msg = one_line_error(train(blocker / "run", "train.steps=2"))
    assert "train.output_dir" in msg


def test_unwritable_out_fails_before_the_work(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    write_wds(tmp_path / "mnist", [str(i) for i in range(10)], [i % 10 for i in range(4)], shards=1, ext="png")
    msg = one_line_error(cli("eval", "--model", "tiny-vit", "--benchmark", "mnist", "--root", str(tmp_path / "mnist"),
                             "--out", str(blocker / "results.json"), module="zeroshot.cli"))
    assert msg.startswith(f"error: --out {blocker / 'results.json'}: cannot write there")
    model = tmp_path / "m.safetensors"
    export_model(build_model("tiny-vit"), ModelConfig(name="tiny-vit"), model)
    msg = one_line_error(cli("export", str(model), str(blocker / "out.safetensors")))
    assert "cannot write there" in msg


def test_zeroshot_eval_on_a_truncated_safetensors(tmp_path):
    model = tmp_path / "m.safetensors"
    export_model(build_model("tiny-vit"), ModelConfig(name="tiny-vit"), model)
    model.write_bytes(model.read_bytes()[:5000])
    write_wds(tmp_path / "mnist", [str(i) for i in range(10)], [i % 10 for i in range(4)], shards=1, ext="png")
    msg = one_line_error(cli("eval", "--model", str(model), "--benchmark", "mnist", "--root", str(tmp_path / "mnist"),
                             module="zeroshot.cli"))
    assert str(model) in msg and "truncated" in msg


@pytest.mark.parametrize("key, value", [("model_config", '{"name": "tiny-vit",'), ("architecture", "[1, 2]"),
                                        ("architecture", "{not json")])
def test_export_with_corrupt_config_metadata_is_one_line(tmp_path, capsys, key, value):
    """An export whose metadata JSON (written by `export_model`) is damaged is named in one line by `zeroshot eval`
    and `vlpretrain export`, where json.loads raised a traceback (#23.6)."""
    from safetensors.torch import save_file

    from vlpretrain.cli import main as vlpretrain_main
    from zeroshot.cli import main as zeroshot_main

    model = tmp_path / "m.safetensors"
    meta = {"format": "vlpretrain", "model_config": json.dumps({"name": "tiny.json"}), key: value}
    save_file({"logit_scale": torch.zeros(())}, str(model), metadata=meta)
    write_wds(tmp_path / "mnist", [str(i) for i in range(10)], [i % 10 for i in range(4)], shards=1, ext="png")
    for run in (lambda: zeroshot_main(["eval", "--model", str(model), "--benchmark", "mnist", "--root",
                                       str(tmp_path / "mnist")]),
                lambda: vlpretrain_main(["export", str(model), str(tmp_path / "out.safetensors")])):
        assert run() == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {model}: its {key} metadata is not"), err


@pytest.mark.parametrize("bad", ["corrupt", "bomb"])
def test_unreadable_image_in_an_eval_set_with_a_worker_is_one_line(tmp_path, bad):
    from zeroshot.datasets import get_benchmark

    folders = [get_benchmark("imagenetv2").folders[i] for i in (0, 1)]
    write_folder_tree(tmp_path / "v2", folders, per_class=2)
    victim = sorted((tmp_path / "v2" / folders[1]).iterdir())[0]
    if bad == "corrupt":
        victim.write_bytes(b"\xff\xd8\xff not really a jpeg")
    else:  # a tiny file that claims 40000 x 40000 pixels: PIL refuses it as a decompression bomb
        from PIL import Image

        Image.new("1", (40000, 40000)).save(victim, format="PNG")
    (tmp_path / "one.txt").write_text("a photo of a {c}.\n")  # a 1,000-class head of 1 template, not 80: 20 s less
    r = cli("eval", "--model", "tiny-vit", "--benchmark", "imagenetv2", "--root", str(tmp_path / "v2"),
            "--templates", str(tmp_path / "one.txt"), "--workers", "1", "--batch-size", "2", "--no-progress",
            module="zeroshot.cli")
    msg = one_line_error(r)
    assert str(victim) in msg and "Original Traceback" not in r.stderr


def test_csv_with_a_bom_is_read_and_latin1_is_named(tmp_path):
    from PIL import Image

    from vlpretrain.data import write_shards

    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "bom.csv").write_bytes("\ufeffimage,caption\na.png,café noir\n".encode("utf-8"))
    m = write_shards(tmp_path / "bom.csv", tmp_path / "out", image_root=tmp_path, progress=False)
    assert m["samples"] == 1
    (tmp_path / "latin.csv").write_bytes("image,caption\na.png,café noir\n".encode("latin-1"))
    msg = one_line_error(cli("make-shards", str(tmp_path / "latin.csv"), str(tmp_path / "out2"), "--image-root",
                             str(tmp_path)))
    assert "latin.csv:2: not UTF-8" in msg


def test_model_naming_a_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_model(str(tmp_path / "gone.safetensors"))


def test_unknown_architecture_names_the_ways_to_add_one():
    from vlpretrain.errors import ConfigError

    with pytest.raises(ConfigError, match=r"VLPRETRAIN_MODEL_CONFIGS.*") as e:
        build_model("no-such-arch")
    assert "arch.json" in str(e.value)


# ---- 7. values are range-checked, naming the key and where it came from -------------------------------------

@pytest.mark.parametrize("override, key", [
    ("train.steps=0", "train.steps"), ("train.lr=-0.001", "train.lr"), ("train.grad_accum=0", "train.grad_accum"),
    ("train.log_every=0", "train.log_every"), ("train.betas=[0.9]", "train.betas"),
    ("data.crop_scale=[1.5,0.1]", "data.crop_scale"), ("eval.batch_size=0", "eval.batch_size"),
    ("data.batch_size=0", "data.batch_size"), ("train.warmup_steps=2000", "train.warmup_steps"),
])
def test_out_of_range_values(override, key):
    msg = one_line_error(cli("info", "--config", str(REPO / "configs" / "demo.yaml"), "--set", override, "--no-model"))
    assert msg.startswith(f"error: --set {override}: {key}:"), msg


def test_range_error_from_the_file_names_the_file(tmp_path):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("data: {train: a.tar}\ntrain: {steps: 0}\n")
    msg = one_line_error(cli("info", "--config", str(cfg), "--no-model"))
    assert msg.startswith(f"error: {cfg}: train.steps: must be >= 1"), msg


def test_malformed_override_and_suggestions():
    demo = str(REPO / "configs" / "demo.yaml")
    assert "not valid YAML" in one_line_error(cli("info", "--config", demo, "--set", "train.steps=[1,", "--no-model"))
    assert "did you mean train.steps" in one_line_error(cli("info", "--config", demo, "--set", "train.stepz=3",
                                                            "--no-model"))
    from vlpretrain.errors import ConfigError
    from zeroshot import get_benchmark

    with pytest.raises(ConfigError, match="did you mean 'cifar10'"):
        get_benchmark("cifar01")


# ---- 8. resume bookkeeping --------------------------------------------------------------------------------------

def test_resume_keeps_one_row_per_step_and_refuses_meaningless_overrides(tmp_path):
    out = tmp_path / "run"
    r = subprocess.Popen([sys.executable, str(SCRIPT), str(out), "--slow", "0.3", "train.steps=40",
                          "train.save_every=3", "train.warmup_steps=2"], env=ENV, cwd=REPO,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = 300
    import time

    start = time.time()
    while time.time() - start < deadline and len(checkpoints(out)) < 2:
        time.sleep(0.5)
    time.sleep(1.5)  # some steps beyond the checkpoint are logged, then lost
    r.kill()
    r.wait()
    done = checkpoints(out)
    assert done, "no checkpoint was written"
    msg = one_line_error(train(out, "train.steps=12", "train.lr=0.01", "--resume", "latest"))
    assert "train.lr" in msg and "checkpoint" in msg
    res = train(out, "train.steps=12", "--resume", "latest")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "resumed from" in res.stdout and "at step" in res.stdout and "train.steps 40 -> 12" in res.stdout
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [row["step"] for row in rows if "loss" in row]
    assert steps == list(range(1, 13))


# ---- 9. exports are self-contained ------------------------------------------------------------------------------

def test_export_of_a_json_architecture_loads_after_the_json_moves(tmp_path):
    arch = tmp_path / "mine" / "my-arch.json"
    arch.parent.mkdir()
    shutil.copy(REPO / "configs" / "models" / "tiny-vit.json", arch)
    cfg = ModelConfig(name=str(arch))
    model = build_model(cfg).eval()
    out = export_model(model, cfg, tmp_path / "m.safetensors")
    shutil.rmtree(arch.parent)
    again = load_model(str(out)).eval()
    images = torch.randn(2, 3, 28, 28, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(again.encode_image(images), model.encode_image(images))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the crafted file is a plain pickle, on purpose
def test_safe_load_allows_exactly_plain_state(tmp_path):
    ok = tmp_path / "ok.pt"
    torch.save({"module": {"w": torch.ones(2)}, "global_steps": 3, "ds_version": "x"}, ok)
    assert safe_torch_load(ok)["global_steps"] == 3
    bad = tmp_path / "bad.pt"
    with open(bad, "wb") as f:
        pickle.dump({"x": Boom(tmp_path / "marker")}, f)
    with pytest.raises(CheckpointError):
        safe_torch_load(bad)
    assert not (tmp_path / "marker").exists()


# ---- 3. make-shards is all or nothing ---------------------------------------------------------------------------

def _photos(folder: Path, n: int, shade: int = 0) -> Path:
    from PIL import Image

    folder.mkdir(parents=True)
    for i in range(n):
        Image.new("RGB", (16, 16), (i % 256, shade, 7)).save(folder / f"{i:05d}.png")
        (folder / f"{i:05d}.txt").write_text(f"photo {i}")
    return folder


def test_interrupted_make_shards_leaves_the_previous_dataset_whole(tmp_path):
    import signal
    import time

    src = _photos(tmp_path / "src", 3000)
    out = tmp_path / "out"
    first = cli("make-shards", str(src), str(out), "--format", "folder", "--shard-size", "100", "--no-progress")
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p.name: p.read_bytes() for p in out.glob("*.tar")}
    manifest = (out / "_manifest.json").read_text()
    p = subprocess.Popen([sys.executable, "-m", "vlpretrain.cli", "make-shards", str(src), str(out), "--format",
                          "folder", "--shard-size", "10", "--seed", "1", "--workers", "2", "--no-progress"],
                         env=ENV, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    staging = out / ".make-shards-incomplete"
    start = time.time()
    while time.time() - start < 120 and len(list(staging.glob("*.tar"))) < 3:
        time.sleep(0.01)
    assert len(list(staging.glob("*.tar"))) >= 3, "the second run ended before it could be interrupted"
    p.send_signal(signal.SIGTERM)
    _, err = p.communicate(timeout=120)
    assert p.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines() == ["interrupted"], err
    assert not staging.exists() and not list(out.rglob("*.tmp"))
    assert {q.name: q.read_bytes() for q in out.glob("*.tar")} == before  # 30 old shards, none new
    assert (out / "_manifest.json").read_text() == manifest


def test_another_dataset_in_the_folder_is_refused_unless_replaced(tmp_path):
    out = tmp_path / "out"
    assert cli("make-shards", str(_photos(tmp_path / "a", 20)), str(out), "--format", "folder",
               "--no-progress").returncode == 0
    b = _photos(tmp_path / "b", 30, shade=200)
    msg = one_line_error(cli("make-shards", str(b), str(out), "--format", "folder", "--no-progress"))
    assert str(out) in msg and "--overwrite" in msg
    r = cli("make-shards", str(b), str(out), "--format", "folder", "--no-progress", "--overwrite")
    assert r.returncode == 0 and json.loads((out / "_manifest.json").read_text())["samples"] == 30


def test_overwrite_removes_only_the_shards_the_previous_manifest_lists(tmp_path, caplog):
    """`--overwrite` (replace=True) deletes the previous dataset's listed shards, keeps tar files no manifest lists and
    says so in one line; it deleted every *.tar of OUTDIR (#23.9b)."""
    from vlpretrain.data import write_shards

    out = tmp_path / "out"
    write_shards(_photos(tmp_path / "a", 20), out, "folder", shard_size=10, progress=False)
    (out / "notes.tar").write_bytes(b"not ours")
    write_shards(_photos(tmp_path / "b", 5, shade=200), out, "folder", shard_size=10, replace=True, progress=False)
    assert sorted(p.name for p in out.glob("*.tar")) == ["notes.tar", "shard-000000.tar"]
    assert (out / "notes.tar").read_bytes() == b"not ours"
    assert [r.getMessage() for r in caplog.records if "left in place" in r.getMessage()] == [
        f"{out}: left in place 1 tar file(s) no previous manifest listed (notes.tar); the loader refuses tar files "
        "_manifest.json does not list, so move them out of this folder"]


def test_make_shards_into_a_file_is_one_line(tmp_path, capsys):
    """OUTDIR naming an existing file (e.g. the source typed twice), or a folder under a file, is refused in one line
    before anything is read, where mkdir raised FileExistsError (#23.7)."""
    from vlpretrain.cli import main

    src = tmp_path / "src.csv"
    src.write_text("image,caption\n")
    for out in (src, src / "shards"):
        assert main(["make-shards", str(src), str(out), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: {out}: "), err
    assert src.read_text() == "image,caption\n"


def test_the_loader_refuses_shards_the_manifest_does_not_list(tmp_path):
    from vlpretrain.config import DataConfig
    from vlpretrain.data import build_loader, write_shards
    from vlpretrain.errors import DataError

    write_shards(_photos(tmp_path / "a", 20), tmp_path / "out", "folder", shard_size=10, progress=False)
    write_shards(_photos(tmp_path / "b", 10), tmp_path / "other", "folder", prefix="extra", progress=False)
    shutil.copy(tmp_path / "other" / "extra-000000.tar", tmp_path / "out")
    cfg = DataConfig(train=str(tmp_path / "out" / "*.tar"), batch_size=2, workers=0)
    with pytest.raises(DataError, match="extra-000000.tar: not listed in"):
        build_loader(cfg, lambda im: torch.zeros(3), lambda caps: torch.zeros(len(caps), 2), rank=0, world_size=1)


# ---- 4. truncated shards lose no sample uncounted -------------------------------------------------------------

@pytest.mark.parametrize("cut", ["half", "member boundary"])
def test_a_truncated_shard_counts_every_lost_sample(tmp_path, cut):
    import tarfile

    from vlpretrain.config import DataConfig
    from vlpretrain.data import build_loader, write_shards

    write_shards(_photos(tmp_path / "a", 100), tmp_path / "out", "folder", shard_size=50, progress=False)
    shard = tmp_path / "out" / "shard-000000.tar"
    data = shard.read_bytes()
    if cut == "half":
        keep = len(data) // 2
    else:  # just before the 21st sample's first header: the archive reads as 20 whole samples, then ends cleanly
        with tarfile.open(shard) as tar:
            members = tar.getmembers()
            keep = next(m.offset for m in members if m.name.startswith(f"{20:09d}."))
    shard.write_bytes(data[:keep])
    from vlpretrain.data import shard_sample_counts, stages
    from vlpretrain.data.stats import WorkerStats
    from vlpretrain.errors import DataError

    # the manifest's count stays the expected one, so every sample the cut took is counted as skipped
    expected = shard_sample_counts([str(shard)])[0]
    assert expected == 50
    stats = WorkerStats()
    read = sum(1 for _ in stages.read_shards([(str(shard), 0)], stats, {str(shard): expected}))
    lost = sum(n for _, reason, n in stats.take()["skipped"] if reason == "truncated tar")
    assert read + lost == 50 and lost >= 20
    if cut == "member boundary":
        assert read == 20
    # and the error budget sees them: 100 samples expected, 20 or more lost is over 10%
    cfg = DataConfig(train=str(tmp_path / "out" / "shard-{000000..000001}.tar"), batch_size=10, workers=0,
                     shuffle_buffer=0, error_budget=0.1)
    loader = build_loader(cfg, lambda im: torch.zeros(3), lambda caps: torch.zeros(len(caps), 2, dtype=torch.long),
                          rank=0, world_size=1)
    with pytest.raises(DataError, match="over data.error_budget.*shard-000000.tar"):
        for _ in loader:
            pass


def test_a_non_tar_file_named_tar_is_named_as_such(tmp_path):
    from vlpretrain.config import DataConfig
    from vlpretrain.data import build_loader
    from vlpretrain.errors import DataError

    (tmp_path / "fake.tar").write_bytes(b"PK\x03\x04 this is a zip file, not a tar" * 40)
    cfg = DataConfig(train=str(tmp_path / "fake.tar"), batch_size=2, workers=0)
    with pytest.raises(DataError, match="fake.tar: not a tar file"):
        build_loader(cfg, lambda im: torch.zeros(3), lambda caps: torch.zeros(len(caps), 2), rank=0, world_size=1)

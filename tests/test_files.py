"""tc2.files: temporaries of killed writers are cleaned up by the next write; write errors name the file."""
import errno
import os
import signal
import subprocess
import sys

import numpy as np
import pytest

import tc2
from tc2 import files
from tc2.checkpoint.hf import load_hf, save_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOST = files.partial_name("x")[len("x.partial-"):].rsplit("-", 1)[0]       # this machine's tag
KILLED_WRITER = """
import os, signal, sys
from tc2.files import StagedDir, atomic_file
stage = StagedDir(sys.argv[1])
with open(stage.file("model.safetensors"), "wb") as f:
    f.write(b"half a checkpoint")
with open(stage.file("rank_0/model.safetensors"), "wb") as f:
    f.write(b"half a shard")
with atomic_file(os.path.join(sys.argv[1], "metrics.jsonl")) as tmp:
    open(tmp, "w").write("half a line")
    print(os.getpid(), flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def _killed_writer(directory):
    out = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(directory)], capture_output=True, text=True,
                         env={**os.environ, "PYTHONPATH": ROOT, "GLOG_v": "3"}, timeout=120)
    assert out.returncode == -signal.SIGKILL, out.stderr[-2000:]
    return int(out.stdout.split()[0])


def test_temporaries_of_a_killed_writer_are_removed_by_the_next_write(tmp_path):
    dest = tmp_path / "ckpt"
    pid = _killed_writer(dest)
    left = sorted(str(p.relative_to(dest)) for p in dest.rglob("*") if p.is_file())
    assert left == sorted(f"{f}.partial-{HOST}-{pid}" for f in
                          ("metrics.jsonl", "model.safetensors", "rank_0/model.safetensors"))
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = dest / f"model.safetensors.partial-{HOST}-{sleeper.pid}"     # a concurrent writer
        live.write_bytes(b"in progress")
        remote = dest / f"model.safetensors.partial-otherhost-{pid}"               # on a shared filesystem
        remote.write_bytes(b"another machine's")
        old = dest / f"config.json.partial-{pid}"                                  # the older naming
        old.write_bytes(b"{")
        cfg = tc2.tiny()
        params = tc2.init_params(cfg, seed=0)
        save_hf(params, cfg, str(dest))
        names = sorted(os.listdir(dest))
        assert names == sorted(["config.json", "model.safetensors", "rank_0", live.name, remote.name])
        assert os.listdir(dest / "rank_0") == [f"model.safetensors.partial-{HOST}-{pid}"]  # not written to
        assert load_hf(str(dest))[1] == cfg
        files.write_atomic(str(dest / "rank_0" / "notes.txt"), "x")
        assert os.listdir(dest / "rank_0") == ["notes.txt"]
    finally:
        sleeper.kill()
        sleeper.wait()


def test_remove_stale_partials_keeps_everything_else(tmp_path):
    dead = _killed_writer(tmp_path / "w")
    for name in ("model.safetensors", "model.safetensors.partial-x", f"notes.partial-{HOST}-{os.getpid()}",
                 f"a.partial-{HOST}-{dead}.bak"):
        (tmp_path / "w" / name).write_bytes(b"keep")
    os.mkdir(tmp_path / "w" / f"d.partial-{HOST}-{dead}")
    removed = files.remove_stale_partials(str(tmp_path / "w"))
    assert sorted(removed) == sorted([f"model.safetensors.partial-{HOST}-{dead}",
                                      f"metrics.jsonl.partial-{HOST}-{dead}"])
    assert files.remove_stale_partials(str(tmp_path / "missing")) == []


def test_partial_names_map_back_to_their_destination(tmp_path):
    tmp = files.partial_name(str(tmp_path / "model-00001-of-00002.safetensors"))
    assert files.destination_of(tmp) == str(tmp_path / "model-00001-of-00002.safetensors")
    assert files.destination_of(str(tmp_path / "plain.json")) == str(tmp_path / "plain.json")
    with pytest.raises(OSError) as e:
        with files.naming_write_errors(tmp):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert e.value.errno == errno.ENOSPC and e.value.filename == str(tmp_path / "model-00001-of-00002.safetensors")
    with pytest.raises(PermissionError, match="plain.json"):
        with files.naming_write_errors(str(tmp_path / "x")):
            raise PermissionError(errno.EACCES, "Permission denied", files.partial_name(str(tmp_path / "plain.json")))
    with pytest.raises(OSError, match="^disk went away$"):            # not an errno error: left as it is
        with files.naming_write_errors(tmp):
            raise OSError("disk went away")


def test_failed_atomic_write_removes_the_directories_it_made(tmp_path, monkeypatch):
    real_open = open

    def full(path, mode="r", *a, **k):
        if "w" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_open(path, mode, *a, **k)
    monkeypatch.setattr(files, "open", full, raising=False)
    with pytest.raises(OSError, match=r"No space left on device: '.*a/b/c\.json'"):
        files.write_json_atomic(str(tmp_path / "a" / "b" / "c.json"), {"x": np.int32(1).item()})
    assert os.listdir(tmp_path) == []

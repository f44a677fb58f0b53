"""One process per run folder (issue 24, item 1): ``recallk train`` holds an exclusive lock on ``runs/<name>`` for
the whole run (``recallk.run_folder.RunLock``: ``flock`` on ``runs/<name>/.lock``). A second ``recallk train`` of
the same run (``--resume``, ``--overwrite`` or a fresh start) exits at once with exit code 2 and one line naming
the holder's pid, host and start time, having changed no file; the OS releases the lock when its holder dies, so a
killed run leaves no stale lock.

Two real processes: the run (or a helper holding ``RunLock``) is a child process; the second command runs here.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from recallk.cli.main import main
from recallk.run_folder import RunFolder, RunFolderBusyError, RunLock
from tests.helpers.image_folders import write_image_folder
from tests.helpers.runs import tiny_overrides

pytestmark = pytest.mark.skipif(not hasattr(os, "fork") or sys.platform == "win32", reason="fcntl.flock: POSIX")

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
#: a tiny run on the CPU (a small ResNet on 32-pixel images), three short epochs
TINY = tiny_overrides("folder", "train.tensorboard=false", "train.epochs=3", "train.max_steps_per_epoch=2")


def _image_folder(root: Path) -> Path:
    """``root/{train,test}/<class>/<i>.png``: 8 training and 4 test classes of 8 noisy copies of a colour pattern."""
    return write_image_folder(root, {"train": range(8), "test": range(8, 12)}, per_class=8)


def _snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    for pipe in (proc.stdin, proc.stdout, proc.stderr):
        if pipe is not None:
            pipe.close()


def test_a_second_train_of_a_running_run_exits_at_once_and_touches_nothing(tmp_path, capsys):
    data = _image_folder(tmp_path / "data")
    runs = tmp_path / "runs"
    args = ["--name", "r", f"runs_dir={runs}", f"data.root={data}", *TINY]
    log = tmp_path / "first-run.txt"
    with log.open("w") as out:
        run = subprocess.Popen([sys.executable, "-m", "recallk", "train", *args], env=ENV, stdout=out, stderr=out)
    folder = RunFolder(runs / "r")
    try:
        deadline = time.time() + 240
        while not folder.last_pt.is_file():  # epoch 1 done: --resume has a checkpoint to continue from
            assert run.poll() is None, f"the first run ended early: {log.read_text()[-3000:]}"
            assert time.time() < deadline, "the first run saved no last.pt in time"
            time.sleep(0.05)
        os.kill(run.pid, signal.SIGSTOP)  # frozen mid-run, holding its lock: the files cannot change under us
        before = _snapshot(folder.root)
        assert ".lock" in before
        for flags in (["--resume"], ["--overwrite"], []):
            capsys.readouterr()
            started = time.perf_counter()
            code = main(["train", *flags, *args])
            elapsed = time.perf_counter() - started
            err = capsys.readouterr().err
            assert code == 2, (flags, err)
            assert elapsed < 30, f"{flags}: {elapsed:.1f} s to give up"  # no waiting for the lock (imports only)
            lines = err.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith("recallk train: error: run folder "), err
            assert f"pid {run.pid} on host {socket.gethostname()}, started 20" in lines[0], err
            assert ": python -m recallk train --name r " in lines[0], err  # the holder's command line
            assert "wait for it to end, or stop that process" in lines[0]
            assert _snapshot(folder.root) == before, f"{flags} changed the run folder"
        os.kill(run.pid, signal.SIGKILL)  # a crash: no release, no cleanup
        run.wait()
        # the dead holder's lock went with it: the run resumes
        assert main(["train", "--resume", *args]) == 0
        assert not folder.lock.exists()  # a run that ends removes its lock file
        assert '"outcome": "finished"' in folder.run_json.read_text()
    finally:
        if run.poll() is None:
            os.kill(run.pid, signal.SIGCONT)
        _kill(run)


_HOLDER = """
import sys
from recallk.run_folder import RunLock
with RunLock(sys.argv[1]):
    print("held", flush=True)
    sys.stdin.read()  # until the test closes the pipe (or kills this process)
"""


def _holder(run_dir: Path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(run_dir)], env=ENV, stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline() == "held\n"
    return proc


def test_a_lock_holder_killed_with_sigkill_leaves_no_stale_lock(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunFolderBusyError, match=f"pid {holder.pid} on host "):
            RunLock(run_dir).acquire()
        os.kill(holder.pid, signal.SIGKILL)
        holder.communicate()
        assert RunFolder(run_dir).lock.exists()  # the file stays (no cleanup ran), the lock does not
        with RunLock(run_dir):
            assert f'"pid": {os.getpid()}' in RunFolder(run_dir).lock.read_text()  # the new holder's record
    finally:
        _kill(holder)
    assert not RunFolder(run_dir).lock.exists()


def test_the_lock_is_free_again_after_its_holder_releases_it(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    holder = _holder(run_dir)
    try:
        with pytest.raises(RunFolderBusyError):
            RunLock(run_dir).acquire()
        holder.stdin.close()  # the holder leaves its with block: release, file removed
        assert holder.wait(timeout=60) == 0
    finally:
        _kill(holder)
    assert not RunFolder(run_dir).lock.exists()
    lock = RunLock(run_dir)
    lock.acquire()
    try:
        assert RunFolder(run_dir).lock.exists()
    finally:
        lock.release()


def test_overwrite_clears_the_folder_but_keeps_the_lock_it_holds(tmp_path):
    """``--overwrite`` runs under the lock: it deletes everything but the lock file, so no third process can take a
    new lock on a new file while this one still runs."""
    from recallk.cli.commands import prepare_run_dir

    run_dir = tmp_path / "runs" / "r"
    with RunLock(run_dir):
        inode = RunFolder(run_dir).lock.stat().st_ino
        (run_dir / "checkpoints").mkdir()
        (run_dir / "checkpoints" / "last.pt").write_bytes(b"old")
        (run_dir / "metrics.jsonl").write_text("{}\n")
        prepare_run_dir(run_dir, resume=False, overwrite=True)
        assert [p.name for p in run_dir.iterdir()] == [".lock"]
        assert RunFolder(run_dir).lock.stat().st_ino == inode
        probe = subprocess.run([sys.executable, "-c", "import sys; from recallk.run_folder import RunLock; "
                                "RunLock(sys.argv[1]).acquire()", str(run_dir)], env=ENV, capture_output=True,
                               text=True)
        assert probe.returncode != 0 and f"pid {os.getpid()} on host" in probe.stderr


def test_a_lock_file_left_by_a_killed_start_does_not_make_the_folder_a_run(tmp_path):
    """A fresh start whose folder holds only the lock file of a killed start (nothing else written) is not refused
    as an existing run."""
    from recallk.cli.commands import prepare_run_dir

    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    RunFolder(run_dir).lock.write_text('{"pid": 1, "host": "gone"}\n')
    with RunLock(run_dir):
        prepare_run_dir(run_dir, resume=False, overwrite=False)
    assert list(run_dir.iterdir()) == []

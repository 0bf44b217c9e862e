"""One writer per output directory (pipeline/lock.py): the lock itself, and every stage that writes a directory run as
two real processes on one directory, started together and staggered. The loser is refused in one line naming the
holder; the winner's files are those of a solo run.

A writer is frozen (SIGSTOP) as soon as it holds the lock, so that the second process meets a live holder whatever
the machine's speed: a slow writer, made certain."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from pipeline import lock
from pipeline.config import ConfigError, dump_config
from pipeline.io_utils import sha256_file
from tests.test_rollout import onpolicy_cfg, rollout_cfg

ROOT = Path(__file__).resolve().parents[1]
HOLD = textwrap.dedent("""
    import sys, time
    from pipeline.lock import DirLock
    held = DirLock(sys.argv[1], "test").acquire()
    print("held", flush=True)
    time.sleep(float(sys.argv[2]))
""")


def _holder(directory: Path, seconds: float = 60.0) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(directory), str(seconds)], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_writer_is_refused_naming_the_holder_and_the_lock_is_free_after_release(tmp_path):
    run = tmp_path / "runs" / "kd"
    proc = _holder(run)
    try:
        with pytest.raises(lock.DirectoryBusy) as e:
            lock.DirLock(run, "distill").acquire()
        msg = str(e.value)
        assert "\n" not in msg and f"pid {proc.pid}" in msg and str(run) in msg and "test" in msg
    finally:
        proc.kill()
        proc.wait()
    # its holder was killed: the OS released the lock, the next writer takes it over and says from whom
    held = lock.DirLock(run, "distill").acquire()
    held.release()
    with lock.DirLock(run, "distill"):  # released: taken again in the same process
        assert json.loads(lock.lock_path(run).read_text())["pid"] == os.getpid()
    assert lock.lock_path(run).read_text() == ""  # a clean release leaves nothing to take over


def test_a_writer_met_between_its_lock_and_its_record_is_still_named(tmp_path):
    """Started together, the loser can fail to lock in the instant before the holder has written who it is."""
    import fcntl
    import threading

    run = tmp_path / "cache"
    fd = os.open(lock.lock_path(run), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # locked, nothing written yet
    late = threading.Timer(0.2, lambda: os.pwrite(fd, json.dumps({"pid": 4242, "host": "h", "stage": "teacher-cache",
                                                                  "since": "now"}).encode(), 0))
    late.start()
    try:
        with pytest.raises(lock.DirectoryBusy, match=r"being written by teacher-cache \(pid 4242 on h"):
            lock.DirLock(run, "teacher-cache").acquire()
    finally:
        late.join()
        os.close(fd)


def test_a_killed_holder_is_taken_over_with_a_message(tmp_path, capsys):
    run = tmp_path / "cache"
    proc = _holder(run)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    with lock.DirLock(run, "teacher-cache"):
        out = capsys.readouterr().out
    assert f"taking over {run} from test (pid {proc.pid}" in out and "no longer running" in out


def test_a_forked_child_does_not_keep_the_lock_after_release(tmp_path):
    run = tmp_path / "x"
    held = lock.DirLock(run, "t").acquire()
    pid = os.fork()
    if pid == 0:  # a loader worker: shares the descriptor, outlives the release
        time.sleep(3)
        os._exit(0)
    try:
        held.release()
        with lock.DirLock(run, "t"):
            pass
    finally:
        os.waitpid(pid, 0)


def test_an_output_directory_that_cannot_be_written_is_refused_in_one_line(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        if os.access(ro, os.W_OK):  # root ignores the mode
            pytest.skip("this user writes anywhere")
        with pytest.raises(ConfigError, match="cannot be written") as e:
            lock.DirLock(ro / "runs" / "kd", "distill").acquire()
        assert "\n" not in str(e.value)
    finally:
        ro.chmod(0o755)


# --------------------------------------------------------------------------------------------------------------
# Two real processes per stage


def _dskd(*args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "stages.cli", *args], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})


def _wait_holding(procs: list[subprocess.Popen], lock_file: Path, timeout: float = 300.0) -> subprocess.Popen:
    """The process of `procs` that holds `lock_file`, frozen as soon as it holds it."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        try:
            pid = json.loads(lock_file.read_text() or "{}").get("pid")
        except (OSError, ValueError):
            pid = None
        for p in procs:
            if p.pid == pid:
                p.send_signal(signal.SIGSTOP)
                return p
        for p in procs:
            assert p.poll() is None, f"exited {p.returncode} before holding the lock:\n{p.communicate()[1][-3000:]}"
        time.sleep(0.005)
    raise AssertionError(f"nobody took {lock_file}")


def _refused(p: subprocess.Popen, directory: Path, holder: subprocess.Popen) -> str:
    out, err = p.communicate(timeout=300)
    assert p.returncode != 0, out
    lines = [line for line in err.splitlines() if line.strip() and "WARNING" not in line and "real_accelerator" not in line]
    assert len(lines) == 1 and "Traceback" not in err, err[-3000:]
    assert "is being written by" in lines[0] and f"pid {holder.pid}" in lines[0] and str(directory) in lines[0]
    return out


def _finish(p: subprocess.Popen) -> str:
    p.send_signal(signal.SIGCONT)
    out, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
    return out


def two_writers(args: list[str], directory: Path, staggered: bool) -> tuple[str, str, int]:
    """Two processes of `args` on `directory`: the holder is frozen, the other must be refused, the holder then
    finishes. Started together, or the second only once the first holds the lock. Returns both outputs (the holder's,
    the loser's) and the holder's pid."""
    lock_file = lock.lock_path(directory)
    if staggered:
        first = _dskd(*args)
        holder = _wait_holding([first], lock_file)
        other = _dskd(*args)
    else:
        procs = [_dskd(*args), _dskd(*args)]
        holder = _wait_holding(procs, lock_file)
        other = next(p for p in procs if p is not holder)
    try:
        lost = _refused(other, directory, holder)
    finally:
        won = _finish(holder)
    return won, lost, holder.pid


def _files(directory: Path, pattern: str) -> dict[str, str]:
    return {str(p.relative_to(directory)): sha256_file(p) for p in sorted(directory.glob(pattern))}


@pytest.fixture(scope="module")
def solo(caches, tmp_path_factory):
    """Each stage run alone, for the winners' files to equal."""
    from stages import distill, evaluate, rollout, teacher_cache

    root = tmp_path_factory.mktemp("solo")
    out = {"cache": teacher_cache.run(caches.cache_cfg(f"out_dir={root}/cache")),
           "distill": distill.run(caches.distill_cfg(f"out_dir={root}/students", "run_name=kd")),
           "rollout": rollout.run(rollout_cfg(caches, root / "rollouts"))}
    evaluate.run(caches.eval_cfg(out["distill"]))
    return out


@pytest.mark.slow
@pytest.mark.parametrize("staggered", [False, True], ids=["together", "staggered"])
def test_two_distills_of_one_run(caches, solo, tmp_path, staggered):
    cfg = caches.distill_cfg(f"out_dir={tmp_path}/students", "run_name=kd")
    won, lost, pid = two_writers(["distill", "--config", str(dump_config(cfg, tmp_path / "distill.yaml"))],
                                 tmp_path / "students/kd", staggered)
    # each stage's first line says how it uses the CPU; the second job knew it was not alone
    assert re.match(r"distill: \d+ compute thread\(s\) \(", won) and re.match(r"distill: \d+ compute thread", lost)
    if staggered:  # it registered after the holder; started together, at least the later of the two knows
        assert "sharing the machine with " in lost and f"distill (pid {pid})" in lost
    assert "sharing the machine with " in won + lost
    assert _files(tmp_path / "students/kd/final", "*.safetensors") == _files(solo["distill"] / "final", "*.safetensors")


@pytest.mark.slow
@pytest.mark.parametrize("staggered", [False, True], ids=["together", "staggered"])
@pytest.mark.parametrize("stage", ["teacher-cache", "rollout"])
def test_two_writers_of_one_fingerprinted_directory(caches, solo, tmp_path, stage, staggered):
    """A teacher cache and a rollout directory are named by their fingerprint: the same directory as the solo run's."""
    cfg, root, done, pattern = {
        "teacher-cache": (caches.cache_cfg(f"out_dir={tmp_path}/cache"), tmp_path / "cache", solo["cache"], "shard-*"),
        "rollout": (rollout_cfg(caches, tmp_path / "rollouts"), tmp_path / "rollouts", solo["rollout"], "*.jsonl"),
    }[stage]
    two_writers([stage, "--config", str(dump_config(cfg, tmp_path / "stage.yaml"))], root / done.name, staggered)
    assert _files(root / done.name, pattern) == _files(done, pattern) != {}


@pytest.mark.slow
@pytest.mark.parametrize("staggered", [False, True], ids=["together", "staggered"])
def test_two_evals_of_one_run(caches, solo, tmp_path, staggered):
    import shutil

    run = tmp_path / "kd"  # a copy of the solo student without its results
    shutil.copytree(solo["distill"] / "final", run / "final")
    cfg = caches.eval_cfg(run)
    two_writers(["eval", "--config", str(dump_config(cfg, tmp_path / "eval.yaml"))], run / "eval", staggered)

    def results(d: Path) -> dict:
        out = {}
        for p in sorted(d.rglob("*.json")):
            if "results-" in p.name:
                continue
            r = json.loads(p.read_text())
            r.pop("wall_s", None)
            r.pop("model", None)
            out[str(p.relative_to(d))] = r
        return out

    assert results(run / "eval") == results(solo["distill"] / "eval") != {}


@pytest.mark.slow
@pytest.mark.parametrize("staggered", [False, True], ids=["together", "staggered"])
def test_two_onpolicy_runs_of_one_directory(caches, tmp_path, staggered):
    def cfg(out: Path) -> Path:
        return dump_config(onpolicy_cfg(caches, out, "rounds=1"), out.with_suffix(".yaml"))

    solo_run = _dskd("onpolicy", "--config", str(cfg(tmp_path / "solo")))
    assert solo_run.communicate()[1] is not None and solo_run.returncode == 0
    two_writers(["onpolicy", "--config", str(cfg(tmp_path / "op"))], tmp_path / "op", staggered)
    final = "round-001/student/final"
    assert _files(tmp_path / "op" / final, "*.safetensors") == _files(tmp_path / "solo" / final, "*.safetensors") != {}

"""Failures of the environment, oversized images and two processes on one run folder: one line,
exit 2, the run folder resumable (vitfab.boundary, vitfab.lock, --max-image-pixels)."""

from __future__ import annotations

import errno
import json
import os
import signal
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
from PIL import Image

from conftest import TINY, write_image
from vitfab import lock as lock_module
from vitfab.boundary import failure_line, guarded
from vitfab.cli import main
from vitfab.data.images import MAX_IMAGE_PIXELS, load_image
from vitfab.errors import EnvironmentFailure, VitfabError
from vitfab.files import write_json_atomic, writing
from vitfab.lock import FolderLocked, run_lock
from vitfab.models import create_model
from vitfab.models.checkpoint import save_checkpoint

TINY_CLI = ["--model", TINY["model"], "--img-size", str(TINY["img_size"]), "--patch-size", str(TINY["patch_size"])] + [
    a for k, v in TINY["model_args"].items() for a in ("--model-arg", f"{k}={v}")]


def run_cli(capsys, *argv):
    code = main([str(a) for a in argv])
    cap = capsys.readouterr()
    return code, cap.out, cap.err


def one_line(code, err, *parts):
    """The error's only line (asserting exit 2, no traceback, every part in it)."""
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    assert "Traceback" not in err, err
    for part in parts:
        assert part in lines[0], lines[0]
    return lines[0]


def png_header(path: Path, width: int, height: int) -> Path:
    """A PNG that declares ``width x height`` (grayscale) but holds one row: a decompression bomb's
    header, without the gigabytes (the guard refuses an image from its header, before decoding)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1)))
                     + chunk(b"IEND", b""))
    return path


@pytest.fixture
def workdir(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    return tmp_path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    model = create_model(TINY["model"], classes=["good", "void"], img_size=TINY["img_size"],
                         patch_size=TINY["patch_size"], **TINY["model_args"])
    return save_checkpoint(tmp_path / "ckpt", model)


# --------------------------------------------------------------------------- the environment
def test_out_under_a_file_is_one_line_and_writes_nothing(capsys, workdir, make_folder):
    data = make_folder({"good": 4, "void": 4})
    (workdir / "some_file").write_text("not a folder")
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", "some_file/run", "--epochs", "1",
                           "--no-progress", *TINY_CLI)
    one_line(code, err, "some_file is a file, not a folder")
    assert (workdir / "some_file").read_text() == "not a folder" and not (workdir / "runs").exists()


@pytest.mark.parametrize("raised", [
    lambda: OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)),
    # how safetensors reports it: its own exception type, errno only in the text
    lambda: type("SafetensorError", (Exception,), {})(
        'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space left on device" })'),
], ids=["OSError", "SafetensorError"])
def test_disk_full_is_one_line_and_resume_finishes(capsys, workdir, make_folder, monkeypatch, raised):
    data = make_folder({"good": 6, "void": 6})
    import vitfab.models.checkpoint as checkpoint

    real = checkpoint.save_file

    def full(*args, **kwargs):
        raise raised()

    monkeypatch.setattr(checkpoint, "save_file", full)
    code, _, err = run_cli(capsys, "train", "--data", data, "--out", "run", "--epochs", "2", "--batch-size", "8",
                           "--no-progress", *TINY_CLI)
    line = one_line(code, err, "no space left on device writing run/checkpoints/best (", "to write", "free there",
                    "nothing was half written", "continue with: vitfab train --resume run")
    assert " kB to write" in line  # the size of the weights that did not fit
    assert not list((workdir / "run").rglob("*.tmp")), "a half-written file was left behind"
    monkeypatch.setattr(checkpoint, "save_file", real)  # space freed
    code, _, err = run_cli(capsys, "train", "--resume", "run", "--no-progress")
    assert code == 0, err
    assert json.loads((workdir / "run" / "config.json").read_text())["status"] == "done"


def test_a_file_where_a_folder_or_a_folder_where_a_file_belongs(capsys, workdir, tiny_checkpoint):
    image = write_image(workdir / "a.png", size=32)
    (workdir / "some_file").write_text("x")
    (workdir / "some_folder").mkdir()
    code, _, err = run_cli(capsys, "predict", "--checkpoint", tiny_checkpoint, "--input", image,
                           "--out", "some_file/preds.csv", "--no-progress")
    one_line(code, err, "cannot use some_file/preds.csv: some_file is a file, not a folder")
    code, _, err = run_cli(capsys, "predict", "--checkpoint", tiny_checkpoint, "--input", image,
                           "--out", "some_folder", "--no-progress")
    one_line(code, err, "some_folder is a folder where a file was expected")
    assert (workdir / "some_file").read_text() == "x" and not any((workdir / "some_folder").iterdir())


def test_a_writer_that_does_not_say_why_on_a_full_disk(tmp_path, monkeypatch):
    import vitfab.files as files

    dest = tmp_path / "checkpoints" / "last"
    silent = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 576 vs 534")  # torch.save
    with pytest.raises(RuntimeError):  # space left: a bug, untouched
        with writing(dest):
            raise silent
    monkeypatch.setattr(files, "free_bytes", lambda path: 4096)
    with pytest.raises(EnvironmentFailure) as info:
        with writing(dest):
            raise silent
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is silent
    assert not isinstance(info.value, VitfabError)  # handlers of bad input (an export's) must not swallow it


def test_the_resume_hint_names_a_run_that_has_started(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    full = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(run / "split.json"))
    assert "run the same command again" in failure_line(full, ["train", "--out", str(run)])
    (run / "config.json").write_text("{}")
    assert f"vitfab train --resume {run}" in failure_line(full, ["train", "--out", str(run)])
    assert f"vitfab nas train --resume {run}" in failure_line(full, ["nas", "train", f"--out={run}"])


def test_an_error_raised_from_none_hides_its_context():
    from vitfab.errors import errno_of

    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError:
            raise KeyError("a bug that chose to drop its context") from None
    except KeyError as exc:
        assert errno_of(exc) is None


def test_writing_names_the_destination_and_keeps_other_files_errors(tmp_path):
    dest = tmp_path / "run" / "chosen"
    with pytest.raises(EnvironmentFailure) as info:
        with writing(dest):
            with writing(tmp_path / "run" / ".chosen.x.tmp" / "model.safetensors", nbytes=2_000_000):
                raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))
    assert (info.value.errno, info.value.filename, info.value.nbytes) == (errno.EDQUOT, str(dest), 2_000_000)
    elsewhere = FileNotFoundError(errno.ENOENT, "No such file", str(tmp_path / "other" / "input.png"))
    with pytest.raises(FileNotFoundError):  # a read of another file inside the block keeps its own name
        with writing(dest):
            raise elsewhere
    with pytest.raises(ValueError):  # not the environment: untouched
        with writing(dest):
            raise ValueError("a bug")


@pytest.mark.parametrize("exc, args, expected", [
    (OSError(errno.EDQUOT, "Disk quota exceeded", "/w/run/x"), [], "disk quota exceeded writing /w/run/x"),
    (PermissionError(errno.EACCES, "Permission denied", "/w/out"), [], "permission denied: /w/out"),
    (OSError(errno.EPERM, "Operation not permitted", "/w/out"), [], "permission denied: /w/out"),
    (OSError(errno.EROFS, "Read-only file system", "/mnt/ro/run"), [], "read-only file system: cannot write /mnt/ro"),
    (IsADirectoryError(errno.EISDIR, "Is a directory", "/w/preds.csv"), [], "/w/preds.csv is a folder"),
    (OSError(errno.EMFILE, "Too many open files"), [], "too many open files"),
    # a DataLoader worker's OSError comes back as a RuntimeError that quotes it
    (RuntimeError("Caught OSError in DataLoader worker process 0.\nOSError: [Errno 24] Too many open files"), [],
     "too many open files"),
    (RuntimeError("onnx: failed to write model.onnx: No space left on device"), [], "no space left on device"),
    (FileNotFoundError(errno.ENOENT, "No such file or directory", "/data/neu/a.png"), ["eval", "--data", "/data/neu"],
     "not found: /data/neu/a.png"),
])
def test_environment_failures_are_one_line(exc, args, expected):
    assert expected in failure_line(exc, args)


def test_vitfab_errors_keep_their_own_line():
    from vitfab.errors import DataError

    exc = DataError("unreadable image a.png: [Errno 13] Permission denied: 'a.png'")
    assert failure_line(exc, []) == str(exc)


@pytest.mark.parametrize("exc", [
    FileNotFoundError(errno.ENOENT, "No such file or directory", "/site-packages/vitfab/configs/x.yaml"),
    RuntimeError("shape mismatch"), KeyError("top1"), OSError(errno.EIO, "Input/output error"),
    FileExistsError(errno.EEXIST, "File exists", "/"),  # a folder made twice: no file in the way
])
def test_other_failures_are_bugs_with_their_traceback(exc):
    assert failure_line(exc, ["eval", "--data", "/data/neu"]) is None


def test_debug_shows_the_traceback_of_any_error(capsys, monkeypatch):
    def fails(args):
        raise VitfabError("bad input")

    assert guarded(fails, ["train"]) == 2
    err = capsys.readouterr().err
    assert err == "error: bad input\n"
    assert guarded(fails, ["train", "--debug"]) == 2
    err = capsys.readouterr().err
    assert "Traceback" in err and err.endswith("error: bad input\n")
    monkeypatch.setenv("VITFAB_DEBUG", "1")
    assert guarded(fails, ["train"]) == 2
    assert "Traceback" in capsys.readouterr().err
    monkeypatch.delenv("VITFAB_DEBUG")
    seen = []
    guarded(seen.append, ["train", "--debug", "--data", "x"])
    assert seen == [["train", "--data", "x"]]  # --debug is the boundary's, not the command's

    def bug(args):
        raise ZeroDivisionError("a bug")

    with pytest.raises(ZeroDivisionError):  # a bug keeps its traceback
        guarded(bug, ["train"])


def test_nothing_follows_the_line_when_half_built_objects_are_freed(capsys):
    class HalfBuilt:  # like a DataLoader iterator whose workers could not start
        def __del__(self):
            raise AttributeError("'HalfBuilt' object has no attribute '_workers_status'")

    def app(args):
        loader = HalfBuilt()  # noqa: F841 -- held by this frame until the error is handled
        raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))

    assert guarded(app, ["train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: too many open files") and len(err.splitlines()) == 1, err


# --------------------------------------------------------------------------- oversized images
def test_decompression_bomb_to_predict_is_one_line(capsys, workdir, tiny_checkpoint):
    bomb = png_header(workdir / "huge.png", 20_000, 20_000)
    small = write_image(workdir / "small.png", size=32)
    before = Image.MAX_IMAGE_PIXELS
    code, _, err = run_cli(capsys, "predict", "--checkpoint", tiny_checkpoint, "--input", bomb, "--input", small,
                           "--out", "preds.csv", "--no-progress")
    one_line(code, err, f"image too large: {bomb} is 20000 x 20000 = 400,000,000 pixels",
             f"limit of {MAX_IMAGE_PIXELS:,}", "--skip-bad-images")
    assert not (workdir / "preds.csv").exists()
    code, _, err = run_cli(capsys, "predict", "--checkpoint", tiny_checkpoint, "--input", bomb, "--input", small,
                           "--out", "preds.csv", "--skip-bad-images", "--no-progress")
    err = " ".join(err.split())  # the console wraps long lines
    assert code == 0 and "skipped 1 unreadable image" in err and "huge.png: image too large" in err
    assert len((workdir / "preds.csv").read_text().splitlines()) == 2  # header + the small image
    assert Image.MAX_IMAGE_PIXELS == before  # PIL's own limit is left as it was


def test_max_image_pixels_in_the_scan(capsys, workdir, make_folder):
    data = make_folder({"good": 3, "void": 3}, size=8)
    write_image(data / "void" / "big.png", size=64)
    code, _, err = run_cli(capsys, "data", "info", data, "--max-image-pixels", "100", "--no-progress")
    one_line(code, err, "big.png is 64 x 64 = 4,096 pixels, above the limit of 100")
    code, out, err = run_cli(capsys, "data", "info", data, "--max-image-pixels", "100", "--skip-bad-images",
                             "--no-progress")
    assert code == 0 and "skipped 1 unreadable image" in err and "6 images" in out and "big.png" in err
    code, out, _ = run_cli(capsys, "data", "info", data, "--no-progress")  # the default limit takes it
    assert code == 0 and "7 images" in out
    code, _, err = run_cli(capsys, "train", "--data", data, "--max-image-pixels", "100", "--out", "run",
                           "--no-progress", *TINY_CLI)
    one_line(code, err, "big.png", "limit of 100")
    assert not (workdir / "run").exists()
    code, _, err = run_cli(capsys, "data", "info", data, "--max-image-pixels", "0", "--no-progress")
    one_line(code, err, "--max-image-pixels must be at least 1")


def test_a_limit_above_pils_own_reads_the_image(tmp_path, monkeypatch):
    path = write_image(tmp_path / "a.png", size=32)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)  # PIL would call 32 x 32 a bomb
    assert load_image(path, max_pixels=2000).size == (32, 32)
    assert Image.MAX_IMAGE_PIXELS == 100


# --------------------------------------------------------------------------- one writer per run folder
HOLD = """
import sys, time
from vitfab.lock import run_lock
with run_lock(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
"""


HOLD_AND_FORK = """
import os, sys, time
from vitfab.lock import run_lock
with run_lock(sys.argv[1]):
    worker = os.fork()  # like a DataLoader worker
    if worker == 0:
        time.sleep(600)
        os._exit(0)
    print(worker, flush=True)
    time.sleep(600)
"""


def _holder(folder: Path, script: str = HOLD) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1] / "src"))
    child = subprocess.Popen([sys.executable, "-c", script, str(folder)], stdout=subprocess.PIPE, text=True, env=env)
    child.first_line = child.stdout.readline().strip()
    return child


@pytest.mark.parametrize("command, config", [
    (["train", "--resume"], {"kind": "train", "status": "running", "train": {}}),
    (["run", "--resume"], {"kind": "main", "status": "running", "job": {}}),
])
def test_second_process_on_a_run_folder_is_one_line_and_kill_frees_the_lock(capsys, tmp_path, command, config):
    folder = tmp_path / "run"
    folder.mkdir()
    write_json_atomic(folder / "config.json", config)
    child = _holder(folder)
    assert child.first_line == "held"
    try:
        code, _, err = run_cli(capsys, *command, folder, "--no-progress")
        one_line(code, err, f"run folder {folder} is in use by another vitfab process (pid {child.pid})")
        assert json.loads((folder / "config.json").read_text()) == config  # untouched
    finally:
        child.send_signal(signal.SIGKILL)  # kill -9: the OS releases the lock
        child.wait()
    with run_lock(folder):  # free now, though the lock file stays
        assert (folder / ".lock").read_text().strip() == str(os.getpid())


def test_a_forked_worker_of_a_killed_holder_does_not_keep_the_lock(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = _holder(folder, HOLD_AND_FORK)
    worker = int(holder.first_line)
    try:
        with pytest.raises(FolderLocked):
            with run_lock(folder):
                pass
        holder.send_signal(signal.SIGKILL)
        holder.wait()
        os.kill(worker, 0)  # the orphaned worker lives on
        with run_lock(folder):  # and the lock is free
            pass
    finally:
        try:
            os.kill(worker, signal.SIGKILL)
        except ProcessLookupError:
            pass


def test_a_lock_that_cannot_be_taken_names_the_run(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()

    def read_only(path):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(path / ".lock"))

    monkeypatch.setattr(lock_module, "_acquire", read_only)
    with pytest.raises(OSError) as info:
        with run_lock(folder):
            pass
    assert getattr(info.value, lock_module.RUN_FOLDER_ATTR) == str(folder)
    assert "read-only file system" in failure_line(info.value, ["run", "--resume", str(folder)])


def test_lock_is_reentrant_in_a_process_and_only_rank0_locks(tmp_path, monkeypatch):
    folder = tmp_path / "run"
    folder.mkdir()
    child = _holder(folder)
    assert child.first_line == "held"
    try:
        with pytest.raises(FolderLocked):
            with run_lock(folder):
                pass
        monkeypatch.setattr(lock_module, "world", lambda: (1, 2))  # rank 1 under torchrun: rank 0 writes
        with run_lock(folder):
            pass
    finally:
        child.kill()
        child.wait()
    monkeypatch.setattr(lock_module, "world", lambda: (0, 1))
    with run_lock(folder), run_lock(folder / "." / ""):  # a main job and a stage of it in the same folder
        pass
    with run_lock(folder):
        pass


def test_a_new_run_in_a_folder_holding_only_the_lock_file(tmp_path):
    from vitfab.rundir import RunDir

    folder = tmp_path / "run"
    folder.mkdir()
    with run_lock(folder):
        pass
    assert RunDir.create(folder).root == folder  # a run that failed before its first file can start again

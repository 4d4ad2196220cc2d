"""padim.atomic: outputs are complete or absent."""

from __future__ import annotations

import pytest

from padim.atomic import atomic_path, write_text


def test_write_replaces_atomically_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "out.json"
    write_text(target, "one")
    write_text(target, "two")
    assert target.read_text() == "two"
    assert [p.name for p in target.parent.iterdir()] == ["out.json"]


def test_failure_keeps_the_previous_file(tmp_path):
    target = tmp_path / "model.safetensors"
    write_text(target, "previous")
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.safetensors"]


def test_leftover_temporaries_of_killed_writers_are_removed_by_the_next_write(tmp_path):
    import fcntl
    import os

    target = tmp_path / "model.safetensors"
    dead = tmp_path / ".model.abc123.tmp.safetensors"
    dead.write_bytes(b"half")
    live = tmp_path / ".model.live99.tmp.safetensors"
    live.write_bytes(b"being written")
    other = tmp_path / ".metrics.xyz.tmp.json"
    other.write_bytes(b"{")
    fd = os.open(live, os.O_RDONLY)
    fcntl.flock(fd, fcntl.LOCK_EX)  # as a writer in another process holds it
    try:
        write_text(target, "complete")
    finally:
        os.close(fd)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, other.name])
    assert target.read_text() == "complete"


def test_every_writer_in_the_package_goes_through_atomic():
    """Static guard: outside atomic.py, files are only written to the ``tmp`` path of atomic_path,
    to in-memory buffers (io.BytesIO/StringIO), or through atomic.write_text/write_bytes."""
    import ast
    from pathlib import Path

    import padim

    def called(node: ast.AST) -> str:
        func = node.func if isinstance(node, ast.Call) else None
        return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", "")

    offenders = []
    for source in Path(padim.__file__).parent.rglob("*.py"):
        if source.name == "atomic.py":
            continue
        tree = ast.parse(source.read_text())
        buffers = {t.id for n in ast.walk(tree) if isinstance(n, ast.Assign)
                   and called(n.value) in ("BytesIO", "StringIO") for t in n.targets if isinstance(t, ast.Name)}
        allowed = {"tmp"} | buffers
        for node in ast.walk(tree):
            if not isinstance(node, ast.Call):
                continue
            func, name = node.func, called(node)
            # the path argument: first, or second for safetensors' save_file(tensors, path)
            target = node.args[1 if name == "save_file" else 0] if len(node.args) > (name == "save_file") else None
            to_allowed = isinstance(target, ast.Name) and target.id in allowed
            receiver = func.value if isinstance(func, ast.Attribute) else None
            on_allowed = isinstance(receiver, ast.Name) and receiver.id in allowed
            where = f"{source.name}:{node.lineno} {name}"
            if name in ("savefig", "imsave", "save_file", "tofile", "savez", "savez_compressed") and not to_allowed:
                offenders.append(where)
            elif name == "save" and any(k.arg == "format" for k in node.keywords) and not to_allowed:
                offenders.append(where)
            elif isinstance(func, ast.Attribute) and name in ("write_text", "write_bytes") and not on_allowed:
                offenders.append(where)
            elif name == "open" and any(isinstance(a, ast.Constant) and isinstance(a.value, str)
                                        and set(a.value) & set("wax+") for a in node.args[1:]):
                offenders.append(f"{source.name}:{node.lineno} open for writing")
    assert offenders == []


# Runs `padim fit` in a child process that pauses at one point of the fit (a hook patched in by this
# test only), writes a marker, and is then killed with SIGKILL.
KILL_HOOK = r"""
import os, pathlib, sys, time
point, marker = sys.argv[1], pathlib.Path(sys.argv[2])

def pause():
    marker.write_text(point)
    time.sleep(600)

if point == "accumulate":  # extracting features of the training images
    from padim.model import stats
    stats.GaussianStats.update = lambda self, blocks: pause()
elif point == "write":  # half the model bytes are in the temporary file
    real_write = pathlib.Path.write_bytes
    def write_half(self, data):
        if self.name.startswith(".model."):
            with open(self, "wb") as f:
                f.write(data[: len(data) // 2])
                f.flush()
            pause()
        return real_write(self, data)
    pathlib.Path.write_bytes = write_half
elif point == "fsync":  # temporary complete, not yet synced or renamed
    os.fsync = lambda fd: pause()
elif point == "renamed":  # renamed over the target, directory not yet synced
    real_replace = os.replace
    def replace_then_pause(src, dst):
        real_replace(src, dst)
        pause()
    os.replace = replace_then_pause
from padim.cli import main
main(sys.argv[3:])
"""


def test_kill_9_during_fit_never_leaves_a_partial_model(tmp_path):
    import shutil
    import signal
    import subprocess
    import sys
    import time

    import numpy as np

    from conftest import make_folder_dataset
    from padim import Padim
    from padim.datasets import load_split

    root = make_folder_dataset(tmp_path / "data", np.random.default_rng(0), n_train=6)
    previous = tmp_path / "previous.safetensors"
    Padim(image_size=64, d=8).fit([s.path for s in load_split(root, "widget").train]).save(previous)
    old = previous.read_bytes()
    points = ("accumulate", "write", "fsync", "renamed")
    children = {}
    for point in points:
        out = tmp_path / point
        out.mkdir()
        shutil.copy(previous, out / "model.safetensors")
        args = ["fit", root, "--category", "widget", "--out", out, "--image-size", "64", "--d", "8", "--seed", "1",
                "--no-progress", "--workers", "0"]
        children[point] = subprocess.Popen([sys.executable, "-c", KILL_HOOK, point, tmp_path / f"{point}.reached",
                                            *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        for point, child in children.items():
            marker = tmp_path / f"{point}.reached"
            deadline = time.monotonic() + 300
            while not marker.exists() and child.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert marker.exists(), child.stderr.read() if child.poll() is not None else "hook not reached"
            child.send_signal(signal.SIGKILL)
            assert child.wait(30) == -signal.SIGKILL
    finally:
        for child in children.values():
            if child.poll() is None:
                child.kill()
                child.wait()
    for point in points:
        out = tmp_path / point
        model = out / "model.safetensors"
        visible = sorted(p.name for p in out.iterdir() if not p.name.startswith("."))
        temps = sorted(p.name for p in out.iterdir() if p.name.startswith("."))
        assert visible == ["model.safetensors"], (point, visible)
        Padim.load(model)  # complete: loads and passes every check
        if point == "renamed":
            assert model.read_bytes() != old and temps == []  # the new model, whole
        else:
            assert model.read_bytes() == old, point  # the previous model, untouched
            assert len(temps) == (0 if point == "accumulate" else 1), (point, temps)
            assert all(t.startswith(".model.") and t.endswith(".tmp.safetensors") for t in temps)
        Padim.load(previous).save(model)  # the next write removes what the killed writer left
        assert sorted(p.name for p in out.iterdir()) == ["model.safetensors"]

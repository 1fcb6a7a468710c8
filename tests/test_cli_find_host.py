"""`render` finds its host without COMFYUI_PATH when the pack sits in a ComfyUI's custom_nodes/: as a plain clone,
and as a symlink to a clone elsewhere (resolving the link alone would miss that host)."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from host_compat import REPO_ROOT

FIND_HOST = "from rerender_cli.embedded import find_host; print(find_host())"


def fake_comfyui(root: Path) -> Path:
    """What find_host recognises a ComfyUI checkout by, and an empty custom_nodes/."""
    (root / "custom_nodes").mkdir(parents=True)
    for name in ("main.py", "nodes.py"):
        (root / name).write_text("")
    return root


def find_host_from(pack: Path) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "COMFYUI_PATH"}
    env["PWD"] = str(pack)                            # what a shell that cd'ed through the link sets
    return subprocess.run([sys.executable, "-c", FIND_HOST], cwd=str(pack), env=env, capture_output=True, text=True)


def test_a_clone_in_custom_nodes_finds_that_host(tmp_path):
    host = fake_comfyui(tmp_path / "ComfyUI")
    pack = host / "custom_nodes" / "comfyui-rerender"
    shutil.copytree(REPO_ROOT / "rerender_cli", pack / "rerender_cli")
    done = find_host_from(pack)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == host


def test_a_symlinked_clone_in_custom_nodes_finds_that_host(tmp_path):
    host = fake_comfyui(tmp_path / "ComfyUI")
    link = host / "custom_nodes" / "comfyui-rerender"
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    done = find_host_from(link)
    assert done.returncode == 0, done.stderr
    assert Path(done.stdout.strip()) == host


def test_a_symlink_elsewhere_is_no_host(tmp_path):
    link = tmp_path / "not_custom_nodes" / "comfyui-rerender"
    link.parent.mkdir()
    link.symlink_to(REPO_ROOT, target_is_directory=True)
    done = find_host_from(link)
    if REPO_ROOT.parent.name == "custom_nodes":      # the clone itself sits in a host: that one is found
        assert done.returncode == 0, done.stderr
        return
    assert done.returncode == 1 and "no ComfyUI host found" in done.stderr, done.stderr

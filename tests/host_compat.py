"""Finding a ComfyUI checkout to test against, and making it importable on a CPU-only machine.

Both the in-process fixture and the server launched by the end-to-end test go through here, so the rules for
"which host" and "how it starts" live in one place.
"""
import hashlib
import os
import signal
import tempfile
from pathlib import Path
from typing import Optional, Tuple

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
REPO_DATA = REPO_ROOT / "tests" / "data"              # the clips committed, the weights fetch_weights.py gets
SHARED_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
PACK_DIR_NAME = "comfyui-rerender"


def merged_material(first: Path, then: Path) -> Path:
    """The test material folder: `then` alone when `first` does not exist, else a folder of links to every file of
    both (videos/, weights/, flow/...), `first`'s where both have one. Links are only added or re-pointed, never
    removed, so processes that build it at the same time (a test and the server it starts) agree."""
    if not first.is_dir():
        return then
    merged = Path(tempfile.gettempdir()) / f"comfyui-rerender-material-{hashlib.sha1(bytes(first)).hexdigest()[:10]}"
    for root in (then, first):
        for source in (root.rglob("*") if root.is_dir() else ()):
            if not source.is_file() or source.name.startswith("."):
                continue
            target = merged / source.relative_to(root)
            if target.is_symlink() and Path(os.readlink(target)) == source:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            staged = target.with_name(f".{target.name}.{os.getpid()}")
            staged.unlink(missing_ok=True)
            staged.symlink_to(source)
            os.replace(staged, target)
    return merged


SHARED_DATA = merged_material(REPO_DATA, SHARED_DATA_DIR)


def default_sigint() -> None:
    """Popen preexec_fn for a child the test stops with SIGINT as a terminal would: a shell without job control
    starts background jobs with SIGINT ignored, the child would inherit that and never see Ctrl-C."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def skip_or_fail(reason: str) -> None:
    """Skip a test that cannot run here, with the reason in the summary; under CI (CI=true) fail it instead, so that
    a CI run can never pass with its host, server or frontend tests silently skipped."""
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason} (CI=true: a test that cannot run fails the run)", pytrace=False)
    pytest.skip(reason)


def find_comfyui() -> Tuple[Optional[Path], str]:
    """The ComfyUI checkout to test against: $COMFYUI_PATH, else the checkout this pack sits in under
    custom_nodes/. Returns (path, "") or (None, reason)."""
    env = os.environ.get("COMFYUI_PATH")
    if env:
        path = Path(env).expanduser().resolve()
        if (path / "main.py").is_file() and (path / "nodes.py").is_file():
            return path, ""
        return None, f"COMFYUI_PATH={env} is not a ComfyUI checkout (no main.py / nodes.py)"
    parent = REPO_ROOT.parent
    if parent.name == "custom_nodes" and (parent.parent / "main.py").is_file():
        return parent.parent, ""
    return None, ("no ComfyUI found: set COMFYUI_PATH to a ComfyUI checkout, or install this pack under "
                  "ComfyUI/custom_nodes/")


TORCHVISION_SCHEMAS = {"nms": "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
                       "qnms": "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor"}


def define_missing_torchvision_ops() -> None:
    """PyPI only has CUDA builds of torchvision; with a CPU-only torch its C extension cannot load, and importing
    it then fails on the missing `torchvision::nms` schema. Declaring the two schemas lets it import (the ops stay
    unimplemented; nothing here calls them). A torchvision whose extension loads is left alone, and so are schemas
    that something else in the process (another workaround, an earlier call) already declared: the declaration is a
    library fragment, which may coexist with any other registration of the namespace."""
    import importlib.util
    import torch
    spec = importlib.util.find_spec("torchvision")
    missing = {name: schema for name, schema in TORCHVISION_SCHEMAS.items()
               if not torch._C._jit_get_schemas_for_operator(f"torchvision::{name}")}
    if spec is None or not missing:
        return
    extensions = list(Path(spec.submodule_search_locations[0]).glob("_C*.so"))
    try:
        for extension in extensions:
            torch.ops.load_library(str(extension))
        if extensions:
            return
    except OSError:
        pass
    library = torch.library.Library("torchvision", "FRAGMENT")
    for schema in missing.values():
        library.define(schema)
    _LIBRARIES.append(library)  # a registration lives as long as its Library object


_LIBRARIES = []


def make_base_directory(base: Path) -> Path:
    """A throwaway ComfyUI base directory: custom_nodes/ holding this pack (a symlink) and the real weights the
    tests use, where the host's loaders look for them."""
    (base / "custom_nodes").mkdir(parents=True, exist_ok=True)
    link = base / "custom_nodes" / PACK_DIR_NAME
    if not link.exists():
        link.symlink_to(REPO_ROOT, target_is_directory=True)
    weights = SHARED_DATA / "weights"
    for folder, names in {"vae_approx": ["taef2_encoder.pth", "taef2_decoder.pth"],
                          "optical_flow": ["raft-sintel.pth", "raft-small.pth"]}.items():
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        for name in names:
            target = base / "models" / folder / name
            if (weights / name).is_file() and not target.exists():
                target.symlink_to(weights / name)
    for sub in ("input", "output", "temp", "user"):
        (base / sub).mkdir(exist_ok=True)
    return base

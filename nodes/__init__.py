"""V3 node schemas only, one module per stage: inputs, tooltips, validate_inputs, and an execute that converts
types and calls `engine` (or `rerender` where no host orchestration is needed). Each module lists its node classes
in NODES. Node ids and input names never change: saved workflows must load."""
import importlib
import pkgutil

NODES = []
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    NODES.extend(getattr(importlib.import_module(f".{_module}", __name__), "NODES", []))

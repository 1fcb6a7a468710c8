"""Thin V3 node wrappers, one module per stage; each module lists its node classes in NODES."""
import importlib
import pkgutil

NODES = []
for _module in sorted(m.name for m in pkgutil.iter_modules(__path__)):
    NODES.extend(getattr(importlib.import_module(f".{_module}", __name__), "NODES", []))

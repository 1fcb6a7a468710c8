"""Queue-time checks shared by the pack's nodes.

A V3 node's `validate_inputs` runs at `POST /prompt`, before anything executes, so a bad widget value is refused
before any upstream work. The host skips its own min/max check for every input that `validate_inputs` takes by
name (execution.py, validate_inputs), so `out_of_range` restores it for those inputs.
"""
from typing import Optional


def out_of_range(node_cls, **values) -> Optional[str]:
    """The first value outside its input's declared [min, max], as a message naming the input; None if all fit.
    Values of linked inputs are unknown at queue time (None) and are left to the node's execute."""
    declared = {}
    for section in node_cls.INPUT_TYPES().values():
        declared.update(section)
    for name, value in values.items():
        spec = declared[name]
        options = spec[1] if len(spec) > 1 else {}
        if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "min" in options and value < options["min"]:
            return f"`{name}` is {value}, below its minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"`{name}` is {value}, above its maximum {options['max']}"
    return None

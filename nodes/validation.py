"""Queue-time checks shared by the pack's nodes.

A V3 node's `validate_inputs` runs at `POST /prompt`, before anything executes, so a bad widget value is refused
before any upstream work. The host skips its own min/max and combo checks for every input that `validate_inputs`
takes by name, and for all inputs when it takes **kwargs (execution.py, validate_inputs); `outside_declared`
restores them for those inputs. It also attaches a failed check to every input the function takes, so each
node's `validate_inputs` takes only the input its check is about: the problem is then reported once, on that input.
"""
from typing import Optional, Union

from ..engine.sampling import refusal


def outside_declared(node_cls, **values) -> Optional[str]:
    """The first value outside its input's declared [min, max] or combo options, as a message naming the input;
    None if all fit. Values of linked inputs are unknown at queue time (None) and are left to the node's execute;
    names the node does not declare (hidden inputs) are ignored."""
    declared = {}
    for section in node_cls.INPUT_TYPES().values():
        declared.update(section)
    for name, value in values.items():
        spec = declared.get(name)
        if spec is None or value is None:
            continue
        kind, options = spec[0], (spec[1] if len(spec) > 1 else {})
        choices = kind if isinstance(kind, list) else options.get("options") if kind == "COMBO" else None
        if choices is not None:
            if value not in choices:
                return f"`{name}` is {value!r}, not one of its options"
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        if "min" in options and value < options["min"]:
            return f"`{name}` is {value}, below its minimum {options['min']}"
        if "max" in options and value > options["max"]:
            return f"`{name}` is {value}, above its maximum {options['max']}"
    return None


def sampler_refusal(sampler_name: Optional[str], node_name: str) -> Union[bool, str]:
    """A node's `validate_inputs` answer for its `sampler_name` (None when linked: checked when the node runs)."""
    return (None if sampler_name is None else refusal(sampler_name, node_name)) or True

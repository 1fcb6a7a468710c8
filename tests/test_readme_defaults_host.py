"""Every default the documentation pages (docs/*.md, linked from the README) give equals the node's own (its V3
schema, as the host loads it): each "| input | default | meaning |" table under a "## Title (`Rerender_X`)"
heading, whoever wrote the section."""
import re

import pytest

from host_compat import REPO_ROOT

HEADING = re.compile(r"^#{2,3} .*\(`(Rerender_\w+)`\)\s*$")
PAGES = sorted((REPO_ROOT / "docs").glob("*.md"))
WORDS = {"on": True, "true": True, "off": False, "false": False}


def readme_tables() -> dict:
    """node id -> [(row text, input names, documented default values)] from the pages' input tables."""
    tables, node_id, in_table = {}, None, False
    lines = [line for page in PAGES for line in ["# " + page.name, *page.read_text().splitlines()]]
    for line in lines:
        heading = HEADING.match(line)
        if heading or line.startswith("#"):
            node_id, in_table = (heading.group(1) if heading else None), False
            continue
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")] if line.startswith("|") else None
        if node_id and cells and [c.lower() for c in cells[:2]] == ["input", "default"]:
            in_table = True
            tables.setdefault(node_id, [])
        elif in_table and cells and not set(cells[0]) <= set("-: "):
            tables[node_id].append((line, input_names(cells[0]), default_values(cells[1])))
        elif in_table and not cells:
            in_table = False
    return tables


def input_names(cell: str) -> list:
    """`a`, `b` -> [a, b]; `x_start/end` -> [x_start, x_end]."""
    names = []
    for name in re.findall(r"`([^`]+)`", cell):
        first, *others = name.split("/")
        names.append(first)
        names.extend(f"{first.rsplit('_', 1)[0]}_{other}" for other in others)
    return names


def default_values(cell: str) -> list:
    """`a`, 0.5, on, 0 (all levels) -> ['a', '0.5', 'on', '0']: the leading token of each comma-separated value
    (commas inside backticks belong to the value)."""
    values = []
    for part in re.findall(r"`[^`]*`|[^,]+", cell):
        part = part.strip()
        if part:
            values.append(part.strip("`") if part.startswith("`") else part.split()[0])
    return values


def matches(documented: str, default) -> bool:
    if isinstance(default, bool):
        return WORDS.get(documented.lower()) is default
    if isinstance(default, (int, float)):
        try:
            return float(documented) == pytest.approx(float(default))
        except ValueError:
            return False
    return documented == str(default)


def test_every_documented_default_is_the_nodes_default(host):
    tables = readme_tables()
    assert "Rerender_KeyframePicker" in tables and "Rerender_PatchPropagator" in tables, sorted(tables)
    checked = 0
    for node_id, rows in tables.items():
        assert node_id in host.nodes.NODE_CLASS_MAPPINGS, f"the docs document {node_id}, which the pack lacks"
        schema = host.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
        defaults = {socket.id: getattr(socket, "default", None) for socket in schema.inputs}
        for row, names, values in rows:
            unknown = [name for name in names if name not in defaults]
            assert not unknown, f"{node_id}: a docs row names inputs the node lacks {unknown}: {row}"
            # fewer values than names: the values belong to the last names (the first ones are sockets)
            for name, value in zip(names[len(names) - len(values):], values):
                assert matches(value, defaults[name]), (
                    f"{node_id}.{name}: the docs say {value!r}, the node's default is {defaults[name]!r} ({row})")
                checked += 1
        documented = {name for _, names, _ in rows for name in names}
        missing = [name for name, default in defaults.items() if default is not None and name not in documented]
        assert not missing, f"{node_id}: inputs with a default missing from the docs' table: {missing}"
    assert checked > 30


def test_the_table_parser_reads_the_forms_the_readme_uses():
    assert input_names("`shape_fusion_start/end`") == ["shape_fusion_start", "shape_fusion_end"]
    assert input_names("`optical_flow` (optional)") == ["optical_flow"]
    assert default_values("`0:-1:10,-1`") == ["0:-1:10,-1"]
    assert default_values("3500, 5, 0 (all levels), 8, 0") == ["3500", "5", "0", "8", "0"]
    assert matches("on", True) and not matches("16", 8) and matches("0.01", 0.01) and matches("ddim", "ddim")

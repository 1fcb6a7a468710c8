"""Layout checks for the shipped UI workflows: what a user sees when a workflow opens must be tidy (no node on top
of another, every node inside its group, every group title readable). Boxes are [x, y, width, height]; a node's box
includes its title bar."""
from typing import Dict, List, Sequence

# LiteGraph draws a node's title bar above its `pos`, and a group's title in the group's font (24 px here).
NODE_TITLE_HEIGHT = 30
GROUP_FONT_SIZE = 24
# Average advance of a character of the group font (Arial) per pixel of font size, for titles measured offline.
ARIAL_AVERAGE_ADVANCE = 0.58


def overlaps(a: Sequence[float], b: Sequence[float]) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def inside(inner: Sequence[float], outer: Sequence[float]) -> bool:
    return (outer[0] <= inner[0] and inner[0] + inner[2] <= outer[0] + outer[2]
            and outer[1] <= inner[1] and inner[1] + inner[3] <= outer[1] + outer[3])


def problems(nodes: List[Dict], groups: List[Dict]) -> List[str]:
    """nodes: {"id", "type", "box"}; groups: {"title", "box", "titleWidth", "titlePadding"}. Every problem found."""
    found = []
    for i, a in enumerate(nodes):
        for b in nodes[i + 1:]:
            if overlaps(a["box"], b["box"]):
                found.append(f"node {a['id']} ({a['type']}) overlaps node {b['id']} ({b['type']})")
        homes = [g["title"] for g in groups if inside(a["box"], g["box"])]
        if len(homes) != 1:
            found.append(f"node {a['id']} ({a['type']}) lies inside {len(homes)} groups {homes}, not exactly one")
    for i, g in enumerate(groups):
        if g["titleWidth"] + 2 * g["titlePadding"] > g["box"][2]:
            found.append(f"group title {g['title']!r} needs {g['titleWidth'] + 2 * g['titlePadding']:.0f} px, "
                         f"the group is {g['box'][2]:.0f} px wide")
        for h in groups[i + 1:]:
            if overlaps(g["box"], h["box"]):
                found.append(f"group {g['title']!r} overlaps group {h['title']!r}")
    return found


def from_ui_json(workflow: dict) -> tuple:
    """The geometry a UI-format workflow file declares (node sizes as stored; titles measured by estimate)."""
    nodes = [{"id": n["id"], "type": n["type"],
              "box": [n["pos"][0], n["pos"][1] - NODE_TITLE_HEIGHT, n["size"][0], n["size"][1] + NODE_TITLE_HEIGHT]}
             for n in workflow["nodes"]]
    groups = [{"title": g["title"], "box": g["bounding"], "titlePadding": 4,
               "titleWidth": len(g["title"]) * ARIAL_AVERAGE_ADVANCE * g.get("font_size", GROUP_FONT_SIZE)}
              for g in workflow["groups"]]
    return nodes, groups

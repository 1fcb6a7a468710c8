"""The shipped UI workflows open tidy: no node on another, every node in exactly one group, every group title fits.
(The frontend test checks the same with the editor's own node sizes and title measurements.)"""
import json

import pytest

from host_compat import REPO_ROOT
from workflow_geometry import from_ui_json, problems

UI_WORKFLOWS = sorted((REPO_ROOT / "workflows").glob("*.json"))  # the API twins live in workflows/api/


@pytest.mark.parametrize("path", UI_WORKFLOWS, ids=[p.stem for p in UI_WORKFLOWS])
def test_ui_workflow_layout_is_tidy(path):
    assert problems(*from_ui_json(json.loads(path.read_text()))) == []


def test_the_check_sees_overlaps_strays_and_cut_titles():
    nodes = [{"id": 1, "type": "A", "box": [10, 40, 100, 100]}, {"id": 2, "type": "B", "box": [50, 120, 100, 100]},
             {"id": 3, "type": "C", "box": [500, 40, 100, 100]}]
    groups = [{"title": "a title far too long for its group", "box": [0, 0, 200, 300], "titleWidth": 400,
               "titlePadding": 4}]
    found = problems(nodes, groups)
    assert any("overlaps node 2" in p for p in found)
    assert any("node 3 (C) lies inside 0 groups" in p for p in found)
    assert any("needs 408 px" in p for p in found)
    assert problems(nodes[:1], [dict(groups[0], titleWidth=100)]) == []

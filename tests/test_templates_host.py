"""The pack in the host's template browser and on the editor's nodes, in the real frontend (headless Chromium):
one card per UI workflow with its thumbnail, each opening a non-empty graph; the picker shows only its mode's
widgets and its indices after a run; a failed run clears them.

The thumbnails are the pictures this test takes of each opened graph (a square, as the card shows it: the method's
name and purpose in a banner over the graph); RERENDER_WRITE_THUMBNAILS=1 writes them next to the workflows
(workflows/<card title>.jpg, where the browser looks for them) instead of a temporary folder. The test's tmp_path
keeps template-browser.png, the cards as the browser shows them with the thumbnails just taken."""
import json
import os
import subprocess

import cv2

from host_compat import PACK_DIR_NAME, REPO_ROOT
from test_frontend_host import FRONTEND_TESTS, UI_WORKFLOWS, browser_tools, shipped_files  # noqa: F401 (fixtures)

# split_at_cuts applies in every mode; cut_threshold only shows once it is on (off by default)
MODE_WIDGETS = {"uniform": {"interval", "include_last", "split_at_cuts"}, "list": {"index_list", "split_at_cuts"}}


def visible(state) -> set:
    return {name for name, hidden in state["hidden"].items() if not hidden} - {"mode"}


def test_template_cards_open_their_graphs_and_a_failed_run_clears_the_nodes_texts(server, browser_tools,
                                                                                  shipped_files, tmp_path):
    write = os.environ.get("RERENDER_WRITE_THUMBNAILS") == "1"
    thumbnails = REPO_ROOT / "workflows" if write else tmp_path
    done = subprocess.run(["node", str(FRONTEND_TESTS / "check_templates.mjs"), server.url, PACK_DIR_NAME,
                           str(thumbnails), str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])

    names = sorted(path.stem for path in UI_WORKFLOWS)
    assert sorted(report["cards"]) == names                     # no card for an API twin
    for name in names:
        nodes = len(json.loads((REPO_ROOT / "workflows" / f"{name}.json").read_text())["nodes"])
        assert report["opened"][name] == nodes > 0, (name, report["opened"])
        height, width = cv2.imread(str(thumbnails / f"{name}.jpg")).shape[:2]
        assert width == height > 0, (name, width, height)      # the card is a square: no bars above and below
        assert report["captioned"][name] and report["errorNodes"][name] == [], (name, report["errorNodes"])
        card = report["thumbnails"][name]
        if not write:                                          # the committed thumbnail is the one shown
            assert name in report["thumbnailsServed"], (name, report["thumbnailsServed"])
            assert card["loaded"] and "default-template" not in card["src"], card

    print(f"cards: {tmp_path / 'template-browser.png'}")
    assert (tmp_path / "template-browser.png").stat().st_size > 0

    status = report["status"]
    assert visible(status["initial"]) == MODE_WIDGETS["uniform"] and status["initial"]["status"] == []
    assert status["afterSuccess"]["status"] == ["key frames: 0"]
    assert status["afterCachedRun"]["status"] == ["key frames: 0"]  # cached, not executed: the text stays
    assert visible(status["listMode"]) == MODE_WIDGETS["list"]
    assert status["events"] == ["execution_start", "execution_error"]
    assert status["afterFailure"]["status"] == []               # not the previous run's indices

"""What the host decides before anything runs: widget-only mistakes refused at `POST /prompt` (no node executes),
each reported once, on the input at fault, and an unchanged graph served from the host's cache (no pack node runs
again)."""
import json

import pytest

from test_workflows_host import WORKFLOWS, for_tiny_models

FULL_PIPELINE = WORKFLOWS / "api" / "rerender_full_pipeline.json"

# (node class, input, bad value, what the error must say): each needs only the node's own widget values. Nodes that
# are not in the full pipeline are taken from their own workflow (WORKFLOW_OF).
WORKFLOW_OF = {"Rerender_TokenFlowSampler": "rerender_tokenflow", "Rerender_Inversion": "rerender_tokenflow",
               "Rerender_TuneAVideo": "rerender_tune_a_video", "Rerender_FrescoKeyFrames": "rerender_fresco_pipeline"}
# The host's own range and option checks ("Value 0 smaller than min of 1", "Value not in list") cover every input a
# node's validate_inputs does not take; the pack's checks keep their own words.
WIDGET_MISTAKES = [
    ("Rerender_PatchPropagator", "patch_size", 4, "`patch_size` must be odd"),
    ("Rerender_PatchPropagator", "patch_size", 17, "above its maximum"),
    ("Rerender_KeyframePicker", {"mode": "adaptive", "s_min": 0}, None, "smaller than min of 1"),
    ("Rerender_KeyframePicker", {"mode": "list", "index_list": "0,a"}, None, "'a'"),
    ("Rerender_KeyframePicker", {"split_at_cuts": True, "cut_threshold": 1.5}, None, "bigger than max of 1.0"),
    ("Rerender_KeyframePicker", {"split_at_cuts": True, "cut_threshold": 0.0}, None, "smaller than min of 0.01"),
    ("Rerender_KeyframeSampler", "sampler_name", "dpm_adaptive", "dpm_adaptive"),
    ("Rerender_KeyframeSampler", "sampler_name", "no_such_sampler", "unknown sampler 'no_such_sampler'"),
    ("Rerender_KeyframeSampler", "steps", 0, "smaller than min of 1"),
    ("Rerender_KeyframeSampler", {"adain_start": 1.5}, None, "bigger than max of 1.0"),
    ("Rerender_TokenFlowSampler", "sampler_name", "euler_ancestral", "'euler_ancestral' not in"),
    ("Rerender_TokenFlowSampler", "chunk_size", 0, "smaller than min of"),
    ("Rerender_TuneAVideo", "steps", 0, "smaller than min of 1"),
    ("Rerender_TuneAVideo", "learning_rate", -1.0, "smaller than min of"),
    ("Rerender_FrescoKeyFrames", "batch_size", 2, "smaller than min of 3"),
    ("Rerender_FrescoKeyFrames", "sampler_name", "dpm_fast", "dpm_fast"),
    ("Rerender_FrescoKeyFrames", "learning_rate", 0.0, "smaller than min of"),
]


def node_id_of(prompt: dict, class_type: str) -> str:
    return next(key for key, node in prompt.items() if node["class_type"] == class_type)


@pytest.mark.parametrize("class_type,name,value,expected", WIDGET_MISTAKES,
                         ids=[f"{c}.{n}={v}" for c, n, v, _ in WIDGET_MISTAKES])
def test_widget_mistake_is_refused_at_queue_time(server, class_type, name, value, expected):
    """`name` is one input (set to `value`) or a dict of inputs to set together."""
    workflow = WORKFLOWS / "api" / f"{WORKFLOW_OF.get(class_type, 'rerender_full_pipeline')}.json"
    prompt = for_tiny_models(json.loads(workflow.read_text()))
    for key in [key for key, n in prompt.items() if n["class_type"] == "PreviewImage"]:
        del prompt[key]  # an output that does not depend on the node at fault would still be queued and run
    node = node_id_of(prompt, class_type)
    changes = name if isinstance(name, dict) else {name: value}
    prompt[node]["inputs"].update(changes)
    history_before = len(server.get_json("/history"))

    status, body = server.post_prompt(prompt)

    assert status == 400, body
    assert list(body["node_errors"]) == [node], body["node_errors"]  # only the node at fault
    (error,) = body["node_errors"][node]["errors"]                  # once, on the input at fault
    changed = [key for key in changes if key not in ("mode", "split_at_cuts")]
    assert [error["extra_info"]["input_name"]] == changed, error
    assert expected in f"{error['message']} {error['details']}", error
    queue = server.get_json("/queue")
    assert queue["queue_running"] == [] and queue["queue_pending"] == []
    assert len(server.get_json("/history")) == history_before


def test_unchanged_graph_queued_again_runs_no_pack_node(server):
    prompt = for_tiny_models(json.loads(FULL_PIPELINE.read_text()))
    pack_nodes = {key for key, node in prompt.items() if node["class_type"].startswith("Rerender_")}
    first, _ = server.queue(prompt)
    assert not [m for m in first if m["type"] == "execution_error"]

    second, entry = server.queue(json.loads(json.dumps(prompt)))

    executed = {m["data"]["node"] for m in second if m["type"] == "executing" and m["data"].get("node")}
    cached = {node for m in second if m["type"] == "execution_cached" for node in m["data"]["nodes"]}
    assert not executed & pack_nodes, f"ran again: {sorted(executed & pack_nodes)}"
    assert pack_nodes <= cached
    assert entry["status"]["status_str"] == "success"

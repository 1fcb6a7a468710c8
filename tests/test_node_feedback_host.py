"""What the nodes tell a user on the node (through their ui output) and in the log: the sampler says when its
model has no Cross-Frame Attention, the shipped defaults log no warning, the picker names a frame size the VAE
cannot take, and widget-only mistakes are refused at queue time, each once, on the input at fault."""
import json
import logging

import pytest
import torch

from host_compat import REPO_ROOT

from test_keyframe_sampler_host import SIZE, clip, run_sampler, zero_flow
from tiny_models import tiny_sd15


def schema_defaults(host, node_id) -> dict:
    schema = host.nodes.NODE_CLASS_MAPPINGS[node_id].define_schema()
    return {socket.id: socket.default for socket in schema.inputs if getattr(socket, "default", None) is not None}


def report_lines(host) -> list:
    return host.last_ui["text"][0].splitlines()


def test_the_sampler_says_when_its_model_has_no_cross_frame_attention(host):
    frames = clip(2)
    run_sampler(host, tiny_sd15(0), frames, steps=2)
    assert any(line.startswith("no Cross-Frame Attention on this model") for line in report_lines(host))
    (patched,) = host.run_node("Rerender_CrossFrameAttention", model=tiny_sd15(0),
                               **schema_defaults(host, "Rerender_CrossFrameAttention"))
    run_sampler(host, patched, frames, steps=2)
    assert not any("Cross-Frame Attention" in line for line in report_lines(host))


def test_the_shipped_defaults_log_no_warning(host, caplog):
    defaults = schema_defaults(host, "Rerender_KeyframeSampler")
    assert (defaults["steps"], defaults["denoise"]) == (15, 0.75)      # the case the reference leaves inert
    frames = clip(2)
    (patched,) = host.run_node("Rerender_CrossFrameAttention", model=tiny_sd15(0),
                               **schema_defaults(host, "Rerender_CrossFrameAttention"))
    with caplog.at_level(logging.INFO):
        run_sampler(host, patched, frames, flow=zero_flow(host, frames), **defaults)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []
    # no advice to change the shipped settings, on the node or in the log
    assert not any("raise denoise" in line or "no effect" in line for line in report_lines(host))
    assert not any("shape-aware fusion" in r.getMessage() for r in caplog.records)
    # a shape-aware period the user moved and the denoise hides is still named
    run_sampler(host, patched, frames, flow=zero_flow(host, frames), **dict(defaults, shape_fusion_end=0.15))
    assert any(line.startswith("shape-aware fusion") and "no effect" in line for line in report_lines(host))


def test_the_picker_names_a_frame_size_the_vae_cannot_take(host):
    defaults = schema_defaults(host, "Rerender_KeyframePicker")
    host.run_node("Rerender_KeyframePicker", frames=torch.rand(3, 60, 44, 3), **defaults)
    (note,) = host.last_ui["rerender_notes"]
    assert "44x60" in note and "40x56" in note
    host.run_node("Rerender_KeyframePicker", frames=torch.rand(3, SIZE, SIZE, 3), **defaults)
    assert host.last_ui["rerender_notes"] == []


def picker_prompt(**change) -> dict:
    base = {"mode": "uniform", "interval": 10, "include_last": True, "s_min": 5, "s_max": 20,
            "index_list": "0:-1:10,-1"}
    return {"1": {"class_type": "LoadImage", "inputs": {"image": "rerender_example.png"}},
            "2": {"class_type": "Rerender_KeyframePicker", "inputs": dict(base, frames=["1", 0], **change)},
            "3": {"class_type": "PreviewAny", "inputs": {"source": ["2", 2]}}}


def test_picker_mistakes_are_refused_at_queue_time(server):
    history_before = server.history_ids()
    for change, expected in [({"mode": "list", "index_list": "0,2:y"}, "'y' in '2:y' is not an integer"),
                             ({"mode": "list", "index_list": "0:5:0"}, "the step in '0:5:0' must be positive")]:
        status, body = server.post_json("/prompt", {"prompt": picker_prompt(**change), "client_id": "picker-test"})
        assert status == 400, body
        (error,) = body["node_errors"]["2"]["errors"]
        assert error["extra_info"]["input_name"] == "index_list" and expected in error["details"], error
    assert server.queued_ids() == ([], []) and server.history_ids() == history_before


def test_two_mistakes_are_two_errors_each_on_its_input(server):
    """A refused sampler and a bad index list: two errors from POST /prompt, on sampler_name and index_list alone
    (the host repeats a validate_inputs message once per input the function takes: 31 errors before)."""
    from test_workflows_host import for_tiny_models
    prompt = for_tiny_models(json.loads((REPO_ROOT / "workflows" / "api" / "rerender_full_pipeline.json").read_text()))
    picker, = [nid for nid, node in prompt.items() if node["class_type"] == "Rerender_KeyframePicker"]
    sampler, = [nid for nid, node in prompt.items() if node["class_type"] == "Rerender_KeyframeSampler"]
    prompt[picker]["inputs"].update(mode="list", index_list="0,2:y")
    prompt[sampler]["inputs"]["sampler_name"] = "dpm_fast"
    save, = [nid for nid, node in prompt.items() if node["class_type"] == "SaveVideo"]
    # the video as the only target, or the host would run the flow preview, whose inputs are fine
    status, body = server.post_json("/prompt", {"prompt": prompt, "client_id": "two-mistakes",
                                                "partial_execution_targets": [save]})
    assert status == 400, body
    errors = [(nid, error["extra_info"]["input_name"]) for nid, entry in body["node_errors"].items()
              for error in entry["errors"]]
    assert sorted(errors) == sorted([(picker, "index_list"), (sampler, "sampler_name")]), errors


def test_s_min_above_s_max_is_refused_when_the_picker_runs(host):
    frames = torch.rand(4, SIZE, SIZE, 3)
    defaults = schema_defaults(host, "Rerender_KeyframePicker")
    with pytest.raises(ValueError, match=r"s_min \(9\) is larger than s_max \(3\)"):
        host.run_node("Rerender_KeyframePicker", frames=frames, **dict(defaults, mode="adaptive", s_min=9, s_max=3))

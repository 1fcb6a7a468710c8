"""The flow nodes inside a real ComfyUI: our RAFT loader, the host's own optical-flow loader, the DIS fallback,
the outputs an artist sees, and bad input."""
import cv2
import numpy as np
import pytest
import torch

NODE_ARGS = dict(dis_preset="medium", raft_iterations=4, photometric_check=False, consistency_alpha=0.01,
                 consistency_beta=0.5)


@pytest.fixture(scope="module")
def clip(shared_data):
    """Three real frames with motion (car-turn 30, 32, 34), 128x128."""
    cap = cv2.VideoCapture(str(shared_data / "videos" / "car_turn_480x480_10fps.mp4"))
    frames = []
    for index in range(35):
        ok, frame = cap.read()
        assert ok
        if index in (30, 32, 34):
            frames.append(cv2.resize(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB), (128, 128), interpolation=cv2.INTER_AREA))
    return torch.from_numpy(np.stack(frames)).float() / 255.0


def test_flow_nodes_are_registered(host):
    assert {"Rerender_FlowEstimation", "Rerender_RAFTLoader"} <= set(host.pack_node_ids)
    info = host.nodes.NODE_CLASS_MAPPINGS["Rerender_FlowEstimation"].GET_NODE_INFO_V1()
    assert info["output"] == ["RERENDER_FLOW", "IMAGE", "MASK"]
    assert info["input"]["optional"]["optical_flow"][0] == "OPTICAL_FLOW"
    assert host.nodes.NODE_CLASS_MAPPINGS["Rerender_RAFTLoader"].GET_NODE_INFO_V1()["output"] == ["OPTICAL_FLOW"]


def test_raft_checkpoint_through_our_loader_and_the_flow_node(host, clip):
    import comfy.model_patcher
    flowlib = host.pack_module("rerender.flow")
    (optical_flow,) = host.run_node("Rerender_RAFTLoader", model_name="raft-small.pth")
    assert isinstance(optical_flow, comfy.model_patcher.ModelPatcher) and flowlib.is_raft(optical_flow.model)

    frames_before = clip.clone()
    video_flow, preview, occlusion = host.run_node("Rerender_FlowEstimation", frames=clip, optical_flow=optical_flow,
                                                   estimate="precompute", **NODE_ARGS)
    assert torch.equal(clip, frames_before)
    assert isinstance(video_flow, flowlib.VideoFlow) and isinstance(video_flow.estimator, flowlib.RAFTEstimator)
    assert (video_flow.num_frames, video_flow.height, video_flow.width) == (3, 128, 128)
    assert video_flow.computed_pairs == {(0, 1), (1, 0), (1, 2), (2, 1)}

    direct = flowlib.VideoFlow.estimate(clip, flowlib.RAFTEstimator(optical_flow.model, iterations=4))
    for pair in [(0, 1), (2, 1)]:
        assert torch.equal(video_flow.pair(*pair)[0], direct.pair(*pair)[0])

    assert preview.shape == (3, 128, 128, 3) and occlusion.shape == (3, 128, 128)
    assert torch.equal(preview[0], torch.ones(128, 128, 3)) and not occlusion[0].any()
    assert torch.equal(occlusion[2], video_flow.pair(1, 2)[1][0, 0])
    assert (preview[1:] < 0.99).any()  # the car moves: coloured, not white

    flow_0_2, occlusion_0_2 = video_flow.pair(0, 2)  # on demand, with the same (host-managed) model
    assert (0, 2) in video_flow.computed_pairs and (2, 0) in video_flow.computed_pairs
    assert flow_0_2.shape == (1, 2, 128, 128) and occlusion_0_2.shape == (1, 1, 128, 128)

    lazy, lazy_preview, lazy_occlusion = host.run_node("Rerender_FlowEstimation", frames=clip,
                                                       optical_flow=optical_flow, cache_pairs=2, **NODE_ARGS)
    assert lazy.computed_pairs == {(0, 1), (1, 0)} and lazy.max_cached_pairs == 2  # the default: on demand
    assert host.last_ui["rerender_notes"][0].startswith("flow on demand") and "at most 2 pairs kept (0.3 MiB" in \
        host.last_ui["rerender_notes"][0]
    assert lazy_preview.shape == (1, 128, 128, 3) and torch.equal(lazy_occlusion[0], occlusion[1])
    for pair in [(2, 1), (0, 2), (1, 0), (2, 0)]:  # asked in another order than precomputed: the same numbers
        assert all(torch.equal(a, b) for a, b in zip(lazy.pair(*pair), video_flow.pair(*pair))), pair
    assert len(lazy.computed_pairs) == 4 and lazy.peak_cached_pairs == 2


def test_the_hosts_optical_flow_model_is_used(host, clip):
    """A torchvision-layout RAFT-large through the core 'Load Optical Flow Model' gives exactly the flow of the
    original raft-sintel checkpoint through our converter."""
    if "OpticalFlowLoader" not in host.nodes.NODE_CLASS_MAPPINGS:
        pytest.skip("this ComfyUI has no core OpticalFlowLoader")
    (ours,) = host.run_node("Rerender_RAFTLoader", model_name="raft-sintel.pth")
    torch.save(ours.model.state_dict(), host.base / "models" / "optical_flow" / "raft_large_torchvision.pth")
    (hosts,) = host.run_node("OpticalFlowLoader", model_name="raft_large_torchvision.pth")
    args = dict(NODE_ARGS, raft_iterations=2)
    from_host = host.run_node("Rerender_FlowEstimation", frames=clip[:2], optical_flow=hosts, **args)[0]
    from_ours = host.run_node("Rerender_FlowEstimation", frames=clip[:2], optical_flow=ours, **args)[0]
    assert hosts.model is not ours.model
    assert torch.equal(from_host.pair(0, 1)[0], from_ours.pair(0, 1)[0])


def test_dis_fallback_and_photometric_option(host, clip):
    flowlib = host.pack_module("rerender.flow")
    plain, _, plain_occlusion = host.run_node("Rerender_FlowEstimation", frames=clip, **NODE_ARGS)
    assert isinstance(plain.estimator, flowlib.DISEstimator) and plain.estimator.preset == "medium"
    strict, _, strict_occlusion = host.run_node("Rerender_FlowEstimation", frames=clip,
                                                **dict(NODE_ARGS, photometric_check=True, dis_preset="fast"))
    assert strict.estimator.preset == "fast" and strict.photometric_threshold == flowlib.PHOTOMETRIC_THRESHOLD
    loose, _, loose_occlusion = host.run_node("Rerender_FlowEstimation", frames=clip,
                                              **dict(NODE_ARGS, consistency_beta=50.0))
    assert loose_occlusion.sum() < plain_occlusion.sum() and loose.beta == 50.0


def test_bad_input_is_refused_before_work(host, clip):
    import comfy.model_patcher
    with pytest.raises(ValueError, match="^Flow Estimation: `frames` holds 1 frame.*at least 2 frames"):
        host.run_node("Rerender_FlowEstimation", frames=clip[:1], **NODE_ARGS)
    not_raft = comfy.model_patcher.ModelPatcher(torch.nn.Conv2d(3, 2, 3), load_device=torch.device("cpu"),
                                                offload_device=torch.device("cpu"))
    for wrong in (not_raft, torch.zeros(2, 2, 8, 8)):
        with pytest.raises(ValueError, match="optical_flow"):
            host.run_node("Rerender_FlowEstimation", frames=clip, optical_flow=wrong, **NODE_ARGS)
    (host.base / "models" / "optical_flow" / "broken.pth").write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match="broken.pth"):
        host.run_node("Rerender_RAFTLoader", model_name="broken.pth")


def test_interrupt_is_honoured(host, clip):
    import comfy.model_management
    comfy.model_management.interrupt_current_processing(True)
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            host.run_node("Rerender_FlowEstimation", frames=clip, **NODE_ARGS)
    finally:
        comfy.model_management.interrupt_current_processing(False)

"""Rerender-A-Video's key frame method on tensors: cross-frame attention (`cross_frame_attention`) and the
hierarchical constraints between key frames (`keyframe_constraints`). Imports only torch and the shared pieces of
`rerender`."""

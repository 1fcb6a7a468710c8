"""The pack's own socket types. Namespaced so they never collide with other packs' meanings of similar names."""
from comfy_api.latest import io

KeyFrames = io.Custom("RERENDER_KEYFRAMES")
VideoFlow = io.Custom("RERENDER_FLOW")
Inversion = io.Custom("RERENDER_INVERSION")
TunedVideo = io.Custom("RERENDER_TUNE_A_VIDEO")
LossMap = io.Custom("LOSS_MAP")  # the host's type: its "Plot Loss Graph" node draws it

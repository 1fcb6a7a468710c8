"""Host-bound orchestration of the pack's methods: sampling hooks, key frame rendering (Rerender-A-Video), FRESCO's
and TokenFlow's host sides, Tune-A-Video's model surgery and training loop, inversion, ControlNet hints, flow and VAE
helpers. Each module imports the ComfyUI host and the algorithm library `rerender`; none imports `nodes`."""

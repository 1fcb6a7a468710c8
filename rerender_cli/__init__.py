"""The pack's programs: the console command (`python -m rerender_cli propagate|render`, installed as
`comfyui-rerender`), the headless runner over HTTP, its scale-out on a Dask cluster (scale_out.py, and
dask_worker.py on the workers, which loads ComfyUI in process and lets it load the pack's nodes), and the workflow
builder. They import the algorithm library `rerender` at most, never the host-bound layers (`render` loads the pack
into an embedded host instead); run them from the repository root, e.g. `python -m rerender_cli --help`."""

"""The pack's programs: the headless runner, its scale-out over several servers, and the workflow builder. They
import the algorithm library `rerender` at most, never the host-bound layers; run them from the repository root,
e.g. `python -m rerender_cli.run_headless --help`."""

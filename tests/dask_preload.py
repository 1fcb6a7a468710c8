"""Dask preload for the tests' workers (DASK_DISTRIBUTED__WORKER__PRELOAD='["dask_preload"]', with tests/ on
PYTHONPATH: Dask copies a preload given as a file away from its folder): the CPU torchvision workaround of
host_compat, before a worker loads ComfyUI."""
from host_compat import define_missing_torchvision_ops

define_missing_torchvision_ops()

"""comfyui-rerender: zero-shot video-to-video translation (Rerender-A-Video, FRESCO key frames) for ComfyUI."""
from comfy_api.latest import ComfyExtension, io

from .nodes import NODES

WEB_DIRECTORY = "./js"


class RerenderExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> RerenderExtension:
    return RerenderExtension()

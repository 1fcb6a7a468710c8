"""Algorithm library of comfyui-rerender: plain torch / numpy / OpenCV, importable without ComfyUI."""

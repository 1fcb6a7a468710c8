"""FRESCO (CVPR 2024) on tensors: batch geometry and flows (`geometry`), FRESCO-guided attention (`attention`) and
the feature optimisation (`optimize`). Imports only torch and the shared pieces of `rerender`."""

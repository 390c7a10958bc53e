"""The training engine: the loop, checkpoints, signals and fault reporting, CUDA-graph replay."""

"""Calibrated quantization (GPTQ, AWQ): calibration text, the layer-by-layer numpy forward, the driver."""

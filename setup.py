"""Only the optional C kernel lives here; everything else is in pyproject.toml.

``optional=True``: without a C compiler the install still succeeds and k_quant runs its numpy
reference, which gives the same bytes (slower).
"""
from setuptools import Extension, setup

setup(ext_modules=[Extension(
    "onnxforge.quant._native._kquant", sources=["src/onnxforge/quant/_native/kquant.c"], optional=True,
    # exactness: float32 as written, no FMA contraction, no fast-math (the numpy reference must agree);
    # no trapping math only lets the compiler turn the clamps into selects (flags, not values, differ)
    extra_compile_args=["-O3", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math", "-fno-math-errno",
                        "-std=c99"])])

"""Named storage schemes. A registry that refuses duplicates; users may add their own at run time."""
from __future__ import annotations

from dataclasses import replace

from ..errors import RecipeError
from .recipe import Recipe
from .registry import Registry
from .storage import Storage

_SCHEMES: Registry[tuple[Storage, str]] = Registry("scheme")


def register_scheme(name: str, storage: Storage, doc: str = "") -> None:
    if not storage.quantized:
        raise RecipeError(f"scheme {name!r} must quantize (bits 2, 4 or 8)")
    _SCHEMES.register(name, (storage, doc))


def unregister_scheme(name: str) -> None:
    _SCHEMES.unregister(name)


def get_scheme(name: str) -> Storage:
    return _SCHEMES.get(name)[0]


def schemes() -> dict[str, tuple[Storage, str]]:
    return _SCHEMES.all()


def apply_scheme(recipe: Recipe, name: str) -> Recipe:
    """Use a scheme as the recipe's base storage (precision, bits, block size, symmetry, method)."""
    st = get_scheme(name)
    precision = {4: "int4", 8: "int8"}.get(st.bits)
    if precision is None:
        raise RecipeError(f"scheme {name!r} has {st.bits} bits; only 4- and 8-bit schemes can be a base precision")
    return replace(recipe, precision=precision, block_size=st.block_size, symmetric=st.symmetric,
                   method=st.method if st.method != "rtn" or recipe.method == "default" else recipe.method)


for _bs in (32, 64, 128):
    register_scheme(f"int4_wo_{_bs}", Storage(bits=4, block_size=_bs, symmetric=True, method="rtn"),
                    f"4-bit weights, symmetric, block {_bs}")
    register_scheme(f"uint4_wo_{_bs}", Storage(bits=4, block_size=_bs, symmetric=False, method="rtn"),
                    f"4-bit weights with zero points, block {_bs}")
register_scheme("int8_wo", Storage(bits=8, block_size=32, symmetric=True, method="rtn"), "8-bit weights, block 32")
register_scheme("int8_wo_128", Storage(bits=8, block_size=128, symmetric=True, method="rtn"), "8-bit weights, block 128")
register_scheme("int4_wo_256", Storage(bits=4, block_size=256, symmetric=True, method="rtn"),
                "4-bit weights, symmetric, block 256 (the widest block MatMulNBits runs on CPU; per-channel "
                "scales are not offered because the CPU kernel accepts blocks of 16 to 256 only)")
register_scheme("int4_hqq_64", Storage(bits=4, block_size=64, symmetric=False, method="hqq"),
                "4-bit HQQ with zero points, block 64")
register_scheme("int4_kquant_32", Storage(bits=4, block_size=32, symmetric=False, method="k_quant"),
                "4-bit k-quant with mins (zero points), block 32")

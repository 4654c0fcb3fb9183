"""Block quantizers for MatMulNBits / GatherBlockQuantized and the recipes that place them."""

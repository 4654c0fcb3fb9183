"""Emit a decoder-only transformer for onnxruntime-genai from a ModelSpec.

Graph (names follow the onnxruntime-genai builder so its exclusion lists keep working):
  input_ids -> /model/embed_tokens/Gather
  per layer i: /model/layers.{i}/input_layernorm (Skip)SimplifiedLayerNorm
               /model/layers.{i}/attn/qkv_proj MatMul(NBits) [+ bias] -> GroupQueryAttention (rotary inside)
               /model/layers.{i}/attn/o_proj -> post_attention_layernorm SkipSimplifiedLayerNorm
               /model/layers.{i}/mlp/gate_up_proj -> Split -> SiLU * up -> /model/layers.{i}/mlp/down_proj
  /model/norm -> /lm_head -> logits
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np
import onnx_ir as ir

from ..archs.registry import TensorNames
from ..errors import CheckpointError, RecipeError
from ..quant.storage import Storage
from ..sources.base import Source
from ..spec import ModelSpec
from . import weights as W
from .builder import MS, GraphBuilder, TensorSlot, WeightJob
from .rope import cos_sin_cache


class Plan(Protocol):
    """What the recipe decides; see quant/recipe.py."""

    io: Storage  # activation dtype (bits == 0)
    unpack_matmul: bool

    def storage(self, names: Sequence[str], op: str) -> Storage: ...

    def share_embeddings(self, spec: ModelSpec, embed: Storage, lm_head: Storage) -> bool: ...


@dataclass
class Emitter:
    b: GraphBuilder
    spec: ModelSpec
    names: TensorNames
    source: Source
    plan: Plan

    # -- helpers ---------------------------------------------------------------------------
    @property
    def io(self) -> Storage:
        return self.plan.io

    def expect(self, name: str, shape: tuple[int, ...]) -> None:
        got = tuple(self.source.shape(name))
        if got != shape:
            raise CheckpointError(f"tensor {name!r} has shape {got}, but config.json implies {shape}")

    def vector(self, label: str, init: str, name: str, size: int, offset: float = 0.0) -> ir.Value:
        self.expect(name, (size,))
        return self.b.weights(W.float_table_job(self.source, label, init, name, (size,), self.io, offset))[0]

    def norm_weight(self, label: str, hf_name: str, size: int) -> ir.Value:
        return self.vector(label, hf_name, hf_name, size, self.spec.norm.weight_offset)

    def matmul(self, x: ir.Value, node: str, modules: Sequence[str], sizes: Sequence[int], K: int, st: Storage) -> ir.Value:
        names = [f"{m}.weight" for m in modules]
        for n, size in zip(names, sizes):
            self.expect(n, (size, K))
        N = sum(sizes)
        prefix = node.strip("/").replace("/", ".")
        if not st.quantized:
            init = f"{prefix}.weight"
            w = self.b.weights(W.float_matmul_job(self.source, node, init, names, N, K, st))[0]
            return self.b.op("MatMul", [x, w], f"{node}/MatMul")
        job = W.quant_matmul_job(self.source, node, prefix, names, N, K, st, self.io.ir_dtype, self.io.np_dtype)
        ws = self.b.weights(job)
        return self.b.op("MatMulNBits", [x, *ws], f"{node}/MatMul", domain=MS, K=K, N=N, bits=st.bits,
                         block_size=st.block_size, accuracy_level=st.accuracy_level)

    def linear_group(self, x: ir.Value, packed: str, parts: Sequence[tuple[str, str, int]], K: int,
                     bias: bool = False) -> list[ir.Value]:
        """One MatMul over stacked parts when they share a storage plan, else one per part.

        parts: (node name, HF module, N). Returns one value per part, or a single packed value.
        """
        stores = [self.plan.storage([f"{packed}/MatMul", f"{node}/MatMul", module], "MatMul")
                  for node, module, _ in parts]
        if len(parts) > 1 and len(set(stores)) == 1 and not self.plan.unpack_matmul:
            y = self.matmul(x, packed, [m for _, m, _ in parts], [n for *_, n in parts], K, stores[0])
            if bias:
                y = self.add_bias(y, packed, [m for _, m, _ in parts], sum(n for *_, n in parts))
            return [y]
        outs = []
        for (node, module, n), st in zip(parts, stores):
            y = self.matmul(x, node, [module], [n], K, st)
            outs.append(self.add_bias(y, node, [module], n) if bias else y)
        return outs

    def add_bias(self, y: ir.Value, node: str, modules: Sequence[str], N: int) -> ir.Value:
        names = [f"{m}.bias" for m in modules]
        init = node.strip("/").replace("/", ".") + ".bias"
        for n in names:
            if not self.source.has(n):
                raise CheckpointError(f"tensor {n!r} is missing from the checkpoint (the config asks for biases)")
        bias = self.b.weights(W.concat_vector_job(self.source, node, init, names, N, self.io))[0]
        return self.b.op("Add", [y, bias], f"{node}/Add")

    # -- model -----------------------------------------------------------------------------
    def build(self) -> None:
        spec, b, io = self.spec, self.b, self.io
        a = spec.attention
        input_ids = b.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
        mask = b.input("attention_mask", ir.DataType.INT64, ["batch_size", "total_sequence_length"])
        past = [
            tuple(b.input(f"past_key_values.{i}.{kv}", io.ir_dtype,
                          ["batch_size", a.num_kv_heads, "past_sequence_length", a.head_dim]) for kv in ("key", "value"))
            for i in range(spec.num_layers)
        ]
        seqlens_k, total_len = self.mask_to_lengths(mask)
        cos, sin = self.rope_caches()
        lm_head_store, x = self.embedding(input_ids)

        residual = None
        for i in range(spec.num_layers):
            x, residual = self.norm(x, residual, f"/model/layers.{i}/input_layernorm", self.names.input_norm.format(i=i))
            attn = self.attention(i, x, past[i], seqlens_k, total_len, cos, sin)
            x, residual = self.norm(attn, residual, f"/model/layers.{i}/post_attention_layernorm",
                                    self.names.post_attn_norm.format(i=i))
            x = self.mlp(i, x)
        x, _ = self.norm(x, residual, "/model/norm", self.names.final_norm)
        logits = self.lm_head(x, lm_head_store)
        b.output(logits, "logits", io.ir_dtype, ["batch_size", "sequence_length", spec.vocab_size])

    def mask_to_lengths(self, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        b, base = self.b, "/model/attn_mask_reformat/attn_mask_subgraph"
        total = b.op("ReduceSum", [mask, b.const([1], np.int64)], f"{base}/ReduceSum", keepdims=0)
        minus1 = b.op("Sub", [total, b.const(1, np.int64)], f"{base}/Sub")
        seqlens_k = b.op("Cast", [minus1], f"{base}/Sub/Cast", to=ir.DataType.INT32)
        shape = b.op("Shape", [mask], f"{base}/Shape")
        length = b.op("Gather", [shape, b.const(1, np.int64)], f"{base}/Gather", axis=0)
        total_len = b.op("Cast", [length], f"{base}/Gather/Cast", to=ir.DataType.INT32)
        return seqlens_k, total_len

    def rope_caches(self) -> tuple[ir.Value, ir.Value]:
        spec, io = self.spec, self.io
        shape = (spec.context_length, spec.rope.rotary_dim // 2)
        jobs = []
        for which in (0, 1):
            def produce(which=which):
                return [cos_sin_cache(spec.rope, spec.context_length)[which].astype(io.np_dtype)]

            name = ("cos_cache", "sin_cache")[which]
            jobs.append(WeightJob("/model/rotary_emb", (TensorSlot(name, io.ir_dtype, shape),), produce, io.describe()))
        return self.b.weights(jobs[0])[0], self.b.weights(jobs[1])[0]

    def norm(self, x: ir.Value, residual: ir.Value | None, node: str, weight: str) -> tuple[ir.Value, ir.Value]:
        gamma = self.norm_weight(node, weight, self.spec.hidden_size)
        eps = self.spec.norm.eps
        if residual is None:
            y = self.b.op("SimplifiedLayerNormalization", [x, gamma], f"{node}/LayerNorm", axis=-1, epsilon=eps,
                          stash_type=1)
            return y, x
        y, _mean, _inv, total = self.b.op("SkipSimplifiedLayerNormalization", [x, residual, gamma],
                                          f"{node}/SkipLayerNorm", domain=MS, n_out=4, epsilon=eps)
        _mean.name = _inv.name = ""
        return y, total

    def attention(self, i: int, x: ir.Value, past: tuple[ir.Value, ir.Value], seqlens_k: ir.Value,
                  total_len: ir.Value, cos: ir.Value, sin: ir.Value) -> ir.Value:
        a, n, H = self.spec.attention, self.names, self.spec.hidden_size
        base = f"/model/layers.{i}/attn"
        parts = [(f"{base}/{p}_proj", getattr(n, p).format(i=i), size)
                 for p, size in (("q", a.q_size), ("k", a.kv_size), ("v", a.kv_size))]
        qkv = self.linear_group(x, f"{base}/qkv_proj", parts, H, bias=a.qkv_bias)
        if a.qk_norm:
            qkv = self.split(qkv, [a.q_size, a.kv_size, a.kv_size], f"{base}/qkv_proj")
            qkv = [self.head_norm(qkv[0], i, "q", a.num_heads), self.head_norm(qkv[1], i, "k", a.num_kv_heads), qkv[2]]
        q, k, v = (qkv + [None, None])[:3]
        attrs = dict(num_heads=a.num_heads, kv_num_heads=a.num_kv_heads, do_rotary=1,
                     rotary_interleaved=int(self.spec.rope.interleaved), local_window_size=-1, softcap=a.softcap)
        if a.scale is not None:
            attrs["scale"] = a.scale
        window = a.layer_windows[i] if a.layer_windows else 0
        if window:
            attrs["local_window_size"] = window
        out, present_k, present_v = self.b.op(
            "GroupQueryAttention", [q, k, v, past[0], past[1], seqlens_k, total_len, cos, sin],
            f"{base}/GroupQueryAttention", domain=MS, n_out=3, **attrs)
        kv_shape = ["batch_size", a.num_kv_heads, "total_sequence_length", a.head_dim]
        self.b.output(present_k, f"present.{i}.key", self.io.ir_dtype, kv_shape)
        self.b.output(present_v, f"present.{i}.value", self.io.ir_dtype, kv_shape)
        (o,) = self.linear_group(out, f"{base}/o_proj", [(f"{base}/o_proj", n.o.format(i=i), H)], a.q_size,
                                 bias=a.o_bias)
        return o

    def split(self, values: list[ir.Value], sizes: list[int], node: str) -> list[ir.Value]:
        if len(values) == len(sizes):
            return values
        return list(self.b.op("Split", [values[0], self.b.const(sizes, np.int64)], f"{node}/Split", n_out=len(sizes),
                              axis=-1))

    def head_norm(self, x: ir.Value, i: int, which: str, heads: int) -> ir.Value:
        """Qwen3-style RMS norm over each head: Reshape -> SimplifiedLayerNormalization -> Reshape."""
        a, b = self.spec.attention, self.b
        node = f"/model/layers.{i}/attn/{which}_norm"
        hf = getattr(self.names, f"{which}_norm").format(i=i)
        gamma = self.norm_weight(node, hf, a.head_dim)
        heads_view = b.op("Reshape", [x, b.const([0, 0, heads, a.head_dim], np.int64)], f"{node}/Reshape")
        y = b.op("SimplifiedLayerNormalization", [heads_view, gamma], f"{node}/LayerNorm", axis=-1,
                 epsilon=self.spec.norm.eps, stash_type=1)
        return b.op("Reshape", [y, b.const([0, 0, heads * a.head_dim], np.int64)], f"{node}/Reshape_1")

    def mlp(self, i: int, x: ir.Value) -> ir.Value:
        n, H, I = self.names, self.spec.hidden_size, self.spec.mlp.intermediate_size
        base = f"/model/layers.{i}/mlp"
        parts = [(f"{base}/gate_proj", n.gate.format(i=i), I), (f"{base}/up_proj", n.up.format(i=i), I)]
        gate, up = self.split(self.linear_group(x, f"{base}/gate_up_proj", parts, H, bias=self.spec.mlp.bias),
                              [I, I], f"{base}/gate_up_proj")
        act = self.activation(gate, f"{base}/act_fn")
        h = self.b.op("Mul", [act, up], f"{base}/Mul")
        (y,) = self.linear_group(h, f"{base}/down_proj", [(f"{base}/down_proj", n.down.format(i=i), H)], I,
                                 bias=self.spec.mlp.bias)
        return y

    def activation(self, x: ir.Value, node: str) -> ir.Value:
        act = self.spec.mlp.activation
        if act in ("silu", "swish"):
            s = self.b.op("Sigmoid", [x], f"{node}/Sigmoid")
            return self.b.op("Mul", [x, s], f"{node}/Mul")
        if act in ("gelu_pytorch_tanh", "gelu_new", "gelu_fast"):
            return self.b.op("FastGelu", [x], f"{node}/FastGelu", domain=MS)
        if act == "gelu":
            return self.b.op("Gelu", [x], f"{node}/Gelu", domain=MS)
        raise RecipeError(f"activation {act!r} is not supported yet")

    # -- embeddings ------------------------------------------------------------------------
    def embedding(self, input_ids: ir.Value) -> tuple[Storage, ir.Value]:
        """Emit the embedding lookup; returns (lm_head storage, hidden states)."""
        spec, n = self.spec, self.names
        V, H = spec.vocab_size, spec.hidden_size
        head_st = self.plan.storage(["/lm_head/MatMul", "lm_head"], "MatMul")
        embed_st = self.plan.storage(["/model/embed_tokens/Gather", "model.embed_tokens"], "Gather")
        self.expect(n.embed, (V, H))
        self.shared = self.plan.share_embeddings(spec, embed_st, head_st)
        if self.shared and head_st.quantized:
            x = self.shared_quantized_lookup(input_ids, head_st)
        elif embed_st.quantized:
            x = self.quantized_lookup(input_ids, embed_st)
        else:
            table = self.b.weights(W.float_table_job(self.source, "/model/embed_tokens", "model.embed_tokens.weight",
                                                     n.embed, (V, H), embed_st))[0]
            self.table = table
            x = self.b.op("Gather", [table, input_ids], "/model/embed_tokens/Gather")
        if spec.embedding_scale != 1.0:
            x = self.b.op("Mul", [x, self.b.const(spec.embedding_scale, self.io.np_dtype)], "/model/embed_tokens/Mul")
        return head_st, x

    def _lm_head_weight_name(self) -> str:
        n = self.names
        return n.embed if self.spec.tie_embeddings or not self.source.has(n.lm_head) else n.lm_head

    def gather_quantized(self, input_ids: ir.Value, ws: Sequence[ir.Value], st: Storage, K: int, node: str) -> ir.Value:
        b = self.b
        kb = W.k_blocks(K, st.block_size)
        flat = b.op("Reshape", [ws[0], b.const([self.spec.vocab_size, kb * st.block_size * st.bits // 8], np.int64)],
                    f"{node}/Reshape")
        x = b.op("GatherBlockQuantized", [flat, input_ids, *ws[1:]], f"{node}/GatherBlockQuantized", domain=MS,
                 bits=st.bits, block_size=st.block_size, gather_axis=0, quantize_axis=1)
        if kb * st.block_size != K:
            x = b.op("Slice", [x, b.const([0], np.int64), b.const([K], np.int64), b.const([-1], np.int64)], f"{node}/Slice")
        return x

    def shared_quantized_lookup(self, input_ids: ir.Value, st: Storage) -> ir.Value:
        spec = self.spec
        self.head_weights = self._quantized_head_weights(st)
        return self.gather_quantized(input_ids, self.head_weights, st, spec.hidden_size, "/model/embed_tokens")

    def _quantized_head_weights(self, st: Storage) -> tuple[ir.Value, ...]:
        V, H = self.spec.vocab_size, self.spec.hidden_size
        job = W.quant_matmul_job(self.source, "/lm_head", "lm_head", [self._lm_head_weight_name()], V, H, st,
                                 self.io.ir_dtype, self.io.np_dtype)
        return self.b.weights(job)

    def quantized_lookup(self, input_ids: ir.Value, st: Storage) -> ir.Value:
        V, H = self.spec.vocab_size, self.spec.hidden_size
        job = W.quant_matmul_job(self.source, "/model/embed_tokens", "model.embed_tokens", [self.names.embed], V, H, st,
                                 self.io.ir_dtype, self.io.np_dtype)
        return self.gather_quantized(input_ids, self.b.weights(job), st, H, "/model/embed_tokens")

    def lm_head(self, x: ir.Value, st: Storage) -> ir.Value:
        V, H = self.spec.vocab_size, self.spec.hidden_size
        if self.shared and st.quantized:
            return self.b.op("MatMulNBits", [x, *self.head_weights], "/lm_head/MatMul", domain=MS, K=H, N=V,
                             bits=st.bits, block_size=st.block_size, accuracy_level=st.accuracy_level)
        if self.shared:
            return self.b.op("FusedMatMul", [x, self.table], "/lm_head/MatMul", domain=MS, transB=1, alpha=1.0)
        return self.matmul(x, "/lm_head", [self._lm_head_weight_name().removesuffix(".weight")], [V], H, st)

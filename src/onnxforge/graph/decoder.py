"""Emit a decoder-only transformer for onnxruntime-genai from a ModelSpec.

`Decoder` adds the model-level pieces (inputs, the layers' state inputs, rotary tables, embedding, final
norm, lm_head) to the emitter (graph/emitter.py) and composes the layers: each is wired by the block shape
the spec names (graph/blocks.py) around its token mixer, chosen by the layer's kind (graph/kinds.py), and
its MLP. Nothing here asks which family it builds, nor which kind a layer is.

Node names follow the onnxruntime-genai builder so its exclusion lists keep working:
  /model/embed_tokens/Gather, /model/layers.{i}/input_layernorm/SkipLayerNorm,
  /model/layers.{i}/attn/qkv_proj/MatMul, /model/layers.{i}/attn/GroupQueryAttention,
  /model/layers.{i}/mlp/gate_up_proj/MatMul, /model/norm, /lm_head/MatMul
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnx_ir as ir

from ..archs.names import Part
from ..quant.storage import Storage
from . import weights as W
from .attention_extras import needs_positions
from .blocks import BLOCKS
from .builder import MS, TensorSlot, WeightJob
from .emitter import Emitter
from .kinds import state_inputs
from .layer_extras import after_block, per_layer_inputs
from .parts import AttnInputs, Stream, norm, rotary_before_attention
from .rope import cos_sin_cache


class Decoder(Emitter):
    """The whole model: `build()` emits it into `b`; `shared` and `notes` are for the build report."""

    # -- model -----------------------------------------------------------------------------
    def build(self) -> None:
        spec, b, io, plan = self.spec, self.b, self.io, self.plan
        self.left_out: list[str] = []  # checkpoint tensors the output-shaping options leave out on purpose
        if not plan.exclude_lm_head:  # an untied checkpoint without lm_head: refused before any read
            self.names.lm_head(spec.tie_embeddings)
        tokens, mask = self.model_inputs()
        self.past = state_inputs(self)
        seqlens_k, total_len = self.mask_to_lengths(mask)
        ctx = AttnInputs(seqlens_k, total_len, self.rotary_tables(total_len),
                         self.positions(tokens, seqlens_k, total_len), mask=mask)
        lm_head_store, x = self.embedding(tokens)
        self.per_layer = per_layer_inputs(self, tokens, x)  # (batch, seq, layers, width) or None
        block = BLOCKS[spec.block]
        h = Stream(x)
        for i in range(spec.num_layers):
            h = after_block(self, i, block(self, i, h, ctx))
        x, _ = norm(self, h, "final_norm", None, "/model/norm")
        if plan.exclude_lm_head or plan.include_hidden_states:  # the final norm's output, as the anchor's
            b.output(x, "hidden_states", io.ir_dtype, ["batch_size", "sequence_length", spec.hidden_size])
        if plan.exclude_lm_head:
            self._leave_out("the lm_head", self._lm_head_names())
            return
        if plan.prune_lm_head:  # the last position only: (B, S, H) -> (B, 1, H)
            x = b.op("Slice", [x, b.const([-1], np.int64), b.const([np.iinfo(np.int64).max], np.int64),
                               b.const([1], np.int64)], "/lm_head/prune/Slice")
        logits = self.lm_head(x, lm_head_store)
        seq = 1 if plan.prune_lm_head else "sequence_length"
        b.output(logits, "logits", io.ir_dtype, ["batch_size", seq, spec.vocab_size])

    def model_inputs(self) -> tuple[ir.Value, ir.Value]:
        """(input_ids (batch, seq) int64, attention_mask), or with exclude_embeds the embedding layer's output,
        inputs_embeds (batch, seq, hidden) in the activation dtype, after the mask: names and order the anchor's."""
        b, mask_shape = self.b, ["batch_size", "total_sequence_length"]
        if not self.plan.exclude_embeds:
            ids = b.input("input_ids", ir.DataType.INT64, ["batch_size", "sequence_length"])
            return ids, b.input("attention_mask", ir.DataType.INT64, mask_shape)
        mask = b.input("attention_mask", ir.DataType.INT64, mask_shape)
        return b.input("inputs_embeds", self.io.ir_dtype, ["batch_size", "sequence_length", self.spec.hidden_size]), mask

    def _leave_out(self, what: str, names: Sequence[str]) -> None:
        option = "exclude_embeds" if what == "the embedding" else "exclude_lm_head"
        names = [n for n in names if self.source.has(n)]
        self.left_out.extend(names)
        other = "the lm_head" if what == "the embedding" else "the embedding"
        both = self.plan.exclude_embeds and self.plan.exclude_lm_head
        unread = f"{', '.join(names)} not read" if names else \
            f"its weight is tied to {other}'s, {'left out too' if both else 'which still reads it'}"
        self.notes.append(f"{option}: {what} is left out of the model ({unread})")

    def _lm_head_names(self) -> list[str]:
        if self.spec.tie_embeddings:
            return []
        names = [f"{self.names.module('lm_head')}.weight"]
        return names + ([f"{self.names.module('lm_head')}.bias"] if self.spec.lm_head_bias else [])

    def mask_to_lengths(self, mask: ir.Value) -> tuple[ir.Value, ir.Value]:
        b, base = self.b, "/model/attn_mask_reformat/attn_mask_subgraph"
        total = b.op("ReduceSum", [mask, b.const([1], np.int64)], f"{base}/ReduceSum", keepdims=0)
        minus1 = b.op("Sub", [total, b.const(1, np.int64)], f"{base}/Sub")
        seqlens_k = b.op("Cast", [minus1], f"{base}/Sub/Cast", to=ir.DataType.INT32)
        shape = b.op("Shape", [mask], f"{base}/Shape")
        length = b.op("Gather", [shape, b.const(1, np.int64)], f"{base}/Gather", axis=0)
        total_len = b.op("Cast", [length], f"{base}/Gather/Cast", to=ir.DataType.INT32)
        return seqlens_k, total_len

    def positions(self, input_ids: ir.Value, seqlens_k: ir.Value, total_len: ir.Value) -> ir.Value | None:
        """(batch, seq) int64 position ids, only where a layer's rotary is applied outside GroupQueryAttention:
        those GQA itself uses, 0..S-1 for a first prompt (S == total length), else past length + 0..S-1."""
        spec, b, base = self.spec, self.b, "/model/pos_ids_reformat"
        if not any(rotary_before_attention(spec, i) or needs_positions(spec, i) for i in range(spec.num_layers)):
            return None
        seq = b.op("Gather", [b.op("Shape", [input_ids], f"{base}/Shape"), b.const(1, np.int64)], f"{base}/Gather",
                   axis=0)
        steps = b.op("Range", [b.const(0, np.int64), seq, b.const(1, np.int64)], f"{base}/Range")
        lengths = b.op("Cast", [seqlens_k], f"{base}/Cast", to=ir.DataType.INT64)
        past = b.op("Sub", [b.op("Add", [lengths, b.const(1, np.int64)], f"{base}/Add"), seq], f"{base}/Sub")
        later = b.op("Add", [b.op("Unsqueeze", [past, b.const([1], np.int64)], f"{base}/Unsqueeze"), steps],
                     f"{base}/Add_1")
        total = b.op("Cast", [total_len], f"{base}/Cast_1", to=ir.DataType.INT64)
        first = b.op("Equal", [seq, total], f"{base}/Equal")
        return b.op("Where", [first, b.op("Unsqueeze", [steps, b.const([0], np.int64)], f"{base}/Unsqueeze_1"), later],
                    f"{base}/Where")

    def rotary_tables(self, total_len: ir.Value) -> dict[str, tuple[ir.Value, ir.Value]]:
        """(cos, sin) per rotary table the layers use. LongRoPE switches to its long factors once the
        sequence passes original_max_position_embeddings, as transformers does."""
        used = sorted({layer.rope for layer in self.spec.layers if layer.rope is not None})
        tables = {}
        for key in used:
            rope = self.spec.rope_for(key)
            suffix = "" if key == "full_attention" else f"_{key}"
            short = self._cache_pair(rope, suffix, long=False)
            if rope.kind != "longrope" or rope.param("long_factor") is None:
                tables[key] = short
                continue
            long = self._cache_pair(rope, suffix + "_long", long=True)
            original = int(rope.param("original_max_position_embeddings", self.spec.context_length))
            node = f"/model/rotary_emb{suffix}/If"
            cond = self.b.op("Greater", [total_len, self.b.const(np.int32(original))], f"{node}/Greater")
            tables[key] = self.b.if_op(cond, long, short, node)
        return tables

    def _cache_pair(self, rope, suffix: str, long: bool) -> tuple[ir.Value, ir.Value]:
        spec, io = self.spec, self.io
        shape = (spec.context_length, rope.rotary_dim // 2)
        values = []
        for which, name in enumerate(("cos_cache", "sin_cache")):
            def produce(which=which):
                return [cos_sin_cache(rope, spec.context_length, long=long)[which].astype(io.np_dtype)]

            job = WeightJob("/model/rotary_emb", (TensorSlot(name + suffix, io.ir_dtype, shape),), produce, io.describe())
            values.append(self.b.weights(job)[0])
        return values[0], values[1]

    # -- embeddings ------------------------------------------------------------------------
    def embedding(self, input_ids: ir.Value) -> tuple[Storage, ir.Value]:
        """Emit the embedding lookup; returns (lm_head storage, hidden states)."""
        spec = self.spec
        V, H = spec.vocab_size, spec.hidden_size
        embed = self.names.module("embed")
        head_st = self.io if self.plan.exclude_lm_head else self.plan.storage(["/lm_head/MatMul", "lm_head"], "MatMul")
        if self.plan.exclude_embeds:  # the caller's embeddings, scaled as the embedding layer scales them
            self.shared = False
            tied = spec.tie_embeddings and not self.plan.exclude_lm_head  # the lm_head still reads it
            self._leave_out("the embedding", [] if tied else [f"{embed}.weight"])
            return head_st, input_ids
        embed_st = self.plan.storage(["/model/embed_tokens/Gather", embed], "Gather")
        self.expect(f"{embed}.weight", (V, H))
        self.shared = self.plan.share_embeddings(spec, embed_st, head_st)
        if self.shared and head_st.quantized and self.qdq:  # one DequantizeLinear [H, V]: the lm_head's and the table's
            ws = list(self._quantized_weights("/lm_head", "lm_head", self._lm_head_weight(), head_st))
            offsets = ws.pop() if head_st.offsets else None
            table = self.dequantize(ws, "/lm_head", head_st)
            self.head_weights = (table, offsets) if offsets is not None else (table,)
            x = self.gather_qdq(input_ids, table, offsets, head_st, axis=1)
        elif self.shared and head_st.quantized:
            self.head_weights = self._quantized_weights("/lm_head", "lm_head", self._lm_head_weight(), head_st)
            x = self.gather_quantized(input_ids, self.head_weights, head_st)
        elif embed_st.quantized and self.qdq:
            ws = list(self._quantized_weights("/model/embed_tokens", "model.embed_tokens", Part(f"{embed}.weight"),
                                              embed_st, axis=1))
            offsets = ws.pop() if embed_st.offsets else None
            table = self.dequantize(ws, "/model/embed_tokens", embed_st, axis=1)
            x = self.gather_qdq(input_ids, table, offsets, embed_st, axis=0)
        elif embed_st.quantized:
            ws = self._quantized_weights("/model/embed_tokens", "model.embed_tokens", Part(f"{embed}.weight"), embed_st)
            x = self.gather_quantized(input_ids, ws, embed_st)
        else:
            self.table = self.b.weights(W.float_table_job(self.source, "/model/embed_tokens", "model.embed_tokens.weight",
                                                          f"{embed}.weight", (V, H), embed_st))[0]
            x = self.b.op("Gather", [self.table, input_ids], "/model/embed_tokens/Gather")
        if spec.embedding_scale != 1.0:
            x = self.b.op("Mul", [x, self.scalar(spec.embedding_scale)], "/model/embed_tokens/Mul")
        return head_st, x

    def _lm_head_weight(self) -> Part:
        return Part(self.names.lm_head(self.spec.tie_embeddings))

    def _quantized_weights(self, label: str, prefix: str, part: Part, st: Storage, axis: int = 0) -> tuple[ir.Value, ...]:
        """MatMulNBits' arrays of a (V, H) table, or with use_qdq DequantizeLinear's, blocked along `axis` of the
        [H, V] weight the lm_head multiplies (0) or of the [V, H] table a Gather reads (1)."""
        V, H = self.spec.vocab_size, self.spec.hidden_size
        if self.qdq:
            return self.b.weights(W.qdq_matmul_job(self.source, label, prefix, [part], V, H, st, self.io.ir_dtype,
                                                   self.io.np_dtype, axis=axis))
        return self.b.weights(W.quant_matmul_job(self.source, label, prefix, [part], V, H, st, self.io.ir_dtype,
                                                 self.io.np_dtype))

    def gather_qdq(self, input_ids: ir.Value, table: ir.Value, offsets: ir.Value | None, st: Storage,
                   axis: int) -> ir.Value:
        """use_qdq's embedding lookup: Gather on the DequantizeLinear'd table, [V, H] rows (axis 0), or the columns of
        the lm_head's shared [H, V] weight (axis 1, transposed to (batch, sequence, H)); a row's per-block offsets
        (GGUF K-quants) are added to each of its values."""
        b, K, node = self.b, self.spec.hidden_size, "/model/embed_tokens"
        x = b.op("Gather", [table, input_ids], f"{node}/Gather", axis=axis)
        if axis == 1:
            x = b.op("Transpose", [x], f"{node}/Transpose", perm=[1, 2, 0])
        if offsets is not None:
            rows = b.op("Gather", [offsets, input_ids], f"{node}/offsets/Gather", axis=0)  # (batch, sequence, K/block)
            block = b.const(np.arange(K, dtype=np.int64) // st.block_size)
            each = b.op("Gather", [rows, block], f"{node}/offsets/Gather_1", axis=2)
            x = b.op("Add", [x, each], f"{node}/offsets/Add")
        return x

    def gather_quantized(self, input_ids: ir.Value, ws: Sequence[ir.Value], st: Storage) -> ir.Value:
        b, K, node = self.b, self.spec.hidden_size, "/model/embed_tokens"
        kb = W.k_blocks(K, st.block_size)
        flat = b.op("Reshape", [ws[0], b.const([self.spec.vocab_size, kb * st.block_size * st.bits // 8], np.int64)],
                    f"{node}/Reshape")
        ws, offsets = (ws[:-1], ws[-1]) if st.offsets else (ws, None)
        x = b.op("GatherBlockQuantized", [flat, input_ids, *ws[1:]], f"{node}/GatherBlockQuantized", domain=MS,
                 bits=st.bits, block_size=st.block_size, gather_axis=0, quantize_axis=1)
        if offsets is not None:  # each row's per-block offsets, added to its block: (b, s, kb, block) + (b, s, kb, 1)
            rows = b.op("Gather", [offsets, input_ids], f"{node}/offsets/Gather", axis=0)
            blocks = b.op("Reshape", [x, b.const([0, 0, kb, st.block_size], np.int64)], f"{node}/offsets/Reshape")
            x = b.op("Add", [blocks, b.op("Unsqueeze", [rows, b.const([-1], np.int64)], f"{node}/offsets/Unsqueeze")],
                     f"{node}/offsets/Add")
            x = b.op("Reshape", [x, b.const([0, 0, kb * st.block_size], np.int64)], f"{node}/offsets/Reshape_1")
        if kb * st.block_size != K:
            x = b.op("Slice", [x, b.const([0], np.int64), b.const([K], np.int64), b.const([-1], np.int64)], f"{node}/Slice")
        return x

    def lm_head(self, x: ir.Value, st: Storage) -> ir.Value:
        spec, b = self.spec, self.b
        V, H = spec.vocab_size, spec.hidden_size
        if self.shared and st.quantized:
            y = self.matmul_nbits(x, self.head_weights, "/lm_head", H, V, st)
        elif self.shared:
            y = b.op("FusedMatMul", [x, self.table], "/lm_head/MatMul", domain=MS, transB=1, alpha=1.0)
        else:
            y = self.matmul(x, "/lm_head", [self._lm_head_weight()], [V], H, st)
        if spec.lm_head_bias:
            y = self.add_bias(y, "/lm_head", [Part(f"{self.names.module('lm_head')}.bias")], V)
        if spec.logit_scale != 1.0:
            y = b.op("Div", [y, self.scalar(spec.logit_scale)], "/lm_head/Div")
        if spec.final_softcap:
            cap = self.scalar(spec.final_softcap)
            y = b.op("Mul", [b.op("Tanh", [b.op("Div", [y, cap], "/lm_head/softcap/Div")], "/lm_head/softcap/Tanh"),
                             cap], "/lm_head/softcap/Mul")
        return y

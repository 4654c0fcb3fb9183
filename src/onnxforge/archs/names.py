"""One tensor-role table: canonical role -> every family's Hugging Face spelling and llama.cpp's GGUF one.

A role names a module (a Linear, a norm, the embedding); its tensors are `<module>.weight` and
`<module>.bias`. `{i}` is the layer index, `{e}` an expert's. Experts stacked in one 3D tensor are
parameters of their own name (transformers 5's `mlp.experts.gate_up_proj`) or a module's weight
(Granite's `input_linear`): `Names.tensor` finds either. Spellings are tried in order against the checkpoint, so
one table serves every family; a family pins a spelling only where two roles share one (a
pre-norm model's `post_attention_layernorm` is the norm before its MLP, a sandwich model's is the
norm after its attention).

Fused checkpoint tensors (Phi-3 `qkv_proj`, `gate_up_proj`) are roles too: where a checkpoint has
no `q_proj`, the q rows of `qkv_proj` stand in for it, read lazily as a row range.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Mapping, Protocol, Sequence

from ..errors import CheckpointError

L = "model.layers.{i}."


@dataclass(frozen=True)
class Role:
    hf: tuple[str, ...]  # module spellings, tried in order
    gguf: str | None = None  # llama.cpp's tensor base name (`blk.{i}.attn_q`), without `.weight`


ROLES: dict[str, Role] = {
    # model-level
    "embed": Role(("model.embed_tokens",), "token_embd"),
    "final_norm": Role(("model.norm", "model.final_layernorm", "model.embedding_norm"), "output_norm"),  # LFM2
    "lm_head": Role(("lm_head",), "output"),
    # norms (block shapes ask for the ones they use)
    "attn_norm": Role((L + "input_layernorm", L + "operator_norm"), "blk.{i}.attn_norm"),  # operator_norm: LFM2
    "ffn_norm": Role((L + "post_attention_layernorm", L + "ffn_norm"), "blk.{i}.ffn_norm"),  # sandwich ones pin theirs
    "attn_post_norm": Role((L + "post_attention_layernorm",), "blk.{i}.post_attention_norm"),
    "ffn_post_norm": Role((L + "post_feedforward_layernorm",), "blk.{i}.post_ffw_norm"),
    # attention
    "q": Role((L + "self_attn.q_proj",), "blk.{i}.attn_q"),
    "k": Role((L + "self_attn.k_proj",), "blk.{i}.attn_k"),
    "v": Role((L + "self_attn.v_proj",), "blk.{i}.attn_v"),
    "qkv": Role((L + "self_attn.qkv_proj",), "blk.{i}.attn_qkv"),  # Phi-3
    "o": Role((L + "self_attn.o_proj", L + "self_attn.dense", L + "self_attn.out_proj"),  # dense: Phi-2
              "blk.{i}.attn_output"),
    "q_norm": Role((L + "self_attn.q_norm", L + "self_attn.q_layernorm"), "blk.{i}.attn_q_norm"),
    "k_norm": Role((L + "self_attn.k_norm", L + "self_attn.k_layernorm"), "blk.{i}.attn_k_norm"),
    "sinks": Role((L + "self_attn.sinks",), "blk.{i}.attn_sinks"),  # a parameter (Names.tensor)
    "layer_scalar": Role((L + "layer_scalar",)),  # Gemma 4: a (1,) buffer per layer (Names.tensor)
    # Gemma 4's MoE block beside the dense MLP: its norms, the router's scale vectors (parameters)
    "ffn_post_norm_1": Role((L + "post_feedforward_layernorm_1",)),
    "ffn_pre_norm_2": Role((L + "pre_feedforward_layernorm_2",)),
    "ffn_post_norm_2": Role((L + "post_feedforward_layernorm_2",)),
    "router_scale": Role((L + "router.scale",)),
    "expert_scale": Role((L + "router.per_expert_scale",)),
    # Gemma 4's per-layer inputs: a table of every layer's input embedding, a projection of the embeddings
    # and its norm; per layer a gate, a projection back and a norm
    "ple_embed": Role(("model.embed_tokens_per_layer",)),
    "ple_model_proj": Role(("model.per_layer_model_projection",)),
    "ple_model_norm": Role(("model.per_layer_projection_norm",)),
    "ple_gate": Role((L + "per_layer_input_gate",)),
    "ple_proj": Role((L + "per_layer_projection",)),
    "ple_norm": Role((L + "post_per_layer_input_norm",)),
    # MLP; fc1/fc2: Phi-2's plain MLP
    "gate": Role((L + "mlp.gate_proj", L + "feed_forward.w1"), "blk.{i}.ffn_gate"),  # feed_forward.w*: LFM2
    "up": Role((L + "mlp.up_proj", L + "mlp.fc1", L + "feed_forward.w3"), "blk.{i}.ffn_up"),
    "gate_up": Role((L + "mlp.gate_up_proj",)),  # Phi-3 (its GGUF stores it as ffn_up)
    "down": Role((L + "mlp.down_proj", L + "mlp.fc2", L + "feed_forward.w2"), "blk.{i}.ffn_down"),
    # short gated convolution (LFM2): in_proj -> (B, C, x), depthwise causal conv of B * x, C * conv -> out_proj
    "conv_in": Role((L + "conv.in_proj",), "blk.{i}.shortconv.in_proj"),
    "conv_kernel": Role((L + "conv.conv",), "blk.{i}.shortconv.conv"),
    "conv_out": Role((L + "conv.out_proj",), "blk.{i}.shortconv.out_proj"),
    # Mamba2 (Granite 4 hybrid): in_proj -> (z, xBC, dt), depthwise causal conv of xBC, SSM scan, gated norm, out_proj;
    # A_log, D and dt_bias are parameters (Names.tensor)
    "mamba_in": Role((L + "mamba.in_proj",)),
    "mamba_conv": Role((L + "mamba.conv1d",)),
    "mamba_norm": Role((L + "mamba.norm",)),
    "mamba_out": Role((L + "mamba.out_proj",)),
    "mamba_A_log": Role((L + "mamba.A_log",)),
    "mamba_D": Role((L + "mamba.D",)),
    "mamba_dt_bias": Role((L + "mamba.dt_bias",)),
    # gated delta-net (Qwen3.5 / Qwen3-Next linear attention): in_proj_qkv (or Qwen3-Next's per-key-head
    # interleaved in_proj_qkvz / in_proj_ba), conv1d over [q, k, v], gated RMS norm, out_proj; A_log and
    # dt_bias are parameters (Names.tensor)
    "la_qkv": Role((L + "linear_attn.in_proj_qkv",)),
    "la_z": Role((L + "linear_attn.in_proj_z",)),
    "la_b": Role((L + "linear_attn.in_proj_b",)),
    "la_a": Role((L + "linear_attn.in_proj_a",)),
    "la_qkvz": Role((L + "linear_attn.in_proj_qkvz",)),
    "la_ba": Role((L + "linear_attn.in_proj_ba",)),
    "la_conv": Role((L + "linear_attn.conv1d",)),
    "la_norm": Role((L + "linear_attn.norm",)),
    "la_out": Role((L + "linear_attn.out_proj",)),
    "la_A_log": Role((L + "linear_attn.A_log",)),
    "la_dt_bias": Role((L + "linear_attn.dt_bias",)),
    # multi-head latent attention (DeepSeek-V2/V3, Kimi-K2): q_a_proj -> q_a_layernorm -> q_b_proj (or q_proj),
    # kv_a_proj_with_mqa -> [latent -> kv_a_layernorm -> kv_b_proj, rotary key]
    "q_a": Role((L + "self_attn.q_a_proj",)),
    "q_a_norm": Role((L + "self_attn.q_a_layernorm",)),
    "q_b": Role((L + "self_attn.q_b_proj",)),
    "kv_a": Role((L + "self_attn.kv_a_proj_with_mqa",)),
    "kv_a_norm": Role((L + "self_attn.kv_a_layernorm",)),
    "kv_b": Role((L + "self_attn.kv_b_proj",)),
    # mixture of experts: the router, one module per expert, or experts stacked (E, N, K) in one tensor
    "router": Role((L + "mlp.gate", L + "block_sparse_moe.gate", L + "mlp.router", L + "block_sparse_moe.router.layer",
                    L + "block_sparse_moe.router", L + "feed_forward.gate"), "blk.{i}.ffn_gate_inp"),  # feed_forward.*: LFM2-MoE
    "expert_gate": Role((L + "mlp.experts.{e}.gate_proj", L + "block_sparse_moe.experts.{e}.w1",
                         L + "feed_forward.experts.{e}.w1")),
    "expert_up": Role((L + "mlp.experts.{e}.up_proj", L + "block_sparse_moe.experts.{e}.w3",
                       L + "feed_forward.experts.{e}.w3")),
    "expert_down": Role((L + "mlp.experts.{e}.down_proj", L + "block_sparse_moe.experts.{e}.w2",
                         L + "feed_forward.experts.{e}.w2")),
    "experts_gate_up": Role((L + "mlp.experts.gate_up_proj", L + "block_sparse_moe.experts.gate_up_proj",
                             L + "block_sparse_moe.input_linear", L + "feed_forward.experts.gate_up_proj"),
                            "blk.{i}.ffn_gate_up_exps"),
    "experts_gate": Role((L + "mlp.experts.gate_proj",), "blk.{i}.ffn_gate_exps"),  # llama.cpp stacks them apart
    "experts_up": Role((L + "mlp.experts.up_proj",), "blk.{i}.ffn_up_exps"),
    "experts_down": Role((L + "mlp.experts.down_proj", L + "block_sparse_moe.experts.down_proj",
                          L + "block_sparse_moe.output_linear", L + "feed_forward.experts.down_proj"),
                         "blk.{i}.ffn_down_exps"),
    "selection_bias": Role((L + "mlp.moe_statics.e_score_correction_bias",
                            L + "mlp.gate.moe_statics.e_score_correction_bias", L + "feed_forward.expert_bias"),
                           "blk.{i}.exp_probs_b"),  # expert_bias: LFM2-MoE
    "shared_gate": Role((L + "mlp.shared_expert.gate_proj", L + "mlp.shared_experts.gate_proj"), "blk.{i}.ffn_gate_shexp"),
    "shared_up": Role((L + "mlp.shared_expert.up_proj", L + "mlp.shared_experts.up_proj"), "blk.{i}.ffn_up_shexp"),
    "shared_gate_up": Role((L + "shared_mlp.input_linear",)),  # Granite 4 hybrid: gate then up rows
    "shared_down": Role((L + "mlp.shared_expert.down_proj", L + "mlp.shared_experts.down_proj",
                         L + "shared_mlp.output_linear"), "blk.{i}.ffn_down_shexp"),
    "shared_expert_gate": Role((L + "mlp.shared_expert_gate",), "blk.{i}.ffn_gate_inp_shexp"),
}

# A role that a checkpoint may only have as rows of a fused tensor: role -> (fused role, its parts in order).
FUSED: dict[str, tuple[str, tuple[str, ...]]] = {
    "q": ("qkv", ("q", "k", "v")),
    "k": ("qkv", ("q", "k", "v")),
    "v": ("qkv", ("q", "k", "v")),
    "gate": ("gate_up", ("gate", "up")),
    "up": ("gate_up", ("gate", "up")),
    "shared_gate": ("shared_gate_up", ("shared_gate", "shared_up")),
    "shared_up": ("shared_gate_up", ("shared_gate", "shared_up")),
}


@dataclass(frozen=True)
class Part:
    """A checkpoint tensor, or a range of its rows (`rows=(start, stop)`)."""

    name: str
    rows: tuple[int, int] | None = None

    def with_suffix(self, suffix: str) -> "Part":
        return Part(self.name.rsplit(".", 1)[0] + "." + suffix, self.rows)

    def __str__(self) -> str:
        return self.name if self.rows is None else f"{self.name}[{self.rows[0]}:{self.rows[1]}]"

    @property
    def module(self) -> str:
        return self.name.rsplit(".", 1)[0]


class _Has(Protocol):
    def has(self, name: str) -> bool: ...


class Names:
    """Resolves roles against one checkpoint, with a family's pinned spellings and prefix rewrites."""

    def __init__(self, source: _Has, pinned: Mapping[str, str] | None = None,
                 rewrites: Sequence[tuple[str, str]] = ()):
        self.source = source
        self.pinned = dict(pinned or {})
        self.rewrites = tuple(rewrites)

    def spellings(self, role: str) -> tuple[str, ...]:
        if role in self.pinned:
            return (self.pinned[role],)
        return ROLES[role].hf

    def _variants(self, spelling: str) -> Iterator[str]:
        yield spelling
        for old, new in self.rewrites:
            if spelling.startswith(old):
                yield new + spelling[len(old):]

    def module(self, role: str, i: int | None = None, *, required: bool = True, e: int | None = None) -> str | None:
        """The module name of `role` in this checkpoint (has `.weight` or `.bias`), or None."""
        for spelling in self.spellings(role):
            for name in self._variants(spelling.format(i=i, e=e)):
                if self.source.has(f"{name}.weight") or self.source.has(f"{name}.bias"):
                    return name
        if required:
            first, *others = [f"{s.format(i=i, e=e)}.weight" for s in self.spellings(role)]
            also = f" (nor {', '.join(others)})" if others else ""
            raise CheckpointError(f"tensor {first!r} is missing from the checkpoint{also}; "
                                  "the download may be incomplete, or config.json does not match the weights")
        return None

    def tensor(self, role: str, i: int | None = None, suffix: str = "") -> str | None:
        """The tensor `role` names itself, as a parameter (`<spelling><suffix>`) or as a module's
        weight (`<spelling>.weight<suffix>`), or None. `suffix`: `_bias`, `_blocks` of a parameter."""
        for spelling in self.spellings(role):
            for name in self._variants(spelling.format(i=i)):
                for candidate in (name + suffix, f"{name}.weight{suffix}"):
                    if self.source.has(candidate):
                        return candidate
        return None

    def weight(self, role: str, i: int | None = None) -> str:
        return f"{self.module(role, i)}.weight"

    def lm_head(self, tied: bool) -> str:
        """The weight the output projection reads: the embedding's where the embeddings are tied, else
        lm_head's; an untied checkpoint without it is an error naming it, never a silent tie."""
        if tied:
            return self.weight("embed")
        head = self.module("lm_head", required=False)
        if head is None or not self.source.has(f"{head}.weight"):
            raise CheckpointError("tensor 'lm_head.weight' is missing from the checkpoint, and config.json says the "
                                  "output projection is its own (tie_word_embeddings is false or, for this family, "
                                  "false when missing); the download may be incomplete, or config.json does not "
                                  "match the weights (set tie_word_embeddings: true if the model ties them)")
        return f"{head}.weight"

    def has(self, role: str, i: int | None = None, suffix: str = "weight") -> bool:
        m = self.module(role, i, required=False)
        return m is not None and self.source.has(f"{m}.{suffix}")

    def linear(self, roles: Sequence[str], sizes: Sequence[int], i: int | None = None) -> list[Part]:
        """The `.weight` part of each role; a role the checkpoint has only inside a fused tensor
        becomes that tensor's rows. `sizes` are the roles' output sizes (the fused tensor's row split)."""
        size_of = dict(zip(roles, sizes))
        parts = []
        for role in roles:
            module = self.module(role, i, required=role not in FUSED)
            if module is not None:
                parts.append(Part(f"{module}.weight"))
                continue
            fused, members = FUSED[role]
            missing = [m for m in members if m not in size_of]
            if missing:
                raise ValueError(f"row split of {fused} needs the sizes of {missing}")
            fused_module = self.module(fused, i, required=False)
            if fused_module is None:
                self.module(role, i)  # raises, naming the unfused spelling
            start = sum(size_of[m] for m in members[:members.index(role)])
            parts.append(Part(f"{fused_module}.weight", (start, start + size_of[role])))
        return parts


def gguf_names(overrides: Mapping[str, str | None] | None = None) -> dict[str, str]:
    """GGUF tensor base name -> role (a family may rename a role's GGUF spelling, or drop it with None)."""
    table = {role: r.gguf for role, r in ROLES.items()}
    table.update(overrides or {})
    return {g: role for role, g in table.items() if g}

"""Per-model-type quantization templates: what is never quantized.

Which projections form a packed group (q/k/v, gate/up) is decided by the emitter: they pack when
the recipe stores them alike.

Plain data with glob patterns over ONNX node names and Hugging Face module names. Users may
register their own; a duplicate name is an error.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

from .recipe import Recipe
from .registry import Registry


@dataclass(frozen=True)
class Template:
    name: str
    keep_float: tuple[str, ...] = ()
    doc: str = ""


_TEMPLATES: Registry[Template] = Registry("template")


def register_template(t: Template) -> None:
    _TEMPLATES.register(t.name, t)


def unregister_template(name: str) -> None:
    _TEMPLATES.unregister(name)


def get_template(name: str) -> Template:
    return _TEMPLATES.get(name)


def templates() -> dict[str, Template]:
    return _TEMPLATES.all()


def template_for(model_type: str) -> Template:
    return templates().get(model_type) or get_template("default")


def apply_template(recipe: Recipe, name: str) -> Recipe:
    t = get_template(name)
    return replace(recipe, template_float=tuple(dict.fromkeys(recipe.template_float + t.keep_float)))


_ROUTERS = ("*/moe/gate/*", "*.mlp.gate", "*router*", "*.block_sparse_moe.gate")
_SHARED_GATES = ("*shared_expert_gate*",)
# gated delta-net decay and update-rate projections (a few rows each; the decay is exponentiated), as the anchor
_DELTA_GATES = ("*/linear_attn/a_proj/*", "*/linear_attn/b_proj/*", "*.linear_attn.in_proj_a", "*.linear_attn.in_proj_b",
                "*.linear_attn.in_proj_ba")
for _t in (
    Template("default", doc="dense decoders: every linear layer may be quantized"),
    Template("llama", doc="Llama / SmolLM2: every linear layer may be quantized"),
    Template("mistral", doc="Mistral: every linear layer may be quantized"),
    Template("qwen2", doc="Qwen2: every linear layer may be quantized"),
    Template("qwen3", doc="Qwen3: every linear layer may be quantized (q/k norms are never weights of a MatMul)"),
    Template("mixtral", keep_float=_ROUTERS, doc="Mixtral: routers stay float"),
    Template("qwen3_moe", keep_float=_ROUTERS, doc="Qwen3-MoE: routers stay float"),
    Template("gpt_oss", keep_float=_ROUTERS, doc="GPT-OSS: routers stay float"),
    Template("qwen2_moe", keep_float=_ROUTERS + _SHARED_GATES, doc="Qwen2-MoE: routers and shared-expert gates stay float"),
    Template("olmoe", keep_float=_ROUTERS, doc="OLMoE: routers stay float"),
    Template("granitemoe", keep_float=_ROUTERS, doc="Granite-MoE: routers stay float"),
    Template("ernie4_5_moe", keep_float=_ROUTERS, doc="ERNIE 4.5 MoE: routers stay float"),
    Template("phimoe", keep_float=_ROUTERS, doc="PhiMoE: routers stay float"),
    Template("qwen3_5_text", keep_float=_DELTA_GATES, doc="Qwen3.5: the linear attention's a/b gate projections stay float"),
    Template("qwen3_5_moe_text", keep_float=_DELTA_GATES + _ROUTERS + _SHARED_GATES,
             doc="Qwen3.5-MoE, Qwen3-Next: linear-attention gates, routers and shared-expert gates stay float"),
):
    register_template(_t)

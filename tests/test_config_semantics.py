"""config.json files that used to build a silently wrong model (issue 23): each one is fed as a
config.json that transformers loads into the model it runs, and the onnxforge build must equal that
model (fp32 logits within 1e-4 over a prefill and cached decode steps, greedy tokens equal) or be refused.

(a) Qwen2 / Qwen3 with use_sliding_window and max_window_layers but no layer_types (as transformers 4.x
    saved them): only layers >= max_window_layers slide.
(b) sliding_window without a use_sliding_window key: transformers' default is false, no layer slides.
(c) tie_word_embeddings false (or missing where the family's default is false) and no lm_head.weight: a
    CheckpointError naming the tensor, not a model tied to the embedding; missing where the default is
    true (Gemma): tied, as transformers ties it.
"""
from __future__ import annotations

import json

import pytest
from family_check import check_fp32

import onnxforge
from onnxforge.archs.registry import architecture_for
from onnxforge.errors import CheckpointError

torch = pytest.importorskip("torch")

WINDOW = 4  # below the 16-token prompt, so a wrong window changes the logits
QWEN = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=32, intermediate_size=128,
            num_hidden_layers=4, tie_word_embeddings=False)


@pytest.fixture
def ckpt(tmp_path):
    return tmp_path / "ckpt"  # the builds write beside it, under tmp_path


def edit_config(folder, drop=(), **changes) -> dict:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg = {k: v for k, v in cfg.items() if k not in drop}
    cfg.update(changes)
    path.write_text(json.dumps(cfg, indent=2))
    return cfg


def drop_tensor(folder, name: str) -> None:
    from safetensors.numpy import load_file, save_file

    path = folder / "model.safetensors"
    tensors = load_file(str(path))
    del tensors[name]
    save_file(tensors, str(path), metadata={"format": "pt"})


@pytest.mark.parametrize("cls", ["Qwen2Config", "Qwen3Config"])
def test_max_window_layers_without_layer_types(tmp_path, ckpt, cls):
    from tiny import make_model

    model = make_model(cls, ckpt, cls=cls, **QWEN, use_sliding_window=True, sliding_window=WINDOW,
                       max_window_layers=2)
    assert model.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 2  # what transformers runs
    cfg = edit_config(ckpt, drop=("layer_types",))
    assert architecture_for(cfg).make_spec(cfg).layer_windows == (0, 0, WINDOW, WINDOW)
    check_fp32(ckpt, model, tmp_path / "onnx")


@pytest.mark.parametrize("cls", ["Qwen2Config", "Qwen3Config"])
def test_sliding_window_without_use_sliding_window(tmp_path, ckpt, cls):
    from tiny import make_model

    model = make_model(cls, ckpt, cls=cls, **QWEN, sliding_window=WINDOW)
    assert model.config.use_sliding_window is False and set(model.config.layer_types) == {"full_attention"}
    cfg = edit_config(ckpt, drop=("layer_types", "use_sliding_window"), sliding_window=WINDOW)
    assert architecture_for(cfg).make_spec(cfg).layer_windows == (0,) * 4
    check_fp32(ckpt, model, tmp_path / "onnx")


@pytest.mark.parametrize("tie", [False, None])  # None: the key is missing (LlamaConfig's default is false)
def test_untied_without_lm_head_is_refused(tmp_path, ckpt, tie):
    from tiny import make_model

    make_model("llama", ckpt)
    drop_tensor(ckpt, "lm_head.weight")
    edit_config(ckpt, drop=("tie_word_embeddings",), **({} if tie is None else {"tie_word_embeddings": tie}))
    for precision in ("fp32", "int4"):
        with pytest.raises(CheckpointError, match="'lm_head.weight' is missing"):
            onnxforge.build(ckpt, tmp_path / f"onnx-{precision}", precision)


def test_missing_tie_key_uses_the_family_default(tmp_path, ckpt):
    """Gemma's config class ties by default: a config.json without the key builds tied, as transformers runs it."""
    from tiny import make_model

    model = make_model("gemma", ckpt, cls="GemmaConfig", hidden_size=64, num_attention_heads=2,
                       num_key_value_heads=1, head_dim=32, intermediate_size=97, num_hidden_layers=2,
                       tie_word_embeddings=True)
    edit_config(ckpt, drop=("tie_word_embeddings",))
    import transformers

    assert transformers.AutoConfig.from_pretrained(ckpt).tie_word_embeddings is True
    check_fp32(ckpt, model, tmp_path / "onnx")


# Risky variants the differential test (tests/test_config_diff.py) found, each built from a config.json as
# it is saved in the wild and compared with the model transformers runs from it. make: the tiny model's
# config (transformers derives what it runs from it); drop / set: the edit to the saved config.json.
QWEN2_MOE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=2, intermediate_size=80,
                 moe_intermediate_size=32, shared_expert_intermediate_size=48, num_hidden_layers=4, num_experts=6,
                 num_experts_per_tok=2, norm_topk_prob=False, mlp_only_layers=[0])
PHIMOE_LONGROPE = {"rope_type": "longrope", "rope_theta": 10000.0, "original_max_position_embeddings": 16,
                   "short_factor": [1.0 + 0.2 * i for i in range(8)], "long_factor": [3.0 + i for i in range(8)],
                   "short_mscale": 1.25, "long_mscale": 1.25}
RISKY = {
    # PhimoeRotaryEmbedding: the short factors at every length, cos/sin times short_mscale / long_mscale (not
    # LongRoPE's attention factor); the 16-token prompt and its decode steps cross original_max_position_embeddings
    "phimoe_longrope_mscale": (dict(cls="PhimoeConfig", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                                    intermediate_size=48, num_hidden_layers=2, num_local_experts=4,
                                    num_experts_per_tok=2, rope_parameters=PHIMOE_LONGROPE), (), {}),
    # Qwen2-MoE derives its sliding layers its own way: the even layers below max_window_layers
    "qwen2_moe_max_window_layers": (dict(cls="Qwen2MoeConfig", **QWEN2_MOE, use_sliding_window=True,
                                         sliding_window=WINDOW, max_window_layers=3), ("layer_types",), {}),
    # LlamaRotaryEmbedding's default table ignores partial_rotary_factor: the whole head rotates
    "llama_partial_rotary_ignored": (dict(cls="LlamaConfig", **{**QWEN, "head_dim": 16}), (),
                                     {"partial_rotary_factor": 0.5}),
    # LlamaRMSNorm reads rms_norm_eps only (default 1e-6); a layer_norm_eps key is not its epsilon
    "llama_layer_norm_eps_not_read": (dict(cls="LlamaConfig", **QWEN), ("rms_norm_eps",), {"layer_norm_eps": 0.5}),
    # LlamaMLP's activation is hidden_act; a hidden_activation key (Gemma 2 / 3 spell it so) is not read
    "llama_hidden_activation_not_read": (dict(cls="LlamaConfig", **QWEN), (),
                                         {"hidden_activation": "gelu_pytorch_tanh"}),
    # Qwen3Config's head_dim is 128 when config.json has none (not hidden_size / heads = 16)
    "qwen3_head_dim_default": (dict(cls="Qwen3Config", **{**QWEN, "head_dim": 128}), ("head_dim",), {}),
    # MistralAttention has no biases whatever attention_bias says
    "mistral_attention_bias_not_read": (dict(cls="MistralConfig", **QWEN, sliding_window=WINDOW), (),
                                        {"attention_bias": True}),
    # Qwen2MLP has no biases whatever mlp_bias says
    "qwen2_mlp_bias_not_read": (dict(cls="Qwen2Config", **QWEN), (), {"mlp_bias": True}),
    # Gemma3TextConfig: a flat rope_parameters and a rope_scaling spelled with the legacy `type` key are not read
    "gemma3_flat_rope_and_legacy_type_not_read": (
        dict(cls="Gemma3TextConfig", hidden_size=64, num_attention_heads=2, num_key_value_heads=1, head_dim=32,
             intermediate_size=97, num_hidden_layers=3, sliding_window=WINDOW, query_pre_attn_scalar=20,
             tie_word_embeddings=False, layer_types=["sliding_attention", "full_attention", "sliding_attention"]),
        ("rope_parameters",), {"rope_scaling": {"type": "linear", "factor": 4.0}, "rope_theta": 50000.0}),
}


@pytest.mark.parametrize("name", list(RISKY))
def test_risky_variant_matches_transformers(tmp_path, ckpt, name):
    import transformers
    from tiny import make_model

    make, drop, changes = RISKY[name]
    model = make_model(name, ckpt, **make)
    edit_config(ckpt, drop=drop, **changes)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()
    for (k, a), b in zip(model.state_dict().items(), reloaded.state_dict().values()):
        assert torch.equal(a, b), k
    check_fp32(ckpt, reloaded, tmp_path / "onnx")

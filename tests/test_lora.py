"""LoRA adapters (issue 26 item 2): `--adapter` (branches switched at run time by onnxruntime-genai's multi-LoRA
runtime, one NAME.onnx_adapter file each) and `--merge-adapter` (folded into the weights before they are stored),
against transformers + peft (peft is test-only: the producers extra) on a tiny random Qwen2 (q/k/v biases)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("peft", reason="peft (pip install -e '.[producers]') makes the test adapters")
og = pytest.importorskip("onnxruntime_genai")

import tiny  # noqa: E402

from onnxforge.cli import main  # noqa: E402

PROMPT = [5, 17, 42, 9, 100, 3, 77, 250, 31, 8, 64, 12]
NEW = 8
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _adapter(base: Path, out: Path, seed: int, save: dict | None = None, **config) -> Path:
    """A random (init_lora_weights=False: B is not zero) PEFT LoRA adapter of the model in `base`, saved by peft."""
    import torch
    import transformers
    from peft import LoraConfig, get_peft_model

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(init_lora_weights=False, lora_dropout=0.0, **config))
    peft_model.save_pretrained(out, **(save or {}))
    return out


@pytest.fixture(scope="module")
def lora(tmp_path_factory):
    """(base folder, {adapter name: folder}) for a tiny Qwen2 and two adapters that differ in rank, targets and
    scaling (b: rslora, a rank_pattern and an alpha_pattern)."""
    root = tmp_path_factory.mktemp("lora")
    base = root / "base"
    tiny.make_model("qwen2", base)
    adapters = {
        "ad_a": _adapter(base, root / "ad_a", 1, r=4, lora_alpha=8, target_modules=ALL),
        "ad_b": _adapter(base, root / "ad_b", 2, r=8, lora_alpha=4, use_rslora=True, rank_pattern={"down_proj": 2},
                         alpha_pattern={"v_proj": 16}, target_modules=["q_proj", "v_proj", "down_proj"]),
    }
    return base, adapters


def _reference(base: Path, adapter: Path | None = None, merge: bool = False, stored: Path | None = None):
    """transformers (fp32) on the base, optionally holding a build's stored weights, with an adapter through peft."""
    import transformers
    from peft import PeftModel

    model = transformers.AutoModelForCausalLM.from_pretrained(base).eval()
    if stored is not None:
        from onnxforge.verify.stored import load_stored_weights

        load_stored_weights(model, stored)
    if adapter is None:
        return model
    model = PeftModel.from_pretrained(model, adapter).eval()
    return model.merge_and_unload() if merge else model


def _logits(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().numpy()


def _genai(out: Path, active: str | None, loaded: list[str] = ()) -> tuple[list[int], np.ndarray]:
    """Greedy tokens and the logits of every step (prompt's last position, then each new token) through
    onnxruntime-genai, with `active` (None: no adapter) set from an og.Adapters that loaded `loaded`."""
    model = og.Model(str(out))
    adapters = og.Adapters(model)
    for name in loaded:
        adapters.load(str(out / f"{name}.onnx_adapter"), name)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(PROMPT) + NEW, do_sample=False)
    gen = og.Generator(model, params)
    if active is not None:
        gen.set_active_adapter(adapters, active)
    gen.append_tokens(PROMPT)
    tokens, steps = [], []
    while not gen.is_done():
        steps.append(np.asarray(gen.get_logits()).reshape(-1))
        gen.generate_next_token()
        tokens.append(int(gen.get_next_tokens()[0]))
    return tokens, np.stack(steps)


def _check_against(out: Path, reference, active: str | None, loaded=(), tol: float = 1e-4) -> None:
    tokens, steps = _genai(out, active, loaded)
    want = _logits(reference, PROMPT + tokens)[len(PROMPT) - 1:len(PROMPT) - 1 + len(steps)]
    assert np.abs(steps - want).max() < tol
    assert tokens == want.argmax(-1).tolist()  # greedy, step by step, as transformers picks


def _build(*args: str) -> None:
    assert main(["build", "--quiet", *map(str, args)]) == 0


@pytest.fixture(scope="module")
def two(lora, tmp_path_factory):
    base, ads = lora
    out = tmp_path_factory.mktemp("two") / "out"
    _build("-m", base, "-o", out, "--adapter", ads["ad_a"], "--adapter", ads["ad_b"])
    return out


def test_graph_has_the_anchors_lora_inputs(two):
    import onnx

    graph = onnx.load(two / "model.onnx", load_external_data=False).graph
    inputs = {i.name: [d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in graph.input}
    assert inputs["model.layers.0.attn.q_proj.lora_A.weight"] == [64, "lora_r"]
    assert inputs["model.layers.2.mlp.down_proj.lora_B.weight"] == ["lora_r", 64]
    assert sum(n.endswith(".lora_A.weight") for n in inputs) == 3 * len(ALL)
    empty = {i.name: list(i.dims) for i in graph.initializer if i.name.endswith("lora_A.weight")}
    assert empty["model.layers.1.mlp.up_proj.lora_A.weight"] == [64, 0]  # the default: no adapter
    nodes = {n.name for n in graph.node}
    assert {"/model/layers.0/attn/q_proj/lora_A/MatMul", "/model/layers.0/attn/q_proj/lora_B/MatMul",
            "/model/layers.0/attn/q_proj/lora/Add", "/model/layers.0/attn/k_proj/MatMul"} <= nodes
    assert "/model/layers.0/attn/qkv_proj/MatMul" not in nodes  # a LoRA projection is never packed
    assert {p.name for p in two.iterdir()} >= {"ad_a.onnx_adapter", "ad_b.onnx_adapter"}
    notes = json.loads((two / "build_report.json").read_text())["notes"]
    assert any("ad_a (r=4, scale 2" in n and "ad_b (r=2/8" in n for n in notes)


def test_adapter_active_matches_peft_and_inactive_the_base(lora, two):
    base, ads = lora
    _check_against(two, _reference(base), None, ["ad_a", "ad_b"])
    _check_against(two, _reference(base, ads["ad_a"]), "ad_a", ["ad_a", "ad_b"])


def test_two_adapters_switch(lora, two):
    """ad_b targets fewer projections at other ranks: the others keep their empty default while it is active."""
    base, ads = lora
    with_b = _reference(base, ads["ad_b"])
    _check_against(two, with_b, "ad_b", ["ad_a", "ad_b"])
    a_tokens, a_steps = _genai(two, "ad_a", ["ad_a", "ad_b"])
    b_tokens, b_steps = _genai(two, "ad_b", ["ad_a", "ad_b"])
    assert np.abs(a_steps[0] - b_steps[0]).max() > 0.1  # they differ, so the switch is seen


def test_the_adapter_file_holds_the_scaled_transposed_weights(lora, two):
    import onnxruntime as ort
    from safetensors.numpy import load_file

    _, ads = lora
    fmt = ort.AdapterFormat.read_adapter(str(two / "ad_b.onnx_adapter"))
    params = {k: v.numpy() for k, v in fmt.get_parameters().items()}
    peft = load_file(str(ads["ad_b"] / "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_{}.weight"
    np.testing.assert_array_equal(params["model.layers.1.attn.v_proj.lora_A.weight"], peft[key.format("A")].T)
    scale = 16 / np.sqrt(8)  # alpha_pattern's alpha over sqrt(r): rslora
    np.testing.assert_allclose(params["model.layers.1.attn.v_proj.lora_B.weight"], peft[key.format("B")].T * scale,
                               rtol=1e-6)
    assert params["model.layers.0.mlp.down_proj.lora_A.weight"].shape == (128, 2)  # rank_pattern
    assert not any("k_proj" in k for k in params)  # not targeted: left to the graph's default


def test_lora_on_an_int4_base(lora, tmp_path):
    """A float branch beside MatMulNBits; at accuracy_level 0 (fp32 compute) against transformers holding the
    build's own dequantized int4 weights plus the adapter through peft."""
    base, ads = lora
    out = tmp_path / "int4"
    _build("-m", base, "-o", out, "-p", "int4", "--adapter", ads["ad_a"], "--extra_options", "int4_accuracy_level=0")
    import onnx

    ops = {n.name: n.op_type for n in onnx.load(out / "model.onnx", load_external_data=False).graph.node}
    assert ops["/model/layers.0/attn/q_proj/MatMul"] == "MatMulNBits"
    assert ops["/model/layers.0/attn/q_proj/lora_A/MatMul"] == "MatMul"
    _check_against(out, _reference(base, ads["ad_a"], stored=out), "ad_a", ["ad_a"])
    _check_against(out, _reference(base, stored=out), None)


def test_merge_adapter_matches_the_merged_model(lora, tmp_path):
    base, ads = lora
    out = tmp_path / "merged"
    _build("-m", base, "-o", out, "--merge-adapter", ads["ad_b"])
    _check_against(out, _reference(base, ads["ad_b"], merge=True), None)
    assert not list(out.glob("*.onnx_adapter"))
    assert any("merged into the weights" in n for n in json.loads((out / "build_report.json").read_text())["notes"])


def test_merge_happens_before_quantization(lora, tmp_path):
    """-p int4 --merge-adapter stores what -p int4 stores for the checkpoint peft merged (merge_and_unload): the
    int4 codes of W + scale * B @ A, not W's with the adapter lost or added after rounding."""
    base, ads = lora
    merged_ckpt = tmp_path / "peft_merged"
    _reference(base, ads["ad_a"], merge=True).save_pretrained(merged_ckpt)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(base / f, merged_ckpt / f)
    _build("-m", base, "-o", tmp_path / "ours", "-p", "int4", "--merge-adapter", ads["ad_a"])
    _build("-m", merged_ckpt, "-o", tmp_path / "peft", "-p", "int4")
    _build("-m", base, "-o", tmp_path / "plain", "-p", "int4")
    ours, peft, plain = (np.fromfile(tmp_path / d / "model.onnx.data", np.uint8) for d in ("ours", "peft", "plain"))
    assert ours.shape == peft.shape == plain.shape
    assert (ours != peft).mean() < 0.002  # float32 rounding of the sum may move a code at a rounding edge
    assert (ours != plain).mean() > 0.2


# -- refusals: one error line, rc 2, nothing written and no tensor read ----------------------------------------
@pytest.fixture
def no_reads(monkeypatch):
    from onnxforge.sources import safetensors_file

    def refuse(self, name, *args):
        raise AssertionError(f"{name} was read before the refusal")

    for method in ("read", "read_rows"):
        monkeypatch.setattr(safetensors_file.SafetensorsFile, method, refuse)


def _copy(src: Path, dst: Path, **config) -> Path:
    shutil.copytree(src, dst)
    data = json.loads((dst / "adapter_config.json").read_text())
    data.update(config)
    (dst / "adapter_config.json").write_text(json.dumps(data))
    return dst


def _refused(capsys, out: Path, *args) -> str:
    capsys.readouterr()
    assert main(["build", "--quiet", "-o", str(out), *map(str, args)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("onnxforge: error: ")
    assert not out.exists() and not list(out.parent.glob(f".{out.name}*"))
    return err[0]


@pytest.mark.parametrize("config, said", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias='all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(peft_type="IA3"), "only LoRA"),
    (dict(r=16), "rank 4 but adapter_config.json says r=16"),
    (dict(target_parameters=["mlp.experts.gate_up_proj"]), "LoRA on parameters"),
])
@pytest.mark.parametrize("flag", ["--adapter", "--merge-adapter"])
def test_unsupported_adapter_configs_are_refused(lora, tmp_path, capsys, no_reads, config, said, flag):
    base, ads = lora
    bad = _copy(ads["ad_a"], tmp_path / "bad", **config)
    assert said in _refused(capsys, tmp_path / "out", "-m", base, flag, bad)


def test_embedding_lora_is_refused(lora, tmp_path, capsys):
    base, _ = lora
    ad = _adapter(base, tmp_path / "emb", 3, r=4, lora_alpha=4, target_modules=["embed_tokens", "q_proj"])
    assert "LoRA on an embedding" in _refused(capsys, tmp_path / "out", "-m", base, "--adapter", ad)


def test_a_module_without_a_branch_is_refused(lora, tmp_path, capsys, no_reads):
    """lm_head is a Linear peft can target, but no layer projection: switched at run time it is refused (merged it
    would be fine)."""
    base, _ = lora
    ad = _adapter(base, tmp_path / "head", 3, dict(save_embedding_layers=False), r=4, lora_alpha=4,
                  target_modules=["lm_head", "q_proj"])
    err = _refused(capsys, tmp_path / "out", "-m", base, "--adapter", ad)
    assert "lm_head" in err and "not linear projections of this model's layers" in err
    ad = _adapter(base, tmp_path / "head_saved", 3, r=4, lora_alpha=4, target_modules=["lm_head", "q_proj"])
    err = _refused(capsys, tmp_path / "out", "-m", base, "--adapter", ad)  # peft saved the lm_head itself too
    assert "not LoRA A or B weights" in err and "lm_head.base_layer.weight" in err


@pytest.mark.parametrize("flag", ["--adapter", "--merge-adapter"])
def test_an_adapter_of_another_base_model_is_refused(lora, tmp_path_factory, tmp_path, capsys, flag):
    base, _ = lora
    other = tmp_path_factory.mktemp("other") / "base"
    tiny.make_model("qwen2", other, hidden_size=32)
    ad = _adapter(other, tmp_path / "other_ad", 4, r=4, lora_alpha=4, target_modules=["q_proj"])
    err = _refused(capsys, tmp_path / "out", "-m", base, flag, ad)
    assert "trained on another base model" in err and "32" in err


def test_folder_problems_are_refused(lora, tmp_path, capsys, no_reads):
    base, ads = lora
    pickled = _copy(ads["ad_a"], tmp_path / "pickled")
    (pickled / "adapter_model.safetensors").rename(pickled / "adapter_model.bin")
    assert "pickle" in _refused(capsys, tmp_path / "out", "-m", base, "--adapter", pickled)
    twin = _copy(ads["ad_a"], tmp_path / "elsewhere" / "ad_a")
    assert "two adapters are named 'ad_a'" in _refused(capsys, tmp_path / "out", "-m", base, "--adapter", ads["ad_a"],
                                                       "--adapter", twin)
    assert "is not a folder" in _refused(capsys, tmp_path / "out", "-m", base, "--adapter", tmp_path / "missing")
    assert "config_only" in _refused(capsys, tmp_path / "out", "-m", base, "--adapter", ads["ad_a"],
                                     "--extra_options", "config_only=true")
    assert "--merge-adapter" in _refused(capsys, tmp_path / "out", "-m", base, "--extra_options",
                                         f"adapter_path={ads['ad_a']}")


def test_python_api_checks_its_arguments(lora, tmp_path):
    import onnxforge
    from onnxforge.errors import RecipeError

    base, ads = lora
    with pytest.raises(RecipeError, match="list of adapter folders"):
        onnxforge.build(base, tmp_path / "out", adapters=str(ads["ad_a"]))
    report = onnxforge.build(base, tmp_path / "out", adapters=[ads["ad_a"]])
    assert (tmp_path / "out" / "ad_a.onnx_adapter").is_file() and "ad_a.onnx_adapter" in report.files
    onnxforge.build(base, tmp_path / "out", adapters=[ads["ad_a"]], overwrite=True)  # its own adapter file: a build


def test_lora_on_fused_checkpoint_modules(tmp_path):
    """Phi-3 stores q/k/v and gate/up fused: a LoRA on qkv_proj is one A for the three projections and B's rows
    split as the fused weight's are."""
    base = tmp_path / "phi3"
    tiny.make_model("phi3", base, cls="Phi3Config", hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                    intermediate_size=128, num_hidden_layers=2, pad_token_id=0)
    ad = _adapter(base, tmp_path / "phi_ad", 5, r=4, lora_alpha=8, target_modules=["qkv_proj", "gate_up_proj", "o_proj"])
    out = tmp_path / "out"
    _build("-m", base, "-o", out, "--adapter", ad)
    _check_against(out, _reference(base, ad), "phi_ad", ["phi_ad"])
    _check_against(out, _reference(base), None)


def test_fp16_adapter_file_and_branch(lora, tmp_path):
    """At fp16 the LoRA inputs and the adapter file are fp16, as the activations are."""
    base, ads = lora
    out = tmp_path / "fp16"
    _build("-m", base, "-o", out, "-p", "fp16", "--adapter", ads["ad_a"])
    tokens, steps = _genai(out, "ad_a", ["ad_a"])
    want = _logits(_reference(base, ads["ad_a"]), PROMPT + tokens)[len(PROMPT) - 1:len(PROMPT) - 1 + len(steps)]
    assert np.abs(steps - want).max() < 0.02 * np.abs(want).max()
    base_steps = _genai(out, None)[1]
    assert np.abs(steps[0] - base_steps[0]).max() > 0.1  # the fp16 branch is live

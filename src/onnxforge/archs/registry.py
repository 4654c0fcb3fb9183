"""Architectures register here by their Hugging Face `architectures` name.

A family is data: spec changes that hold for every checkpoint of it, config defaults transformers
assumes when a key is missing, pinned tensor spellings (archs/names.py), what it leaves unread on
purpose, and at most a hook that derives more spec changes from config.json.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from ..errors import ConfigError, UnsupportedArchitectureError
from ..spec import ModelSpec, base_spec, replace, whole_head_rotary, window_semantics
from .names import Names

FAMILY_MODULES = ("llama", "phi", "gemma", "olmo", "others", "moe", "hybrid", "newer", "llama4", "qwen_next",
                  "deepseek", "gemma4")


@dataclass(frozen=True)
class Architecture:
    name: str  # HF architectures[0]
    model_type: str  # genai_config model.type
    spec: Mapping[str, Any] = field(default_factory=dict)  # spec changes, dotted paths: {"norm.kind": "layer"}
    hook: Callable[[dict], Mapping[str, Any]] | None = None  # config -> more spec changes
    # config -> config: what the family's transformers config class rewrites on load (legacy spellings)
    config_fix: Callable[[dict], dict] | None = None
    config_defaults: Mapping[str, Any] = field(default_factory=dict)  # transformers' defaults for missing keys
    names: Mapping[str, str] = field(default_factory=dict)  # role -> pinned HF spelling
    rewrites: tuple[tuple[str, str], ...] = ()  # module prefix rewrites, e.g. ("model.", "model.language_model.")
    ignored: tuple[str, ...] = ()  # globs of checkpoint tensors the build leaves unread on purpose
    # how the family's transformers model reads sliding_window / layer_types (spec.window_semantics):
    # "none" never windows, "all" windows every layer, "types" the layers layer_types marks (config_fix
    # derives the list where config.json has none, as the config class does)
    sliding: str = "none"
    partial_rotary: bool = False  # the attention rotates rotary_dim = head_dim * partial_rotary_factor (Phi, Nemotron)
    text_config: bool = False  # a multimodal wrapper: the decoder's config is under "text_config"
    gguf: str | None = None  # llama.cpp's general.architecture for this family, where it converts it
    doc: str = ""
    # layer_types entries whose token mixer is not attention -> the kind of mixer (graph/kinds.py MIXERS)
    layer_kinds: Mapping[str, str] = field(default_factory=dict)

    def config(self, cfg: dict) -> dict:
        """config.json as the decoder sees it: the text config of a wrapper, transformers' defaults filled in."""
        if self.text_config:
            text = cfg.get("text_config")
            if not isinstance(text, dict):
                raise ConfigError(f"config.json of {self.name} has no text_config object")
            # the wrapper ties its lm_head by its own config's tie_word_embeddings, never the text config's
            top = {k: v for k, v in cfg.items() if k != "text_config"}
            cfg = {**top, **{k: v for k, v in text.items() if k != "tie_word_embeddings"},
                   "architectures": cfg["architectures"]}
        # A default fills a missing key only: an explicit null stays null, as in transformers' config
        # classes (Gemma 2's `final_logit_softcapping: null` turns softcapping off; missing means 30).
        # Other nulls are dropped, so the spec's own defaults apply to them.
        cfg = {**self.config_defaults,
               **{k: v for k, v in cfg.items() if v is not None or k in self.config_defaults}}
        cfg = window_semantics(self.config_fix(cfg) if self.config_fix else cfg, self.sliding)
        return cfg if self.partial_rotary else whole_head_rotary(cfg)

    def make_spec(self, cfg: dict) -> ModelSpec:
        cfg = self.config(cfg)
        changes = {**self.spec, **(self.hook(cfg) if self.hook else {})}
        return replace(base_spec(cfg, self.layer_kinds), **changes)

    def resolver(self, source) -> Names:
        return Names(source, self.names, self.rewrites)


REGISTRY: dict[str, Architecture] = {}


def register(arch: Architecture) -> Architecture:
    if arch.name in REGISTRY:
        raise ValueError(f"architecture {arch.name} is already registered")
    REGISTRY[arch.name] = arch
    return arch


# architectures refused by name, with why and what would work (a family module fills it in)
REFUSED: dict[str, str] = {}


def load_families() -> dict[str, Architecture]:
    import importlib

    for module in FAMILY_MODULES:
        importlib.import_module(f"{__package__}.{module}")
    return REGISTRY


def supported() -> list[str]:
    return sorted(load_families())


def architecture_for(config: dict) -> Architecture:
    archs = config.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConfigError("config.json has no 'architectures' list; it does not describe a transformers model")
    arch = load_families().get(archs[0])
    if arch is None and archs[0] in REFUSED:
        raise UnsupportedArchitectureError(f"architecture {archs[0]!r} is not supported: {REFUSED[archs[0]]}")
    if arch is None:
        raise UnsupportedArchitectureError(
            f"architecture {archs[0]!r} is not supported. Supported: {', '.join(supported())} "
            "(`onnxforge archs` lists what each supports). Open an issue with the model's config.json to ask for it."
        )
    return arch

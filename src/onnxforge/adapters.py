"""What a build does with LoRA adapters (`--adapter DIR`, `--merge-adapter DIR`; api.build's `adapters=`,
`merge_adapter=`): open and check them before the output is claimed, wrap the source for a merge, give the
emitter the branches' set, check both once the graph is planned (before any weight is read), write the adapter
files beside the model, and say in the report what was done."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

from .errors import RecipeError


@dataclass
class Adapters:
    runtime: list = field(default_factory=list)  # sources.peft.Adapter, switched at run time
    merge: object | None = None  # the one folded into the weights
    lora: object | None = None  # graph.lora.LoraSet, once the build has one
    merged_source: object | None = None

    def open_source(self, opener: Callable[[], object]):
        """The checkpoint, read through the merge (as it is without one); on failure everything is closed."""
        try:
            source = opener()
        except BaseException:
            self.close()
            raise
        if self.merge is None:
            return source
        from .sources.merged import MergedSource

        try:
            self.merged_source = MergedSource(source, self.merge)
        except BaseException:
            source.close()
            self.close()
            raise
        return self.merged_source

    def lora_set(self):
        if not self.runtime:
            return None
        from .graph.lora import LoraSet

        self.lora = LoraSet(self.runtime)
        return self.lora

    def check_planned(self, builder) -> None:
        """Every adapter module became a branch, every merged weight is read: before any weight is read."""
        if self.lora is not None:
            self.lora.check_all_placed()
        if self.merged_source is not None:
            from .sources.merged import check_merged_read

            check_merged_read(self.merged_source, builder.jobs)

    def write(self, folder: Path, io) -> list[str]:
        if self.lora is None:
            return []
        from .export.adapters import write_adapters

        return write_adapters(folder, self.lora, io)

    def notes(self) -> list[str]:
        out = []
        if self.merge is not None:
            out.append(f"LoRA adapter merged into the weights before they were stored (W + scale * B @ A): "
                       f"{self.merge.describe()}")
        if self.lora is not None:
            names = ", ".join(f"{a.name}.onnx_adapter" for a in self.runtime)
            out.append(f"LoRA adapters switched at run time, inactive by default ({len(self.lora.placed)} projections "
                       f"with a branch): {'; '.join(self.lora.describe())}; files {names} "
                       "(onnxruntime_genai: og.Adapters(model).load(file, name), generator.set_active_adapter)")
        return out

    def close(self) -> None:
        for a in self.runtime:
            a.close()
        if self.merge is not None and self.merged_source is None:  # else the merged source closes it
            self.merge.close()


def open_adapters(adapters: Sequence[str | Path] = (), merge_adapter: str | Path | None = None,
                  config_only: bool = False) -> Adapters:
    """Check the arguments and open every adapter (config and tensor header; no weight is read)."""
    if isinstance(adapters, (str, Path)) or not all(isinstance(a, (str, Path)) for a in adapters):
        raise RecipeError(f"adapters takes a list of adapter folders, got {adapters!r}")
    if merge_adapter is not None and not isinstance(merge_adapter, (str, Path)):
        raise RecipeError(f"merge_adapter takes one adapter folder, got {merge_adapter!r}")
    if config_only and (adapters or merge_adapter is not None):
        raise RecipeError("config_only=true writes no model, so it can take no LoRA adapter; drop one of them")
    from .sources.peft import open_adapter

    out = Adapters()
    try:
        for a in adapters:
            out.runtime.append(open_adapter(a))
        out.merge = open_adapter(merge_adapter) if merge_adapter is not None else None
        names = [a.name for a in out.runtime]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise RecipeError(f"two adapters are named {twice[0]!r} (an adapter is named after its folder, and genai "
                              "loads it by that name); rename one folder")
    except BaseException:
        out.close()
        raise
    return out

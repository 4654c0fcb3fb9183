"""`onnxforge run` and `onnxforge chat`: generation through onnxruntime-genai, streamed to stdout.

No torch, no transformers. Chat templates: onnxruntime-genai's own renderer (it reads chat_template from
tokenizer_config.json), else jinja2 over the same template, else a plain "User: ...\\nAssistant:" format.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Callable, TextIO

from ..errors import RunError
from .ort_runner import first_line, load_genai_model

DEFAULT_NEW_TOKENS = 256
PLAIN_STOPS = ("\nUser:", "\nSystem:")


class Generation:
    """One built model folder, loaded once: tokenizer, chat template, streaming generation."""

    def __init__(self, model_dir: str | Path):
        import onnxruntime_genai as og

        self.og = og
        self.dir = Path(model_dir)
        self.model = load_genai_model(self.dir)
        try:
            self.tokenizer = og.Tokenizer(self.model)
        except Exception as e:  # noqa: BLE001 - genai raises plain RuntimeErrors
            raise RunError(f"onnxruntime-genai cannot load the tokenizer in {self.dir} (tokenizer.json, "
                           f"tokenizer_config.json: {first_line(e)}); copy the checkpoint's tokenizer files into "
                           "the folder or rebuild it") from None
        cfg = json.loads((self.dir / "genai_config.json").read_text())
        self.context = int(cfg["model"].get("context_length") or cfg.get("search", {}).get("max_length") or 2048)
        self.vocab = cfg["model"].get("vocab_size")
        self.tok_config = _read_json(self.dir / "tokenizer_config.json")
        self.template_kind: str | None = None  # "genai", "jinja2" or "plain", once known

    # -- prompts -----------------------------------------------------------------------------------
    def template_source(self) -> str | None:
        """The chat template text from tokenizer_config.json or chat_template.jinja, if any."""
        t = self.tok_config.get("chat_template")
        if isinstance(t, list):  # [{"name": "default", "template": ...}, ...]
            named = {d.get("name"): d.get("template") for d in t if isinstance(d, dict)}
            t = named.get("default") or next(iter(named.values()), None)
        if not t and (self.dir / "chat_template.jinja").is_file():
            t = (self.dir / "chat_template.jinja").read_text(encoding="utf-8")
        return t or None

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """Messages -> prompt text through the first renderer that works; sets template_kind."""
        kinds = [self.template_kind] if self.template_kind else ["genai", "jinja2", "plain"]
        last_error = None
        for kind in kinds:
            try:
                text = getattr(self, f"_render_{kind}")(messages, add_generation_prompt)
            except Exception as e:  # noqa: BLE001 - try the next renderer
                last_error = e
                continue
            self.template_kind = kind
            return text
        raise RunError(f"cannot render the chat template of {self.dir}: {last_error}; run without --chat-template "
                       "and write the prompt in the model's format yourself")

    def _render_genai(self, messages, add_generation_prompt) -> str:
        source = self.template_source()
        if not source:
            raise LookupError("no chat template")
        # onnxruntime-genai reads tokenizer_config.json's template itself; a chat_template.jinja is passed in
        extra = {} if self.tok_config.get("chat_template") else {"template_str": source}
        return self.tokenizer.apply_chat_template(json.dumps(messages), add_generation_prompt=add_generation_prompt,
                                                  **extra)

    def _render_jinja2(self, messages, add_generation_prompt) -> str:
        source = self.template_source()
        if not source:
            raise LookupError("no chat template")
        return render_jinja2(source, messages, add_generation_prompt, self.tok_config)

    def _render_plain(self, messages, add_generation_prompt) -> str:
        return render_plain(messages, add_generation_prompt)

    def encode(self, text: str) -> list[int]:
        ids = [int(t) for t in self.tokenizer.encode(text)]
        bos = self.tokenizer.bos_token_id
        if len(ids) >= 2 and ids[0] == ids[1] == bos:  # template wrote the BOS and the tokenizer added another
            ids = ids[1:]
        return ids

    # -- generation ----------------------------------------------------------------------------------
    def search_options(self, prompt_len: int, *, max_length=None, max_new_tokens=None, do_sample=None,
                       temperature=None, top_p=None, top_k=None, seed=None) -> dict:
        if max_length is None:
            max_length = prompt_len + (max_new_tokens or DEFAULT_NEW_TOKENS)
        elif max_new_tokens:
            max_length = min(max_length, prompt_len + max_new_tokens)
        opts = {"max_length": min(int(max_length), self.context)}
        if top_k is not None and isinstance(self.vocab, int) and top_k > self.vocab:
            raise RunError(f"--top-k {top_k} is larger than the vocabulary ({self.vocab} tokens) of {self.dir}; "
                           f"pass --top-k {self.vocab} or less")
        for key, value in (("do_sample", do_sample), ("temperature", temperature), ("top_p", top_p),
                           ("top_k", top_k), ("random_seed", seed)):
            if value is not None:
                opts[key] = value
        return opts

    def stream(self, ids: list[int], options: dict, write: Callable[[str], None],
               stops: tuple[str, ...] = ()) -> tuple[str, list[int]]:
        """Generate after `ids`, calling `write` with each decoded piece; returns (text, new token ids).

        Generation ends at EOS, at max_length, or when the text reaches one of `stops` (not written)."""
        og = self.og
        if len(ids) >= options["max_length"]:
            raise ValueError(f"the prompt has {len(ids)} tokens, which leaves no room under max_length "
                             f"{options['max_length']} (context {self.context}); shorten it or raise --max-length")
        params = og.GeneratorParams(self.model)
        try:
            params.set_search_options(**options)
        except Exception as e:  # noqa: BLE001 - genai's RuntimeError: a value it does not take
            raise RunError(f"onnxruntime-genai refused the generation options {options} ({first_line(e)}); "
                           "change the flag it names") from None
        gen = og.Generator(self.model, params)
        gen.append_tokens(ids)
        decoder = self.tokenizer.create_stream()
        out = StopFilter(write, stops)
        tokens: list[int] = []
        try:
            while not gen.is_done():
                gen.generate_next_token()
                tok = int(gen.get_next_tokens()[0])
                tokens.append(tok)
                if out.feed(decoder.decode(tok)):
                    break
        finally:
            out.flush()
        return out.text, tokens


class StopFilter:
    """Passes text through to `write`, holding back what could be the start of a stop string."""

    def __init__(self, write: Callable[[str], None], stops: tuple[str, ...]):
        self.write, self.stops = write, tuple(s for s in stops if s)
        self.pending = ""
        self.text = ""
        self.stopped = False

    def _emit(self, s: str) -> None:
        if s:
            self.text += s
            self.write(s)

    def feed(self, piece: str) -> bool:
        """True once a stop string was reached."""
        if self.stopped:
            return True
        if not self.stops:
            self._emit(piece)
            return False
        self.pending += piece
        hits = [self.pending.find(s) for s in self.stops if s in self.pending]
        if hits:
            self._emit(self.pending[:min(hits)])
            self.pending = ""
            self.stopped = True
            return True
        keep = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    keep = max(keep, k)
                    break
        self._emit(self.pending[:len(self.pending) - keep])
        self.pending = self.pending[len(self.pending) - keep:]
        return False

    def flush(self) -> None:
        if not self.stopped:
            self._emit(self.pending)
        self.pending = ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _token_text(value) -> str:
    if isinstance(value, dict):  # {"content": "<s>", ...} in older tokenizer configs
        return value.get("content", "")
    return value or ""


def render_jinja2(source: str, messages: list[dict], add_generation_prompt: bool, tok_config: dict) -> str:
    """Render a Hugging Face chat template the way transformers does (sandboxed jinja2)."""
    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False, **_: json.dumps(
        x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: __import__("datetime").datetime.now().strftime(fmt)
    special = {k: _token_text(tok_config.get(k)) for k in ("bos_token", "eos_token", "unk_token", "pad_token")}
    return env.from_string(source).render(messages=messages, add_generation_prompt=add_generation_prompt, **special)


def render_plain(messages: list[dict], add_generation_prompt: bool = True) -> str:
    names = {"system": "System", "user": "User", "assistant": "Assistant"}
    lines = [f"{names.get(m['role'], m['role'].capitalize())}: {m['content']}" for m in messages]
    text = "\n".join(lines)
    if add_generation_prompt:
        text += "\nAssistant:"
    return text


def _writer(stream: TextIO) -> Callable[[str], None]:
    def write(s: str) -> None:
        stream.write(s)
        stream.flush()

    return write


def _sampling(args) -> dict:
    do_sample = {True: True, False: False, None: None}[args.do_sample]
    return dict(max_length=args.max_length, max_new_tokens=args.max_new_tokens, do_sample=do_sample,
                temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)


def run_cli(args) -> int:
    """`onnxforge run OUT_DIR "prompt"`."""
    g = Generation(args.model_dir)
    text = args.prompt
    if args.chat_template:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": text}]
        text = g.render(messages)
    if args.show_prompt:
        print(text, file=sys.stderr, flush=True)
    ids = g.encode(text)
    if not ids:
        raise RunError("the prompt is empty; pass some text to continue")
    opts = g.search_options(len(ids), **_sampling(args))
    try:
        g.stream(ids, opts, _writer(sys.stdout))
    except ValueError as e:
        raise RunError(str(e)) from None
    except KeyboardInterrupt:
        pass
    except Exception as e:  # noqa: BLE001 - onnxruntime-genai's RuntimeError while generating
        raise RunError(f"onnxruntime-genai failed while generating from {g.dir} ({first_line(e)}); check that the "
                       "model was built for this execution provider (build_report.json) or rebuild it") from None
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


def chat_loop(g: Generation, args, stdin: TextIO, stdout: TextIO, stderr: TextIO) -> int:
    system = [{"role": "system", "content": args.system}] if args.system else []
    history: list[dict] = []
    interactive = stdin.isatty()
    write = _writer(stdout)
    sampling = _sampling(args)
    while True:
        if interactive:
            stdout.write("> ")
            stdout.flush()
        try:
            line = stdin.readline()
        except KeyboardInterrupt:
            break
        if not line:  # EOF
            break
        line = line.rstrip("\r\n")
        if line.strip() in ("/exit", "/quit"):
            break
        if line.strip() == "/reset":
            history = []
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        while True:  # drop the oldest turns while the conversation does not fit
            text = g.render(system + history)
            ids = g.encode(text)
            room = sampling["max_length"] or g.context
            if len(ids) < min(room, g.context) - 1 or len(history) <= 1:
                break
            history = history[2:] if len(history) > 2 else history[-1:]
        if args.show_prompt:
            print(text, file=stderr, flush=True)
        opts = g.search_options(len(ids), **sampling)
        stops = PLAIN_STOPS if g.template_kind == "plain" else ()
        try:
            reply, _ = g.stream(ids, opts, write, stops)
        except ValueError as e:
            print(f"onnxforge: error: {e}", file=stderr, flush=True)
            history.pop()
            continue
        except KeyboardInterrupt:
            reply = ""
        stdout.write("\n")
        stdout.flush()
        history.append({"role": "assistant", "content": reply.strip() if g.template_kind == "plain" else reply})
    return 0


def chat_cli(args) -> int:
    """`onnxforge chat OUT_DIR`: reads user lines from stdin until EOF or /exit."""
    g = Generation(args.model_dir)
    if sys.stdin.isatty():
        print(f"chatting with {args.model_dir}; /exit or Ctrl-D to leave, /reset to forget", file=sys.stderr)
    return chat_loop(g, args, sys.stdin, sys.stdout, sys.stderr)

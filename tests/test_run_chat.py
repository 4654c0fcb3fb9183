"""`onnxforge run` and `onnxforge chat`: streamed text equals the decode of onnxruntime-genai's greedy tokens."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest

import onnxforge
from onnxforge.cli import main

TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
            "{% if add_generation_prompt %}[assistant]{% endif %}")
NEW = 12


def _gpt2_byte_chars() -> dict[int, str]:
    """The byte-level BPE alphabet: byte -> the character that stands for it in token strings."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def asciify_tokenizer(folder) -> None:
    """Rename the byte tokens outside printable ASCII to '#xx' so that any token sequence decodes to plain text.

    A random model emits arbitrary byte tokens; invalid UTF-8 is decoded differently by a stream and by a
    one-shot decode, and control characters would not survive text-mode pipes. Text made of printable
    ASCII encodes exactly as before (those byte tokens and all merges are untouched)."""
    path = folder / "tokenizer.json"
    t = json.loads(path.read_text(encoding="utf-8"))
    chars = _gpt2_byte_chars()
    rename = {chars[b]: f"#{b:02x}" for b in [*range(0x20), 0x7F, *range(0x80, 0x100)] if b not in (0x20,)}
    vocab = t["model"]["vocab"]
    assert not set(rename.values()) & set(vocab)
    merges = [m if isinstance(m, str) else " ".join(m) for m in t["model"]["merges"]]
    assert not any(set(m.replace(" ", "")) & set(rename) for m in merges)
    t["model"]["vocab"] = {rename.get(k, k): v for k, v in vocab.items()}
    path.write_text(json.dumps(t), encoding="utf-8")


@pytest.fixture(scope="module")
def builds(tiny_models, tmp_path_factory):
    """(plain build without a chat template, copy whose tokenizer_config.json has TEMPLATE)."""
    folder, _ = tiny_models("llama")
    base = tmp_path_factory.mktemp("runchat")
    plain = base / "plain"
    onnxforge.build(folder, plain, "fp32")
    asciify_tokenizer(plain)
    templated = base / "templated"
    shutil.copytree(plain, templated)
    cfg_path = templated / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    assert "chat_template" not in cfg
    cfg["chat_template"] = TEMPLATE
    cfg_path.write_text(json.dumps(cfg))
    return plain, templated


def greedy_text(out_dir, prompt_text: str, new_tokens: int = NEW) -> str:
    """Independent reference: og greedy tokens for the prompt, decoded in one go."""
    import onnxruntime_genai as og

    model = og.Model(str(out_dir))
    tok = og.Tokenizer(model)
    ids = tok.encode(prompt_text)
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(ids) + new_tokens, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(ids)
    out = []
    while not gen.is_done():
        gen.generate_next_token()
        out.append(int(gen.get_next_tokens()[0]))
    assert out, "the model produced no token"
    return tok.decode(out)


def render(messages, add_generation_prompt=True) -> str:
    import jinja2

    return jinja2.Template(TEMPLATE).render(messages=messages, add_generation_prompt=add_generation_prompt)


def test_run_streams_greedy_tokens(builds, capsys):
    plain, _ = builds
    prompt = "The quick brown fox"
    rc = main(["run", str(plain), prompt, "--greedy", "--max-new-tokens", str(NEW)])
    out = capsys.readouterr().out
    assert rc == 0
    expected = greedy_text(plain, prompt)
    assert expected.strip()
    assert out == expected + "\n"


def test_run_max_length_counts_the_prompt(builds, capsys):
    plain, _ = builds
    import onnxruntime_genai as og

    prompt = "numbers 0123456789"
    n = len(og.Tokenizer(og.Model(str(plain))).encode(prompt))
    assert main(["run", str(plain), prompt, "--greedy", "--max-length", str(n + 5)]) == 0
    assert capsys.readouterr().out == greedy_text(plain, prompt, 5) + "\n"


def test_run_with_chat_template(builds, capsys):
    _, templated = builds
    rc = main(["run", str(templated), "The lazy dog", "--chat-template", "--greedy", "--max-new-tokens", str(NEW),
               "--show-prompt"])
    captured = capsys.readouterr()
    assert rc == 0
    prompt = render([{"role": "user", "content": "The lazy dog"}])
    assert captured.err.startswith(prompt)
    assert captured.out == greedy_text(templated, prompt) + "\n"


def test_run_sampling_is_seeded(builds, capsys):
    plain, _ = builds
    args = ["run", str(plain), "The quick", "--do-sample", "--temperature", "1.5", "--top-k", "50", "--top-p", "0.95",
            "--max-new-tokens", "24"]
    main(args + ["--seed", "1"])
    a = capsys.readouterr().out
    main(args + ["--seed", "1"])
    b = capsys.readouterr().out
    assert a == b and a.strip()


def _chat(out_dir, stdin: str, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "onnxforge", "chat", str(out_dir), "--greedy", "--max-new-tokens", str(NEW),
           "--show-prompt", *extra]
    proc = subprocess.run(cmd, input=stdin, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_chat_applies_template_and_keeps_history(builds):
    _, templated = builds
    proc = _chat(templated, "hello\nagain\n/exit\nnever read\n", "--system", "be brief")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello"}]
    first_prompt = render(messages)
    reply1 = greedy_text(templated, first_prompt)
    messages += [{"role": "assistant", "content": reply1}, {"role": "user", "content": "again"}]
    second_prompt = render(messages)
    reply2 = greedy_text(templated, second_prompt)
    assert proc.stdout == reply1 + "\n" + reply2 + "\n"
    assert first_prompt in proc.stderr and second_prompt in proc.stderr
    assert "never read" not in proc.stderr


def test_chat_without_template_uses_plain_format(builds):
    plain, _ = builds
    proc = _chat(plain, "hello\n")  # EOF ends the loop
    prompt = "User: hello\nAssistant:"
    assert prompt in proc.stderr
    expected = greedy_text(plain, prompt)
    expected = expected.split("\nUser:")[0].split("\nSystem:")[0]  # the plain format stops at a new turn
    assert proc.stdout == expected + "\n"


def test_jinja2_fallback_matches_genai_rendering(builds):
    """When onnxruntime-genai cannot render the template, jinja2 renders the same text."""
    _, templated = builds
    from onnxforge.verify.generate import Generation

    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                {"role": "user", "content": "bye"}]
    g = Generation(templated)
    by_genai = g.render(messages)
    assert g.template_kind == "genai"

    class Broken:
        def __init__(self, inner):
            self.inner = inner

        def apply_chat_template(self, *a, **kw):
            raise RuntimeError("unsupported template")

        def __getattr__(self, name):
            return getattr(self.inner, name)

    g2 = Generation(templated)
    g2.tokenizer = Broken(g2.tokenizer)
    assert g2.render(messages) == by_genai == render(messages)
    assert g2.template_kind == "jinja2"


def test_stop_filter_holds_back_partial_stops():
    from onnxforge.verify.generate import StopFilter

    written = []
    f = StopFilter(written.append, ("\nUser:",))
    for piece in ["Hi", " there", "\n", "Us", "e", "r", ": more"]:
        if f.feed(piece):
            break
    f.flush()
    assert "".join(written) == "Hi there" and f.text == "Hi there"
    written.clear()
    f = StopFilter(written.append, ("\nUser:",))
    for piece in ["a\n", "Use", "ful"]:
        f.feed(piece)
    f.flush()
    assert "".join(written) == "a\nUseful"

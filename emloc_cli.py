# Copyright 2026 The emloc authors. Licensed under the Apache License, Version 2.0.
"""
emloc: task memories from the command line.

    emloc build DEMOS --model REPO --out DIR [--method NAME] [--chunk-size N] [--PARAM VALUE ...]
    emloc ask MEMORY "question" [--image FILE ...] [--choices A,B,C [--calibrate]] [--model REPO]
    emloc eval --model REPO --demos D.jsonl --queries Q.jsonl --methods zero-shot,full,emloc --out OUT
    emloc push MEMORY REPO_ID [--private] [--revision BRANCH]
    emloc inspect MEMORY
    emloc serve --model REPO --memory NAME=DIR_OR_HUB_ID [...] [--api-keys FILE] [--ray]   (emloc_serve)

Each subcommand is a thin wrapper over the library function it names, and its help is that wrapper's docstring. A
user error (a missing file, a bad demonstration line, a memory made for another model, an unknown option) exits with
status 2 and one line naming what and where; `EMLOC_DEBUG=1` shows the traceback instead.
"""
# Not remote code (an Emloc repo does not carry it): an installed module beside the *_emloc.py files it calls.

from __future__ import annotations

import argparse
import importlib.util
import inspect as _inspect
import json
import math
import os
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
EVALUATION_SCRIPT = HERE / "examples" / "evaluate_memory.py"


class UsageError(ValueError):
    """Something the user gave cannot be used; the message names it."""


# ---------------------------------------------------------------------------------------------------------------------
# Subcommands: thin wrappers over the library
# ---------------------------------------------------------------------------------------------------------------------


def build(demos: str, model: str, out: str, method: str | None = None, chunk_size: int | None = None,
          template: str | None = None, instruction: str | None = None, validation: int = 16, target: float = 0.9,
          checkpoint_dir: str | None = None, device: str | None = None, **params) -> Path:
    """Compress demonstrations into a task memory and save it (`model.build_memory` + `memory.save_pretrained`).

    Method parameters follow as `--name value`, e.g. `--delta 0.01 --ratios 0.1,0.2,0.5 --budget 0.2`
    (a comma makes a tuple).

    Args:
        demos: JSON Lines of demonstrations (one per line; image paths relative to the file).
        model: an Emloc repo (directory or Hub id), or a base model, which is wrapped with `from_base`.
        out: the directory the memory is written to (replaced as a whole, never left half-written).
        method: the compression method (default: the model config's; see `COMPRESSION_METHODS`).
        chunk_size: demonstrations per chunk (default: the model config's).
        template: render the demonstrations with `chat` or `plain` instead of the processor's own rendering.
        instruction: the first line of the `plain` rendering.
        validation: hold out this many demonstrations, certify the memory on them against the full context (and repair
            it up the ladder below --target), then add them; 0 builds without a certificate.
        target: the retained gain the certificate must show (default 0.9).
        checkpoint_dir: record every chunk here; rerunning the same command resumes where a build stopped.
        device: where to run (`cuda`, `cuda:1`, `cpu`; default: where the model loads).
    """
    if not Path(demos).is_file():
        raise UsageError(f"{demos}: demonstrations file not found")
    from processing_emloc import load_examples

    load_examples(demos)  # a bad line fails here, before minutes of model loading
    emloc_model, processor = _load_model(model, device=device, template=template, instruction=instruction)
    from building_emloc import check_not_retired

    methods = sys.modules[type(emloc_model).__module__].COMPRESSION_METHODS
    try:
        check_not_retired(params)
    except ValueError as error:
        raise UsageError(f"--{next(iter(params)).replace('_', '-')}: {error}") from None
    name = method or getattr(emloc_model.config, "method", None) or "emloc"
    if name not in methods:
        raise UsageError(f"--method {name}: unknown; available: {', '.join(sorted(methods))}")
    accepted = sorted(f for f in methods[name].__dataclass_fields__ if not f.startswith("_"))
    unknown = sorted(set(params) - set(accepted))
    if unknown:
        raise UsageError(f"--{unknown[0].replace('_', '-')}: method {name!r} takes no such parameter; it takes "
                         + ", ".join(f"--{p.replace('_', '-')}" for p in accepted))
    memory = emloc_model.build_memory(demos, processor=processor, method=method, chunk_size=chunk_size, progress=True,
                                      validation=validation, target=target, checkpoint_dir=checkpoint_dir, **params)
    path = memory.save_pretrained(out)
    totals = memory.stats.get("totals", {})
    print(f"{path}: {memory.stats.get('num_demos')} demonstrations, {totals.get('full_tokens')} context tokens, "
          f"{100 * totals.get('kept_ratio', 0.0):.1f} % of their KV kept ({memory.stats['method']['name']})")
    return path


def ask(memory: str, question: str, image: list[str] | None = None, video: str | None = None, choices: str | None = None,
        model: str | None = None, max_new_tokens: int = 32, device: str | None = None,
        retrieve: int | None = None, calibrate: bool = False, recipe: str | None = None) -> str | list:
    """Answer a question from a task memory (`model.load_memory`, then `model.generate` or `model.score_choices`).

    The answer streams to standard output; with `--choices`, each choice is printed with its log-probability, best
    first.

    Args:
        memory: a memory directory or Hub repo id.
        question: the question, asked as the demonstrations asked theirs.
        image: an image for the question (repeat for several; vision-language models).
        video: a video file (or a directory of frames) for the question (vision-language models).
        choices: comma-separated answers to score instead of generating one.
        model: the Emloc repo (or base model) to answer with; default: the one the memory's config records.
        max_new_tokens: the longest answer, in tokens.
        device: where to run (`cuda`, `cpu`, ...; default: where the model loads).
        retrieve: answer from the memory's tokens of the question's nearest demonstrations only (this many).
        calibrate: with `--choices`, divide out the label prior the memory recorded for these choices when it was
            built (calibrated log-probabilities).
        recipe: how to ask the memory (scored, calibrated, retrieve@K, retrieve@K+calibrated); default: the way its
            certificate chose. --retrieve and --calibrate, when given, say it instead.
    """
    directory = _memory_directory(memory)
    if retrieve is not None and retrieve < 1:
        raise UsageError(f"--retrieve {retrieve}: give a positive number of demonstrations")
    if calibrate and not choices:
        raise UsageError("--calibrate: calibration ranks --choices; give them")
    options = [choice.strip() for choice in choices.split(",") if choice.strip()] if choices else None
    config = _memory_config(directory)
    if recipe is not None:
        from certificate_emloc import Recipe

        try:
            Recipe.parse(recipe)
        except ValueError as error:
            raise UsageError(f"--recipe {recipe}: {error}") from None
    if calibrate:
        covered = [entry["choices"] for entry in (config.get("calibration") or {}).get("priors", [])]
        if options not in covered:
            raise UsageError(f"--calibrate: {memory} records no label prior for the choices {options} "
                             f"(it records {covered or 'none'}); ask without --calibrate")
    recorded = config.get("base_model") or {}
    rendering = config.get("rendering") or {}
    reference = model or recorded.get("name_or_path")
    if not reference:
        raise UsageError(f"{memory}: its memory_config.json names no Hub model (it was built from a local directory); "
                         f"pass --model with the Emloc repo it was built with")
    emloc_model, processor = _load_model(reference, device=device, rendering=rendering)
    emloc_model.load_memory(directory, name="task", processor=processor)
    if retrieve is not None and emloc_model.memories["task"].retrieval is None:
        raise UsageError(f"{memory}: this memory has no retrieval index (an older format or another tool made it); "
                         f"ask without --retrieve")
    query = {"question": question}
    if image:
        query["images"] = list(image)
    if video:
        query["video"] = video
    if options is not None:
        explicit = {"retrieve": retrieve} if retrieve is not None else {}
        if calibrate:
            explicit["calibrate"] = True
        scores = emloc_model.score_choices([dict(query, choices=options)], processor=processor, recipe=recipe,
                                           **explicit)[0]
        ranked = sorted(zip(options, scores), key=lambda pair: -pair[1])
        width = max(len(choice) for choice in options)
        for choice, score in ranked:
            print(f"{choice:<{width}}  {score:9.4f}")
        return ranked
    from transformers import TextStreamer

    inputs = processor([query], return_tensors="pt")
    streamer = TextStreamer(processor.tokenizer, skip_prompt=True, skip_special_tokens=True)
    out = emloc_model.generate(**inputs, max_new_tokens=max_new_tokens, streamer=streamer, processor=processor,
                               retrieve=retrieve, recipe=recipe)
    return processor.batch_decode(out[:, inputs["input_ids"].shape[1]:], skip_special_tokens=True)[0]


def evaluate(argv: list[str]):
    """Evaluate memories against zero-shot, the full context, KV compression and LoRA baselines: the evaluation
    harness `examples/evaluate_memory.py` of the emloc repository (its options follow; `emloc eval --help`)."""
    if not EVALUATION_SCRIPT.is_file():
        raise UsageError(f"{EVALUATION_SCRIPT}: the evaluation harness is not installed here (it ships in the emloc "
                         f"repository's examples/; install emloc from a checkout with `pip install -e .`)")
    spec = importlib.util.spec_from_file_location("evaluate_memory", EVALUATION_SCRIPT)
    harness = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("evaluate_memory", harness)
    spec.loader.exec_module(harness)
    return harness.main(argv)


def push(memory: str, repo_id: str, private: bool = False, revision: str | None = None,
         commit_message: str = "Upload task memory") -> str:
    """Push a saved memory to a Hub repo like an adapter (`push_memory_to_hub`): weights, config, and a card with the
    code that loads it. No local path is pushed.

    Args:
        memory: the memory directory.
        repo_id: the Hub repo (`user/name`), created if missing.
        private: create the repo private.
        revision: push to this branch (created if missing).
        commit_message: the commit's message.
    """
    from memory_emloc import TaskMemory, push_memory_to_hub

    if not Path(memory).is_dir():
        raise UsageError(f"{memory}: memory directory not found")
    url = push_memory_to_hub(TaskMemory.from_pretrained(memory), repo_id, private=private or None, revision=revision,
                             commit_message=commit_message)
    print(url)
    return url


def inspect(memory: str) -> dict:
    """Show what a memory is: its card's facts and its statistics, as tables (`memory_config.json`).

    Args:
        memory: a memory directory or Hub repo id.
    """
    directory = _memory_directory(memory)
    config = _memory_config(directory)
    for line in _tables(memory, config):
        print(line)
    return config


# ---------------------------------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------------------------------


def _load_model(reference: str, device: str | None = None, template: str | None = None,
                instruction: str | None = None, rendering: dict | None = None):
    """An Emloc model and processor from an Emloc repo (`AutoModel` with remote code) or a base model (`from_base`).
    The processor renders `template` / `instruction` where given, or exactly as a memory's `rendering` records."""
    from transformers import AutoConfig, AutoModel, AutoProcessor

    try:
        config = AutoConfig.from_pretrained(reference, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise UsageError(f"--model {reference}: cannot load a model from it ({_first_line(error)})") from None
    if config.model_type == "emloc":
        model = AutoModel.from_pretrained(reference, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(reference, trust_remote_code=True)
    else:
        from modeling_emloc import EmlocForConditionalGeneration
        from processing_emloc import EmlocProcessor

        model = EmlocForConditionalGeneration.from_base(reference)
        recorded = rendering if rendering and rendering.get("template") else {}
        processor = EmlocProcessor.from_base(reference, template=recorded.get("template") or template or "chat",
                                             instruction=recorded.get("instruction", instruction))
    if rendering and rendering.get("template"):
        wanted = (rendering["template"], rendering.get("instruction"))
    else:
        wanted = (template or processor.template, instruction if instruction is not None else processor.instruction)
    if wanted != (processor.template, processor.instruction):
        processor = type(processor)(processor.base_processor, template=wanted[0], instruction=wanted[1])
    if device is not None:
        model.to(device)
    return model, processor


def _memory_directory(memory: str) -> Path:
    """A memory directory, or the local snapshot of a Hub repo."""
    from memory_emloc import hub_name

    path = Path(memory)
    if path.is_dir():
        return path
    if hub_name(memory) is None:  # a path, not a Hub id
        raise UsageError(f"{memory}: memory directory not found")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(memory))
    except (OSError, ValueError) as error:
        raise UsageError(f"{memory}: no memory directory and no Hub repo of that name ({_first_line(error)})") from None


def _memory_config(directory: Path) -> dict:
    path = directory / "memory_config.json"
    if not path.is_file():
        raise UsageError(f"{directory}: not a task memory, memory_config.json is missing")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise UsageError(f"{path}: corrupt memory config ({error})") from None


def _tables(memory: str, config: dict) -> list[str]:
    base = config.get("base_model") or {}
    method = config.get("method") or {}
    totals = config.get("totals") or {}
    rendering = config.get("rendering") or {}
    build = config.get("build") or {}
    params = ", ".join(f"{k}={v}" for k, v in (method.get("params") or {}).items())
    rows = [
        ("memory", memory),
        ("model", base.get("name_or_path") or "not recorded (built from a local directory)"),
        ("loads with", "EmlocForConditionalGeneration.from_base (a base model)" if base.get("emloc_repo") is False
         else "AutoModel.from_pretrained(..., trust_remote_code=True) (an Emloc repo)"),
        ("base fingerprint", base.get("fingerprint", "n/a")),
        ("method", f"{method.get('name', 'n/a')}" + (f" ({params})" if params else "")),
        ("demonstrations", config.get("num_demos", "n/a")),
        ("rendering", ", ".join(f"{k}={v!r}" for k, v in rendering.items() if not k.endswith("sha256")) or "not recorded"),
        ("context tokens", totals.get("full_tokens", "n/a")),
        ("kept tokens per layer", totals.get("kept_tokens", "n/a")),
        ("kept KV", f"{100 * totals.get('kept_ratio', 0.0):.1f} % of what a query reads of the full context "
                    f"({_size(totals.get('kept_kv_bytes'))} stored; the full context {_size(totals.get('full_kv_bytes'))}"
                    + (f", {_size(totals['readable_kv_bytes'])} of it readable)"
                       if totals.get("readable_kv_bytes", totals.get("full_kv_bytes")) != totals.get("full_kv_bytes")
                       else ")")),
        ("next position", config.get("next_position", "n/a")),
        ("build", f"{build.get('seconds', 'n/a')} s, {len(build.get('chunks', []))} chunks"),
        ("format version", config.get("format_version", "n/a")),
        ("retrieval", f"{config['retrieval']['num_demos']} demonstrations, keys entering layer "
                      f"{config['retrieval']['layer']} (ask --retrieve K)" if config.get("retrieval") else "none"),
    ]
    for entry in (config.get("calibration") or {}).get("priors", []):
        prior = ", ".join(f"{choice} {math.exp(value):.2f}" for choice, value in zip(entry["choices"], entry["log_prior"]))
        rows.append(("label prior", f"{prior} (from {entry['rows']} demonstrations' questions; ask --calibrate)"))
    rows += _certificate_rows(config.get("certificate"))
    lines = _table(rows)
    types = config.get("token_types") or {}
    if types:
        lines += [""] + _table([
            (name, counts.get("full", 0), counts.get("kept", 0), _share(counts.get("kept", 0), counts.get("full", 0)))
            for name, counts in types.items()], header=("token type", "full", "kept", "kept %"))
    layers = config.get("layers") or []
    if layers:
        lines += [""] + _table([
            (index, layer.get("full", 0), layer.get("kept", 0), _share(layer.get("kept", 0), layer.get("full", 0)))
            for index, layer in enumerate(layers)], header=("layer", "full", "kept", "kept %"))
    return lines


def _certificate_rows(certificate: dict | None) -> list[tuple]:
    """The certificate's lines of `emloc inspect`: how the memory answered its held-out rows, and how it is asked."""
    if not certificate:
        return [("certificate", "none (built with validation=0, or by an older emloc)")]
    if "skipped" in certificate:
        return [("certificate", f"none: {certificate['skipped']}")]
    gain, interval = certificate.get("retained_gain"), certificate.get("retained_gain_interval")
    gain_text = "n/a (no many-shot gain on these rows)" if gain is None else \
        f"{100 * gain:.0f} %" + (f" [{100 * interval[0]:.0f}, {100 * interval[1]:.0f}]" if interval else "")
    verdict = "met" if certificate.get("met") else "MISSED"
    rungs = ", ".join(f"{r['rung']} ({100 * r['kept_ratio']:.1f} % kept, {r['build_seconds']:.0f} s)"
                      for r in certificate.get("rungs", []))
    return [
        ("certificate", f"{certificate['rows']} held-out demonstrations: accuracy {certificate['accuracy']:.2f} "
                        f"(full context {certificate['full_accuracy']:.2f}, zero-shot {certificate['zero_shot_accuracy']:.2f})"),
        ("retained gain", f"{gain_text}; target {certificate.get('target')}: {verdict}"
                          + ("; ONE ANSWER TO MOST ROWS (collapsed)" if certificate.get("collapsed") else "")),
        ("agreement with full", f"{certificate['agreement']:.2f}, mean JS over the choices {certificate['mean_js']:.4f}"),
        ("asked as", f"{certificate['recipe']} (chosen on the held-out rows; ask --recipe NAME for another)"),
        ("builds tried", rungs),
    ]


def _table(rows: list[tuple], header: tuple | None = None) -> list[str]:
    """Plain-text columns: the first left-aligned, numbers right-aligned; a rule under the header."""
    cells = [[str(cell) for cell in row] for row in ([header] if header else []) + list(rows)]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cells[0]))]
    numeric = [header is not None and i > 0 for i in range(len(widths))]
    lines = ["  ".join(cell.rjust(w) if right else cell.ljust(w) for cell, w, right in zip(row, widths, numeric)).rstrip()
             for row in cells]
    if header:
        lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def _share(part, whole) -> str:
    return f"{100 * part / whole:.1f}" if whole else "-"


def _size(count) -> str:
    if not isinstance(count, (int, float)):
        return "n/a"
    for unit in ("B", "KB", "MB", "GB"):
        if count < 1024 or unit == "GB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count:.1f} GB"


def _first_line(error: BaseException) -> str:
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


def _parse_value(text: str):
    """A method parameter from the command line: int, float, true/false/none, a comma-separated tuple, or text."""
    if "," in text:
        return tuple(_parse_value(part) for part in text.split(",") if part)
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def _split_method_params(argv: list[str], known: set[str]) -> tuple[list[str], dict]:
    """Takes the `--name value` (or `--name=value`) pairs whose option `known` does not hold out of `argv`:
    `(the rest, {"name": value})`."""
    rest, params, index = [], {}, 0
    while index < len(argv):
        token = argv[index]
        flag, equals, value = token.partition("=")
        if not token.startswith("--") or flag in known or token == "--":
            rest.append(token)
            index += 1
            continue
        if not equals:
            if index + 1 >= len(argv) or argv[index + 1].startswith("--"):
                raise UsageError(f"{flag}: a method parameter needs a value (--name value)")
            index += 1
            value = argv[index]
        params[flag[2:].replace("-", "_")] = _parse_value(value)
        index += 1
    return rest, params


# ---------------------------------------------------------------------------------------------------------------------
# The command line, its help drawn from the docstrings above
# ---------------------------------------------------------------------------------------------------------------------


def _docstring(function) -> tuple[str, str, dict[str, str]]:
    """`(first line, description, {argument: help})` of a Google-style docstring."""
    text = _inspect.getdoc(function) or ""
    body, _, args = text.partition("\nArgs:\n")
    helps, current = {}, None
    for line in args.splitlines():
        match = re.match(r"\s{4}(\w+): (.*)", line)
        if match:
            current = match.group(1)
            helps[current] = match.group(2)
        elif current and line.strip():
            helps[current] += " " + line.strip()
    return body.split("\n\n")[0].replace("\n", " "), body, helps


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="emloc", description=_docstring(sys.modules[__name__])[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name, function):
        summary, description, helps = _docstring(function)
        sub = commands.add_parser(name, help=summary, description=description, allow_abbrev=False,
                                  formatter_class=argparse.RawDescriptionHelpFormatter)
        signature = _inspect.signature(function)

        def argument(parameter, *flags, **kwargs):
            sub.add_argument(*flags, help=helps.get(parameter), **kwargs)

        return sub, argument, signature

    sub, argument, _ = command("build", build)
    argument("demos", "demos", metavar="DEMOS")
    argument("model", "--model", required=True, metavar="REPO")
    argument("out", "--out", required=True, metavar="DIR")
    argument("method", "--method")
    argument("chunk_size", "--chunk-size", type=int, metavar="N")
    argument("template", "--template", choices=("chat", "plain"))
    argument("instruction", "--instruction")
    argument("validation", "--validation", type=int, default=16, metavar="K")
    argument("target", "--target", type=float, default=0.9, metavar="GAIN")
    argument("checkpoint_dir", "--checkpoint-dir", metavar="DIR")
    argument("device", "--device")

    sub, argument, _ = command("ask", ask)
    argument("memory", "memory", metavar="MEMORY")
    argument("question", "question")
    argument("image", "--image", action="append", metavar="FILE")
    argument("video", "--video", metavar="FILE")
    argument("choices", "--choices", metavar="A,B,C")
    argument("model", "--model", metavar="REPO")
    argument("max_new_tokens", "--max-new-tokens", type=int, default=32, metavar="N")
    argument("device", "--device")
    argument("retrieve", "--retrieve", type=int, metavar="K")
    argument("calibrate", "--calibrate", action="store_true")
    argument("recipe", "--recipe", metavar="NAME")

    summary, description, _ = _docstring(evaluate)
    commands.add_parser("eval", help=summary, description=description, add_help=False)

    sub, argument, _ = command("push", push)
    argument("memory", "memory", metavar="MEMORY")
    argument("repo_id", "repo_id", metavar="REPO_ID")
    argument("private", "--private", action="store_true")
    argument("revision", "--revision", metavar="BRANCH")
    argument("commit_message", "--commit-message", default="Upload task memory", metavar="TEXT")

    sub, argument, _ = command("inspect", inspect)
    argument("memory", "memory", metavar="MEMORY")

    commands.add_parser("serve", help="Serve memories behind an OpenAI-compatible API (emloc_serve; emloc serve --help).",
                        add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    name = argv[0] if argv else None
    try:
        if name == "eval":  # the harness parses its own options (and prints its own --help)
            evaluate(argv[1:])
            return 0
        if name == "serve":  # the server parses its own options too
            import emloc_serve

            return emloc_serve.main(argv[1:])
        params = {}
        if name == "build":  # options build does not know are the method's parameters
            known = {flag for action in parser._subparsers._group_actions[0].choices["build"]._actions
                     for flag in action.option_strings}
            argv, params = _split_method_params(argv, known)
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return 2
        options = {key: value for key, value in vars(args).items() if key != "command"}
        {"build": build, "ask": ask, "push": push, "inspect": inspect}[args.command](**options, **params)
    except (ValueError, OSError, KeyError) as error:  # a user error: ours, the library's, or a file's
        if os.environ.get("EMLOC_DEBUG"):
            raise
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"emloc {name}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())

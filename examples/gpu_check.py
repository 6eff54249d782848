"""The GPU check in one command (`make gpu-check`): exactness in bfloat16 and float32, `device_map="auto"`, SDPA and
FlashAttention, and timings, on the machine it runs on.

1. Exactness, for each family — the tiny random Llama, Gemma 3 (sliding windows), Qwen2-VL and Qwen2.5-VL of
   `tiny_models.py` (the vision families with images, a video file, a list of frames and a video query) and the real
   SmolLM2-135M (iris, plain rendering) — in float32 and bfloat16, with the base model's attention as SDPA and, where
   the `flash_attn` package is installed (CUDA, bfloat16), FlashAttention 2: a memory with nothing pruned
   (`method="full"`, built chunk by chunk) must give a query the log-probabilities of the whole conversation fed to
   the stock base model (`tests/reference.py`). Bounds: in float32, max |Δ log p| over the vocabulary ≤ 2e-3; in
   bfloat16, whose 8-bit mantissa rounds differently when the context is cut into chunks, the memory must be as close
   to the float32 full context as the bfloat16 full context is (within 2× + 0.02, over each position's 10 likeliest
   tokens).
2. `device_map="auto"`: SmolLM2 in bfloat16 spread over every visible GPU (a per-GPU memory cap makes each take a
   share of the layers), its device map printed; exactness as in 1, and a default build that answers.
3. Timings (SmolLM2, iris, warmed up, synchronised): the default build ÷ one prefill of the whole context, and one
   query's `score_choices` with the memory ÷ the same without any (zero-shot).

It exits 1 when a check fails. Without CUDA it runs its CPU part — exactness in both dtypes with SDPA, `device_map="auto"`
on the CPU, timings on fewer demonstrations — and says what it skipped. `--model DIR` adds a model of your own (a
Qwen2-VL or a text model, loaded offline from a directory or the Hub cache) to the exactness and timing checks.

    python examples/gpu_check.py [--device cuda|cpu] [--demos 90] [--queries 20] [--model DIR]
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
for path in (HERE.parent, HERE, HERE.parent / "tests"):  # the library, the examples, the tests' reference and demos
    sys.path.insert(0, str(path))

FLOAT32_BOUND = 2e-3  # max |Δ log p| over the vocabulary (the bound for video)
BFLOAT16_FACTOR, BFLOAT16_SLACK = 2.0, 0.02  # bfloat16: see `judge`
TINY_FAMILIES = ("llama", "gemma3", "qwen2-vl", "qwen2.5-vl")


class Report:
    """The checks' rows, printed as they come with the seconds since the start; `failed` says whether any failed."""

    def __init__(self):
        self.failed = False
        self.started = time.perf_counter()

    def row(self, check: str, status: str, detail: str = "") -> None:
        self.failed |= status == "FAIL"
        print(f"{status:<5} {time.perf_counter() - self.started:5.0f}s {check:<52} {detail}", flush=True)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(function, device: str) -> tuple[float, object]:
    """`(seconds, result)` of one call, the device's queued work included."""
    synchronize(device)
    started = time.perf_counter()
    result = function()
    synchronize(device)
    return time.perf_counter() - started, result


# ---- cases: a base model and the demonstrations it is checked on ---------------------------------------------------


def tiny_case(family: str, workdir: Path) -> dict:
    from conftest import text_demos, text_queries
    from tiny_models import build_tiny_base

    base = build_tiny_base(family, workdir / family.replace(".", "_"))
    if family in ("llama", "gemma3"):
        return {"name": f"tiny {family}", "base": base, "template": "chat", "demos": text_demos(6),
                "query": text_queries(1)[0]}
    return {"name": f"tiny {family}", "base": base, "template": "chat", "demos": vision_demos(workdir),
            "query": vision_query(workdir)}


def vision_demos(workdir: Path) -> list[dict]:
    """Digits (images), a video file and a list of frames from real photographs (`clips.py`), and a text turn."""
    from clips import photo_frames, write_clip
    from conftest import image_demos

    question = "What is in the clip?"
    clip = workdir / "astronaut.mp4"
    if not clip.exists():
        write_clip(clip, photo_frames("astronaut"))
    return image_demos(2) + [
        {"video": str(clip), "question": question, "answer": "astronaut"},
        {"frames": photo_frames("chelsea"), "question": question, "answer": "cat"},
        {"question": "Say hello.", "answer": "hello"},
    ]


def vision_query(workdir: Path) -> dict:
    from clips import photo_frames, write_clip

    clip = workdir / "coffee.mp4"
    if not clip.exists():
        write_clip(clip, photo_frames("coffee"), codec="mpeg4")
    return {"video": str(clip), "question": "What is in the clip?"}


def smollm2_case(num_demos: int, num_queries: int, exact_demos: int) -> dict:
    from offline_models import base_model_dir
    from tasks import make_task

    demos, queries = make_task("iris", num_demos, num_queries)
    return {"name": "SmolLM2-135M", "base": base_model_dir("smollm2-135m"), "template": "plain", "demos": demos,
            "exact_demos": demos[:exact_demos], "query": queries[0], "queries": queries}


def own_case(path: str, workdir: Path, num_demos: int, num_queries: int, exact_demos: int) -> dict:
    """A model of the user's: vision-language (digits and clips) or text (iris, plain rendering)."""
    from processing_emloc import EmlocProcessor
    from tasks import make_task

    if EmlocProcessor.from_base(path).is_multimodal:
        return {"name": Path(path).name, "base": path, "template": "chat", "demos": vision_demos(workdir),
                "query": vision_query(workdir)}
    demos, queries = make_task("iris", num_demos, num_queries)
    return {"name": Path(path).name, "base": path, "template": "plain", "demos": demos,
            "exact_demos": demos[:exact_demos], "query": queries[0], "queries": queries}


def load(case: dict, **load_kwargs):
    from modeling_emloc import EmlocForConditionalGeneration
    from processing_emloc import EmlocProcessor

    model = EmlocForConditionalGeneration.from_base(str(case["base"]), **load_kwargs)
    return model, EmlocProcessor.from_base(str(case["base"]), template=case["template"])


# ---- the checks -----------------------------------------------------------------------------------------------------


@torch.no_grad()
def full_memory_and_full_context(model, processor, demos, query, chunk_size: int = 2):
    """Log-probabilities `[query_len, vocab]` (float32, CPU) of the query's tokens: after a `method="full"` memory built
    chunk by chunk, and after the whole conversation fed to the stock base model."""
    from reference import reference_logits

    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=chunk_size)
    expected = reference_logits(model, processor, demos, query).float().cpu().log_softmax(-1)
    batch = processor([query])
    batch.pop("token_types")
    return model(**batch, memory=memory).logits[0].float().cpu().log_softmax(-1), expected


def likeliest_difference(log_probs: torch.Tensor, reference: torch.Tensor, k: int = 10) -> float:
    """max |Δ log p| over each position's `k` likeliest tokens of `reference`."""
    likeliest = reference.topk(k, dim=-1).indices
    return (log_probs - reference).abs().gather(-1, likeliest).max().item()


def judge(ours: torch.Tensor, full: torch.Tensor, dtype: torch.dtype, truth: torch.Tensor | None) -> tuple[bool, str]:
    """`(passed, detail)`. float32: the memory within `FLOAT32_BOUND` of the full context over the whole vocabulary.
    bfloat16 rounds differently when the context comes in chunks, and its error grows with depth (SmolLM2's 30 layers:
    0.25 over the likeliest tokens, measured here), so a bound in log-probability says little; judged instead against
    the float32 full context (`truth`): the memory in bfloat16 must be as close to it as the full context in bfloat16
    is, within a factor `BFLOAT16_FACTOR` plus `BFLOAT16_SLACK`."""
    difference = (ours - full).abs().max().item()
    agree = (ours.argmax(-1) == full.argmax(-1)).float().mean().item()
    detail = f"max|Δlog p| {difference:.1e} to the full context, top-1 agrees at {agree:.0%} of {full.shape[0]} positions"
    if dtype == torch.float32:
        return difference <= FLOAT32_BOUND, detail
    ours_error, full_error = likeliest_difference(ours, truth), likeliest_difference(full, truth)
    detail += f"; off float32 (top-10): memory {ours_error:.1e}, full context {full_error:.1e}"
    return ours_error <= BFLOAT16_FACTOR * full_error + BFLOAT16_SLACK, detail


def check_exactness(report: Report, case: dict, device: str, attentions: list[str]) -> None:
    """Every dtype × attention of `case`; the float32 SDPA full context is kept as `case["truth"]`."""
    demos = case.get("exact_demos", case["demos"])
    for dtype in (torch.float32, torch.bfloat16):  # float32 first: bfloat16 is judged against it
        for attention in attentions:
            if attention == "flash_attention_2" and dtype != torch.bfloat16:
                continue  # FlashAttention runs in half precision only
            label = f"exact {case['name']} {str(dtype).removeprefix('torch.')} {attention}"
            model = processor = None
            try:
                model, processor = load(case, dtype=dtype, attn_implementation=attention, device_map={"": device})
                ours, full = full_memory_and_full_context(model, processor, demos, case["query"])
                if dtype == torch.float32 and attention == "sdpa":
                    case["truth"] = full
                passed, detail = judge(ours, full, dtype, case.get("truth"))
                report.row(label, "PASS" if passed else "FAIL", detail)
            except Exception as error:  # a check that cannot run is a failed check, reported with its reason
                report.row(label, "FAIL", f"{type(error).__name__}: {error}"[:300])
            finally:
                del model, processor
                if device.startswith("cuda"):
                    torch.cuda.empty_cache()


def spread_over_gpus(case: dict, dtype: torch.dtype) -> dict:
    """`device_map="auto"` load kwargs that give every visible GPU a share of the layers: each GPU's memory is capped
    at a little more than its share of the weights (accelerate otherwise fills the first GPU before the next)."""
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count < 2:
        return {"device_map": "auto"}
    on_disk = sum(file.stat().st_size for file in Path(case["base"]).glob("*.safetensors"))  # float32 checkpoints
    weights = on_disk * torch.tensor([], dtype=dtype).element_size() // 4
    share = int(weights / count * 1.3) + (64 << 20)
    return {"device_map": "auto", "max_memory": {index: share for index in range(count)} | {"cpu": 0}}


def check_device_map(report: Report, case: dict, device: str, build_demos: int) -> None:
    """`case` loaded with `device_map="auto"` (bfloat16 on GPUs; float32 on the CPU, where bfloat16 is slow)."""
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    load_kwargs = spread_over_gpus(case, dtype) if device.startswith("cuda") else {"device_map": "auto"}
    label = f"device_map=auto {case['name']} {str(dtype).removeprefix('torch.')}"
    try:
        model, processor = load(case, dtype=dtype, **load_kwargs)
        placement = getattr(model.model, "hf_device_map", {"": str(model.model.device)})
        devices = sorted({str(where) for where in placement.values()})
        visible = torch.cuda.device_count() if device.startswith("cuda") else 0
        spread = ", ".join(
            f"{where}: " + ("the whole model" if placement.get("") is not None else
                            f"{sum(1 for name, at in placement.items() if str(at) == where and 'layers.' in name)} layers")
            for where in devices)
        print(f"      device map over {len(devices)} device(s) ({visible} GPU(s) visible): {spread}", flush=True)
        if visible >= 2 and len(devices) < 2:
            report.row(label, "FAIL", f"{visible} GPUs visible, the model landed on {devices}")
        ours, full = full_memory_and_full_context(model, processor, case["exact_demos"], case["query"])
        passed, detail = judge(ours, full, dtype, case.get("truth"))
        report.row(label + " exact", "PASS" if passed else "FAIL", detail)
        memory = model.build_memory(case["demos"][:build_demos], processor=processor)
        scores = model.score_choices(case["queries"][:4], memory=memory, processor=processor)
        finite = all(torch.isfinite(torch.tensor(row)).all() for row in scores)
        report.row(label + " default build", "PASS" if finite else "FAIL",
                   f"{build_demos} demos, kept {memory.stats['totals'].get('kept_ratio', float('nan')):.0%} of the KV; "
                   f"{len(scores)} queries scored")
    except Exception as error:
        report.row(label, "FAIL", f"{type(error).__name__}: {error}"[:300])


@torch.no_grad()
def check_timings(report: Report, case: dict, device: str, dtype: torch.dtype) -> None:
    """Build ÷ prefill and query ÷ zero-shot, after a warm-up of each path."""
    from reference import full_inputs

    model, processor = load(case, dtype=dtype, device_map={"": device})
    demos, queries = case["demos"], case["queries"]
    model.build_memory(demos[:4], processor=processor)  # warm-up: kernels, allocator, the processor's caches
    inputs = {k: v.to(device) for k, v in full_inputs(processor, demos).items() if isinstance(v, torch.Tensor)}
    model.model(**inputs)
    prefill, _ = timed(lambda: model.model(**inputs), device)
    build, memory = timed(lambda: model.build_memory(demos, processor=processor), device)
    model.score_choices(queries[:1], memory=memory, processor=processor)
    model.score_choices(queries[:1], processor=processor)
    with_memory, scores = timed(lambda: [model.score_choices([q], memory=memory, processor=processor)[0] for q in queries],
                                device)
    zero_shot, zero_scores = timed(lambda: [model.score_choices([q], processor=processor)[0] for q in queries], device)

    def accuracy(rows):
        return sum(q["choices"][max(range(len(s)), key=s.__getitem__)] == q["answer"] for q, s in zip(queries, rows)) / len(queries)

    name = f"{case['name']} {str(dtype).removeprefix('torch.')}"
    tokens = inputs["input_ids"].shape[1]
    print(f"      timings {name}: {len(demos)} demos ({tokens} tokens), {len(queries)} queries", flush=True)
    print(f"      build {build:.2f} s ÷ prefill {prefill * 1e3:.1f} ms = {build / prefill:.1f}×; kept "
          f"{memory.stats['totals'].get('kept_ratio', float('nan')):.0%} of the KV", flush=True)
    print(f"      query {with_memory / len(queries) * 1e3:.1f} ms ÷ zero-shot {zero_shot / len(queries) * 1e3:.1f} ms = "
          f"{with_memory / zero_shot:.2f}×; accuracy {accuracy(scores):.2f} with the memory, "
          f"{accuracy(zero_scores):.2f} zero-shot", flush=True)
    report.row(f"timings {name}", "PASS", f"build ÷ prefill {build / prefill:.1f}×, query ÷ zero-shot "
                                          f"{with_memory / zero_shot:.2f}×")


def describe(device: str) -> str:
    import transformers

    line = f"torch {torch.__version__}, transformers {transformers.__version__}, Python {platform.python_version()}"
    if device.startswith("cuda"):
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        return f"{line}; {len(names)} GPU(s): {', '.join(names)}; CUDA {torch.version.cuda}"
    return f"{line}; CPU only ({torch.get_num_threads()} threads)"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0], epilog=__doc__.split("\n\n", 1)[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--demos", type=int, help="demonstrations of the timing run (default 90 on CUDA, 8 on the CPU)")
    parser.add_argument("--queries", type=int, help="queries of the timing run (default 20 on CUDA, 3 on the CPU)")
    parser.add_argument("--model", help="also check this model (a directory or a Hub id in the local cache)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device")
    cuda = args.device == "cuda"
    device = "cuda:0" if cuda else "cpu"
    # the CPU part is small: a bfloat16 SmolLM2 pass and a default build are slow on a CPU (minutes on 2 cores)
    num_demos = args.demos or (90 if cuda else 8)
    num_queries = args.queries or (20 if cuda else 3)
    exact_demos, build_demos = (24, 24) if cuda else (8, 6)
    # float32 means float32: no TF32 in matmuls or convolutions (the vision towers' patch embedding is a Conv3d)
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False

    print(describe(device), flush=True)
    report = Report()
    attentions = ["sdpa"]
    if cuda and importlib.util.find_spec("flash_attn") is not None:
        attentions.append("flash_attention_2")
    else:
        report.row("FlashAttention 2", "SKIP", "needs CUDA and the flash_attn package" if cuda else "needs CUDA")
    with tempfile.TemporaryDirectory() as workdir:
        workdir = Path(workdir)
        cases = [tiny_case(family, workdir) for family in TINY_FAMILIES]
        smollm2 = smollm2_case(num_demos, num_queries, exact_demos)
        cases.append(smollm2)
        own = own_case(args.model, workdir, num_demos, num_queries, exact_demos) if args.model else None
        if own is not None:
            cases.append(own)
        for case in cases:
            check_exactness(report, case, device, attentions)
        if not cuda:
            report.row("device_map=auto over GPUs", "SKIP", "no CUDA: device_map='auto' runs on the CPU alone")
        check_device_map(report, smollm2, device, build_demos)
        for case in [smollm2] + ([own] if own is not None and "queries" in own else []):
            for dtype in ((torch.bfloat16, torch.float32) if cuda else (torch.float32,)):
                try:
                    check_timings(report, case, device, dtype)
                except Exception as error:
                    report.row(f"timings {case['name']}", "FAIL", f"{type(error).__name__}: {error}"[:300])
    peak = f", peak GPU memory {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB" if cuda else ""
    print(f"{'FAILED' if report.failed else 'all checks passed'} in {time.perf_counter() - report.started:.0f} s{peak}")
    return 1 if report.failed else 0


if __name__ == "__main__":
    sys.exit(main())

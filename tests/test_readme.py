"""Every Python block of the README runs, in order, in one fresh process — so the README cannot rot.

The blocks name Hub repos (`you/smollm2-emloc`, `Qwen/Qwen2-VL-2B-Instruct`): a local Hub-compatible server serves
tiny stand-ins under those names (a tiny Llama-style Emloc repo rendering plain few-shot text, a tiny Qwen2-VL base),
and the real `huggingface_hub` client talks to it. `demos.jsonl` holds real iris demonstrations."""

import re
import subprocess
import sys

from conftest import ROOT
from demo_files import write_jsonl

UPLOAD = """
import sys
from huggingface_hub import HfApi
api = HfApi()
for folder, repo_id in zip(sys.argv[1::2], sys.argv[2::2]):
    api.create_repo(repo_id, exist_ok=True)
    api.upload_folder(folder_path=folder, repo_id=repo_id)
"""


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.S | re.M)


def test_every_python_block_of_the_readme_runs(tiny, local_hub, tmp_path):
    from tasks import make_task

    hub, env = local_hub
    blocks = python_blocks((ROOT / "README.md").read_text())
    assert len(blocks) >= 2 and "build_memory" in blocks[0]
    model, processor, _ = tiny("llama", template="plain")
    stand_in = tmp_path / "smollm2-emloc"
    model.save_pretrained(stand_in)
    processor.save_pretrained(stand_in)
    _, _, qwen_base = tiny("qwen2-vl")
    uploaded = subprocess.run([sys.executable, "-c", UPLOAD, str(stand_in), "you/smollm2-emloc", str(qwen_base),
                               "Qwen/Qwen2-VL-2B-Instruct"], env=env, capture_output=True, text=True, timeout=300)
    assert uploaded.returncode == 0, uploaded.stderr[-3000:]

    work = tmp_path / "work"
    demos, _ = make_task("iris", 40, 4)  # enough to hold 8 out for the certificate
    write_jsonl(work, demos)  # work/demos.jsonl
    env = dict(env, PYTHONPATH=str(ROOT))
    ran = subprocess.run([sys.executable, "-c", "\n\n".join(blocks)], cwd=work, env=env, capture_output=True, text=True,
                         timeout=600, stdin=subprocess.DEVNULL)
    assert ran.returncode == 0, ran.stderr[-4000:]
    assert "of the context's KV kept; asked as" in ran.stdout
    assert (work / "iris-memory" / "memory.safetensors").is_file() and (work / "my-emloc" / "config.json").is_file()
    assert any(path.startswith("/api/models/you/iris-memory") for _, path in hub.requests)

"""An Emloc repo loads with AutoConfig/AutoModel/AutoProcessor(trust_remote_code=True) in a process that never
imports the project, and answers as the model that saved it."""

import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import FAMILIES, ROOT, demos_for, queries_for
from configuration_emloc import EmlocConfig

LOAD_AND_ANSWER = """
import json, sys, torch
from transformers import AutoConfig, AutoModel, AutoProcessor
repo, out = sys.argv[1], sys.argv[2]
assert "modeling_emloc" not in sys.modules
config = AutoConfig.from_pretrained(repo, trust_remote_code=True)
model = AutoModel.from_pretrained(repo, trust_remote_code=True)
processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
queries = torch.load(out + "/queries.pt", weights_only=False)
demos = torch.load(out + "/demos.pt", weights_only=False)
memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
batch = processor(queries)
batch.pop("token_types")
torch.save(model(**batch, memory=memory).logits, out + "/logits.pt")
compressed = model.build_memory(demos, processor=processor, chunk_size=2)  # the default rule: every module at work
torch.save(model.score_choices(queries, memory=compressed, processor=processor, calibrate=True), out + "/scores.pt")
print(json.dumps({"config": type(config).__name__, "model": type(model).__name__, "processor": type(processor).__name__,
                  "module": type(model).__module__}))
"""


def _clean_env():
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_repo_loads_as_remote_code_in_a_fresh_process(tiny, family, tmp_path):
    model, processor, _ = tiny(family)
    repo = tmp_path / "repo"
    model.save_pretrained(repo)
    processor.save_pretrained(repo)
    # the repo carries every module of the library (they import one another)
    assert {p.name for p in repo.glob("*_emloc.py")} == {p.name for p in ROOT.glob("*_emloc.py")}
    config = json.loads((repo / "config.json").read_text())
    assert config["auto_map"]["AutoModel"] == "modeling_emloc.EmlocForConditionalGeneration"
    assert config["model_type"] == "emloc"

    demos, queries = demos_for(family, 3), queries_for(family, 2)
    torch.save(demos, tmp_path / "demos.pt")
    torch.save(queries, tmp_path / "queries.pt")
    result = subprocess.run([sys.executable, "-c", LOAD_AND_ANSWER, str(repo), str(tmp_path)], cwd=tmp_path,
                            env=_clean_env(), capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr[-3000:]
    loaded = json.loads([line for line in result.stdout.splitlines() if line.startswith("{")][-1])
    assert loaded["config"] == "EmlocConfig" and loaded["model"] == "EmlocForConditionalGeneration"
    assert loaded["processor"] == "EmlocProcessor"
    assert loaded["module"].startswith("transformers_modules.")  # the repo's copy, not the project's

    memory = model.build_memory(demos, processor=processor, method="full", chunk_size=2)
    batch = processor(queries)
    batch.pop("token_types")
    expected = model(**batch, memory=memory).logits
    torch.testing.assert_close(torch.load(tmp_path / "logits.pt"), expected, atol=1e-5, rtol=0)
    compressed = model.build_memory(demos, processor=processor, chunk_size=2)
    scores = model.score_choices(queries, memory=compressed, processor=processor, calibrate=True)
    torch.testing.assert_close(torch.tensor(torch.load(tmp_path / "scores.pt")), torch.tensor(scores), atol=1e-5, rtol=0)


def test_config_round_trip(tmp_path):
    from transformers import LlamaConfig

    config = EmlocConfig(base_config=LlamaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                                 num_key_value_heads=2, vocab_size=100),
                         delta=0.01, ratios=[0.05, 0.3], chunk_size=8, probe="future")
    config.save_pretrained(tmp_path)
    loaded = EmlocConfig.from_pretrained(tmp_path)
    assert (loaded.delta, loaded.ratios, loaded.chunk_size, loaded.probe) == (0.01, [0.05, 0.3], 8, "future")
    assert type(loaded.base_config).__name__ == "LlamaConfig"
    assert loaded.base_config.to_diff_dict() == config.base_config.to_diff_dict()

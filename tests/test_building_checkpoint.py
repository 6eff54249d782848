"""A build that can be stopped and resumed (issue 10): `build_memory(..., checkpoint_dir=…)` records each chunk, and a
rerun with the same arguments continues from the last complete chunk to the same memory bytes."""

import json
import signal
import subprocess
import sys

import pytest

from conftest import ROOT, demos_for
from demo_files import write_jsonl
from building_emloc import CHECKPOINT_STATE_NAME, CheckpointError


PAPER = {"method": "emloc", "delta": 0.005, "ratios": (0.1, 0.2, 0.5), "probe": "self", "over": "vocab", "chunk_size": 2}
FULL = {"method": "full", "chunk_size": 2}

KILLED_BUILD = """
import json, os, signal, sys
sys.path.insert(0, sys.argv[1])
from modeling_emloc import EmlocForConditionalGeneration
from processing_emloc import EmlocProcessor
base, demos, checkpoint, kill_after, params = sys.argv[2], sys.argv[3], sys.argv[4], int(sys.argv[5]), json.loads(sys.argv[6])
model = EmlocForConditionalGeneration.from_base(base)
processor = EmlocProcessor.from_base(base)

def progress(done, total):  # called once a chunk is recorded: die there, as a killed job would
    if done == kill_after:
        os.kill(os.getpid(), signal.SIGKILL)

model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint, progress=progress, **params)
"""


class Stop(Exception):
    pass


def _stop_after(chunks):
    def progress(done, total):
        if done == chunks:
            raise Stop
    return progress


def _same_memory(a, b, tmp_path):
    """The two memories have the same `memory.safetensors` bytes and the same statistics but for time."""
    first, second = a.save_pretrained(tmp_path / "a"), b.save_pretrained(tmp_path / "b")
    assert (first / "memory.safetensors").read_bytes() == (second / "memory.safetensors").read_bytes()
    untimed = [json.loads((path / "memory_config.json").read_text()) for path in (first, second)]
    for config in untimed:
        config["build"].pop("seconds")
    assert untimed[0] == untimed[1]


def _files(directory):
    return {path.name: path.read_bytes() for path in sorted(directory.iterdir())}


@pytest.mark.parametrize("params", [PAPER, FULL], ids=["emloc", "full"])
def test_a_build_killed_midway_resumes_to_the_same_bytes(tiny, tmp_path, params):
    model, processor, base_dir = tiny("llama")
    demos = write_jsonl(tmp_path, demos_for("llama", 9))  # 5 chunks of 2
    checkpoint = tmp_path / "checkpoint"
    killed = subprocess.run([sys.executable, "-c", KILLED_BUILD, str(ROOT), str(base_dir), str(demos), str(checkpoint),
                             "2", json.dumps(params)], timeout=300)
    assert killed.returncode == -signal.SIGKILL
    assert len(json.loads((checkpoint / CHECKPOINT_STATE_NAME).read_text())["chunks"]) == 2

    computed = []
    resumed = model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint,
                                 progress=lambda done, total: computed.append(done), **params)
    assert computed == [3, 4, 5]  # the two recorded chunks are not computed again
    _same_memory(resumed, model.build_memory(demos, processor=processor, **params), tmp_path)

    computed.clear()  # a finished build's directory gives its memory without computing
    again = model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint,
                               progress=lambda done, total: computed.append(done), **params)
    assert computed == []
    _same_memory(again, resumed, tmp_path / "again")


def test_random_method_resumes_to_the_same_bytes(tiny, tmp_path):
    """Its seeds follow the chunks' demonstration indices, not how many chunks a run has built."""
    model, processor, _ = tiny("llama")
    demos, params = demos_for("llama", 7), {"method": "random", "ratio": 0.3, "chunk_size": 2}
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", progress=_stop_after(1), **params)
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", progress=_stop_after(3), **params)
    resumed = model.build_memory(demos, processor=processor, checkpoint_dir=tmp_path / "c", **params)
    _same_memory(resumed, model.build_memory(demos, processor=processor, **params), tmp_path)


def test_appending_resumes_and_leaves_the_given_memory_alone(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    demos = demos_for("llama", 8)
    first = model.build_memory(demos[:4], processor=processor, method="full", chunk_size=2)
    before = first.digest()
    with pytest.raises(Stop):
        model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2, append_to=first,
                           checkpoint_dir=tmp_path / "c", progress=_stop_after(1))
    resumed = model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2, append_to=first,
                                 checkpoint_dir=tmp_path / "c")
    assert first.digest() == before
    _same_memory(resumed, model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2,
                                             append_to=first), tmp_path)
    other = model.build_memory(demos[:2], processor=processor, method="full", chunk_size=2)
    with pytest.raises(CheckpointError, match=r"append_to: '[0-9a-f]+' then, '[0-9a-f]+' now"):
        model.build_memory(demos[4:], processor=processor, method="full", chunk_size=2, append_to=other,
                           checkpoint_dir=tmp_path / "c")


def test_other_arguments_are_refused_naming_what_differs(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    demos = write_jsonl(tmp_path, demos_for("llama", 6))
    checkpoint = tmp_path / "checkpoint"
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint, progress=_stop_after(1), **PAPER)
    recorded = _files(checkpoint)
    for params, message in [
        ({**PAPER, "chunk_size": 3}, r"chunk_size: 2 then, 3 now"),
        ({**PAPER, "delta": 0.01}, r"method\.params\.delta: 0\.005 then, 0\.01 now"),
        (FULL, r"method\.name: 'emloc' then, 'full' now"),
    ]:
        with pytest.raises(CheckpointError, match=message):
            model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint, **params)
    demos.write_text(demos.read_text().replace('"answer": "', '"answer": "x', 1))
    with pytest.raises(CheckpointError, match=r"holds a build with other arguments \(demonstrations\.sha256: .*delete the directory"):
        model.build_memory(demos, processor=processor, checkpoint_dir=checkpoint, **PAPER)
    _, plain, _ = tiny("llama", "plain")
    with pytest.raises(CheckpointError, match=r"rendering\.template: 'chat' then, 'plain' now"):
        model.build_memory(text_file := write_jsonl(tmp_path / "plain", demos_for("llama", 6)), processor=plain,
                           checkpoint_dir=checkpoint, **PAPER)
    assert text_file.exists() and _files(checkpoint) == recorded  # refusals touch nothing


def test_a_directory_that_is_not_a_checkpoint_is_refused(tiny, tmp_path):
    model, processor, _ = tiny("llama")
    memory = model.build_memory(demos_for("llama", 2), processor=processor, method="full")
    path = memory.save_pretrained(tmp_path / "memory")
    with pytest.raises(CheckpointError, match=r"not a build checkpoint \(it holds 'README\.md'\)"):
        model.build_memory(demos_for("llama", 2), processor=processor, method="full", checkpoint_dir=path)


def test_leftovers_of_an_interrupted_write_are_ignored(tiny, tmp_path):
    """A crash while writing leaves a temporary file, or a chunk file the state never recorded: both are dropped."""
    model, processor, _ = tiny("llama")
    demos, checkpoint = demos_for("llama", 6), tmp_path / "checkpoint"
    with pytest.raises(Stop):
        model.build_memory(demos, processor=processor, method="full", chunk_size=2, checkpoint_dir=checkpoint,
                           progress=_stop_after(1))
    (checkpoint / ".tmp-half-written").write_bytes(b"\0" * 10)
    (checkpoint / "chunk-00001.safetensors").write_bytes(b"truncated")
    resumed = model.build_memory(demos, processor=processor, method="full", chunk_size=2, checkpoint_dir=checkpoint)
    assert sorted(p.name for p in checkpoint.iterdir()) == [
        CHECKPOINT_STATE_NAME, "chunk-00000.safetensors", "chunk-00001.safetensors", "chunk-00002.safetensors"]
    _same_memory(resumed, model.build_memory(demos, processor=processor, method="full", chunk_size=2), tmp_path)

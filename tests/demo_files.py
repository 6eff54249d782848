"""Demonstrations written as a JSONL file, their images as PNG files beside it (paths relative to the file)."""

import json
from pathlib import Path


def write_jsonl(directory, demos, name: str = "demos.jsonl") -> Path:
    """Writes `demos` (dicts in the format of design §6, images as PIL images) to `directory/name`; each PIL image
    becomes `img/{n}.png`, numbered in order of appearance. Returns the file's path."""
    from PIL import Image

    directory = Path(directory)
    (directory / "img").mkdir(parents=True, exist_ok=True)
    count = 0

    def saved(value):
        nonlocal count
        if isinstance(value, Image.Image):
            relative = f"img/{count}.png"
            count += 1
            value.save(directory / relative)
            return relative
        if isinstance(value, list):
            return [saved(item) for item in value]
        if isinstance(value, dict):
            return {key: saved(item) for key, item in value.items()}
        return value

    path = directory / name
    path.write_text("".join(json.dumps(saved(demo)) + "\n" for demo in demos))
    return path

"""The benchmark's tasks from installed data: the Fashion-MNIST drawings read from IDX files (written here, so the
test does not need Debian's package), and the one clear error when the package is missing."""

import gzip

import numpy as np
import pytest

import tasks


def _write_idx(path, array: np.ndarray) -> None:
    """An IDX file as MNIST ships it: zero, zero, the uint8 type code, the number of dimensions, each dimension as a
    big-endian int32, then the bytes; gzipped."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


@pytest.fixture
def fashion_dir(tmp_path, monkeypatch):
    """Fashion-MNIST's test files with 210 images per class. Image i of the task's three classes is a bar four pixels
    wide (pooled column `label % 7`) of brightness 255 - i; the seven classes the task leaves out are noise."""
    rng = np.random.default_rng(0)
    images, labels = [], []
    for i in range(210):
        for label in range(10):
            image = np.zeros((28, 28), dtype=np.uint8)
            if label in (1, 7, 8):
                image[:, 4 * (label % 7): 4 * (label % 7) + 4] = 255 - i  # a whole pooled column, the same shade
            else:
                image = rng.integers(0, 256, (28, 28), dtype=np.uint8)
            images.append(image)
            labels.append(label)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", np.stack(images))
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.array(labels))
    monkeypatch.setattr(tasks, "FASHION_MNIST", tmp_path)
    return tmp_path


def test_idx_files_are_read_with_the_shape_of_their_header(tmp_path):
    array = np.arange(2 * 3 * 4).reshape(2, 3, 4)
    _write_idx(tmp_path / "a.gz", array)
    read = tasks._idx(tmp_path / "a.gz")
    assert read.shape == (2, 3, 4) and read.dtype == np.uint8
    assert (read == array).all()


def test_fashion_drawings_are_the_first_images_of_three_classes_pooled_to_seven_by_seven(fashion_dir):
    rows, answers, labels, _ = tasks.TASKS["fashion_text"]()
    assert labels == ["trouser", "sneaker", "bag"]
    assert len(rows) == 600 and [answers.count(label) for label in labels] == [200, 200, 200]
    # the first trouser (class 1, brightness 255): pooled column 1 at the brightest shade, the rest blank
    first = rows[0].split("\n")
    assert first == ["| @     |"] * 7
    # the 200th sneaker (class 7, column 0, brightness 255 - 199 = 56: shade index 56 * 10 // 256 = 2)
    assert rows[399].split("\n") == ["|:      |"] * 7
    # every line sits between bars (a row that began with a blank could not start a memory's cut)
    assert all(line.startswith("|") and line.endswith("|") and len(line) == 9 for row in rows for line in row.split("\n"))
    demos, queries = tasks.make_task("fashion_text", 90, 240, seed=1)
    assert {d["answer"] for d in demos} == set(labels) and len(queries) == 240
    assert {d["id"] for d in demos}.isdisjoint(q["id"] for q in queries)


def test_fashion_without_the_package_names_it(tmp_path, monkeypatch):
    monkeypatch.setattr(tasks, "FASHION_MNIST", tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        tasks.make_task("fashion_text", 90, 60)

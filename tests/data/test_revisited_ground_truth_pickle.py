"""The revisited ground truth ``gnd_<name>.pkl`` is read by an unpickler that admits only what the benchmark's files
hold (builtins containers, numbers and strings, numpy arrays and scalars): a real-shaped file loads, and a file
whose payload would run code is refused before the code runs."""

from __future__ import annotations

import io
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from recallk.data import build_dataset
from recallk.data.datasets.revisited import load_ground_truth
from tests.helpers.dataset_trees import REVISITED_IMLIST, make_revisited

GND = [  # the ground truth of make_revisited, as the benchmark's files store it (numpy arrays)
    {"bbx": np.array([1.0, 2.0, 9.0, 8.0]), "easy": np.array([0]), "hard": np.array([3]), "junk": np.array([2])},
    {"bbx": np.array([0.4, 0.6, 10.5, 9.2]), "easy": np.array([], dtype=np.int64), "hard": np.array([1]),
     "junk": np.array([0])},
]


def real_shaped(name: str) -> dict:
    imlist = REVISITED_IMLIST[name]
    return {"imlist": list(imlist), "qimlist": [imlist[3], imlist[1]], "gnd": [dict(g) for g in GND]}


def globals_of(data: bytes) -> set[tuple[str, str]]:
    """The (module, name) pairs a pickle asks for, as the unpickler sees them (before fix_imports)."""
    found = set()

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            found.add((module, name))
            return super().find_class(module, name)

    Recorder(io.BytesIO(data)).load()
    return found


def as_numpy_1(data: bytes) -> bytes:
    """A protocol 0-2 pickle with numpy 1.x's module names (``numpy.core``), as the benchmark's files were written:
    those protocols spell a global as the text ``c<module>\\n<name>\\n``, so the names can be replaced in place."""
    return data.replace(b"numpy._core.", b"numpy.core.")


def check_ground_truth(imlist, qimlist, gnd, name):
    assert imlist == REVISITED_IMLIST[name] and qimlist == [imlist[3], imlist[1]]
    assert [g["bbx"].tolist() for g in gnd] == [[1.0, 2.0, 9.0, 8.0], [0.4, 0.6, 10.5, 9.2]]
    assert [[g[k].tolist() for k in ("easy", "hard", "junk")] for g in gnd] == [[[0], [3], [2]], [[], [1], [0]]]
    assert all(g[k].dtype == np.int64 for g in gnd for k in ("easy", "hard", "junk"))


@pytest.mark.parametrize("protocol", [0, 2, 3, 4, 5, "2, numpy 1.x names", "0, numpy 1.x names"])
def test_a_real_shaped_ground_truth_file_loads(tmp_path, protocol):
    name = "roxford5k"
    expected, _ = make_revisited(tmp_path, name)
    data = pickle.dumps(real_shaped(name), protocol=int(str(protocol)[0]))
    if isinstance(protocol, str):
        data = as_numpy_1(data)
        assert ("numpy.core.multiarray", "_reconstruct") in globals_of(data)
    path = tmp_path / f"gnd_{name}.pkl"
    path.write_bytes(data)
    check_ground_truth(*load_ground_truth(path, name), name)
    database, query = build_dataset(name, tmp_path, "database"), build_dataset(name, tmp_path, "query")
    assert database.paths == [str(p) for p, _ in expected["database"]]
    assert query.paths == [str(p) for p, _ in expected["query"]]
    assert [database.classes[y] for y in database.labels] == [c for _, c in expected["database"]]
    np.testing.assert_array_equal(query.boxes, [[1.0, 2.0, 9.0, 8.0], [0.4, 0.6, 10.5, 9.2]])
    assert [g["junk"].tolist() for g in database.ground_truth] == [[2], [0]]


class _System:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return os.system, (f"echo tampered > '{self.target}'",)


class _Open:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return open, (str(self.target), "w")


class _WriteText:
    def __init__(self, target: Path):
        self.target = target

    def __reduce__(self):
        return Path.write_text, (self.target, "tampered")


@pytest.mark.parametrize("payload, refused", [(_System, "system"), (_Open, r"\.open"),
                                              (_WriteText, "getattr|Path.write_text")])
@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_a_pickle_that_would_write_a_file_is_refused_and_writes_nothing(tmp_path, payload, refused, protocol):
    name = "rparis6k"
    make_revisited(tmp_path, name)
    target = tmp_path / "written_by_the_pickle.txt"
    cfg = real_shaped(name)
    cfg["gnd"][1]["junk"] = payload(target)  # deep inside an otherwise real file
    path = tmp_path / f"gnd_{name}.pkl"
    path.write_bytes(pickle.dumps(cfg, protocol=protocol))
    with pytest.raises(ValueError) as raised:
        build_dataset(name, tmp_path, "database")
    assert not target.exists()
    message = str(raised.value)
    assert str(path) in message and re.search(rf"the global \S*({refused})", message), message
    assert "not a revisited ground-truth file" in message and "re-download" in message
    with pytest.raises(ValueError, match="not a revisited ground-truth file"):
        load_ground_truth(path, name)
    assert not target.exists()


def test_other_globals_and_codecs_are_refused(tmp_path):
    """Anything beyond containers, numbers, strings and numpy arrays is refused, even without side effects; the
    one codec call of protocol 0-2 pickles (bytes as latin-1 text) accepts nothing but latin-1."""
    path = tmp_path / "gnd_roxford5k.pkl"
    for value in (Path("x"), np.random.default_rng(0), pickle.PickleError("x")):
        path.write_bytes(pickle.dumps({**real_shaped("roxford5k"), "extra": value}, protocol=4))
        with pytest.raises(ValueError, match="not a revisited ground-truth file"):
            load_ground_truth(path, "roxford5k")
    rot13 = b"\x80\x02c_codecs\nencode\nX\x03\x00\x00\x00abcX\x05\x00\x00\x00rot13\x86R."
    assert pickle.loads(rot13) == "nop"  # what plain pickle does with it
    path.write_bytes(rot13)
    with pytest.raises(ValueError, match="latin-1"):
        load_ground_truth(path, "roxford5k")

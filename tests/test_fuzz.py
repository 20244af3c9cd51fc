"""Property-based tests: the IDX reader either returns what the header declares
or raises the project's DataError, never anything else."""

import gzip
import struct

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from vaelab.data import encode_idx, parse_idx, read_file_bytes
from vaelab.errors import DataError


def check(data: bytes) -> None:
    try:
        array = parse_idx(data, "fuzz")
    except DataError:
        return
    ndim = data[3]
    shape = struct.unpack(f">{ndim}I", data[4:4 + 4 * ndim])
    assert array.shape == shape and array.dtype == np.uint8


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_random_bytes_parse_or_raise_data_error(data):
    check(data)


@st.composite
def mutated_idx(draw):
    shape = draw(st.lists(st.integers(0, 5), min_size=1, max_size=3))
    data = bytearray(encode_idx(np.zeros(shape, dtype=np.uint8)))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["flip", "cut", "grow"]))
        if kind == "flip" and data:
            i = draw(st.integers(0, len(data) - 1))
            data[i] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[draw(st.integers(0, len(data))):]
        else:
            data += draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@settings(max_examples=500, deadline=None)
@given(mutated_idx())
def test_mutated_idx_files_parse_or_raise_data_error(data):
    check(data)


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=100))
def test_damaged_gzip_raises_data_error(tmp_path_factory, payload):
    path = tmp_path_factory.mktemp("gz") / "x.gz"
    blob = gzip.compress(encode_idx(np.zeros((2, 3), dtype=np.uint8)))
    path.write_bytes(blob[:len(payload) % len(blob)] + payload)
    try:
        check(read_file_bytes(path))
    except DataError:
        pass

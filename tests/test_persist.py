"""Saved memories: a reopened or extended memory computes exactly what the in-process one does,
every damaged or mismatched file is refused with a clear error, and interrupted writes never
damage the memory already on disk."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import blockmem
from blockmem.attention import create_method
from blockmem.engine.saved import SavedMemory, check_method
from blockmem.eval.systems import parse_method
from blockmem.errors import MemoryFileError
from blockmem.memory import persist
from blockmem.memory.tiers import TierConfig

SMALL = dict(n_init=4, n_local=16, block_size=8, topk=2)
DOC_A = ("a.txt", "The quick brown fox jumps over the lazy dog. " * 12)
DOC_B = ("b.txt", "Paris is the capital of France. Numbers 0 1 2 3 4 5. " * 8)
QUESTION = "Where is Paris?"


def _method(spec: str = "infllm"):
    """A method for these small documents; `spec` may carry options: 'infllm:pooled_fraction=0.5'."""
    name, extra = parse_method(spec)
    options = dict(SMALL, switch_length=0) if name in ("blocksparse", "nosa") else dict(SMALL)
    return create_method(name, **options, **extra)


def _logits_after(engine: blockmem.Engine, cache, ids: list[int], steps: int = 4) -> list[torch.Tensor]:
    out = [engine.prefill(ids, cache)]
    for _ in range(steps):
        out.append(engine._forward([int(out[-1].argmax())], cache))
    cache.close()
    return out


def _build(model, path: Path, docs=(DOC_A, DOC_B), method: str = "infllm", **kw) -> SavedMemory:
    return SavedMemory.build(model, list(docs), path, _method(method), prefill_chunk=32, **kw)


@pytest.mark.parametrize("name", ["infllm", "infllm:pooled_fraction=0.5,pooled_rows=4",
                                  "infllm:pooled_fraction=0.5,pooled_rows=4,pooled_hold=true", "blocksparse", "nosa",
                                  "quest", "streaming"])
def test_reopened_memory_computes_what_the_in_process_one_does(tiny_llama, tmp_path, name) -> None:
    memory = _build(tiny_llama, tmp_path / "m.bmem", method=name)
    # In process: the same documents through a live cache, read caches settled after each.
    engine = blockmem.Engine(tiny_llama, _method(name), prefill_chunk=32)
    cache = engine.new_cache()
    tokens = memory.file.array("tokens").tolist()
    first = tokens[: memory.header["documents"][0]["tokens"]]
    for ids in (first, tokens[len(first):]):
        engine.prefill(ids, cache)
        cache.settle()
    question = memory.question_ids(QUESTION)
    expected = _logits_after(engine, cache, question)
    reopened = SavedMemory.open(tmp_path / "m.bmem", tiny_llama)  # as a new process would
    got = _logits_after(reopened.engine, reopened.restore(), question)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    # the file keeps format 1's block-major summaries [blocks, Hkv, ...] (the store holds them head-major)
    layer = next((i for i, entry in enumerate(memory.header["layers"]) if entry.get("blocks")), None)
    assert (layer is None) == (name == "streaming")  # streaming keeps no blocks
    store = reopened.restore().layers[layer or 0].memory.store
    for summary in store.summaries if layer is not None else []:
        on_disk = memory.file.array(f"layer.{layer}.summary.{summary}")
        assert torch.equal(on_disk.transpose(0, 1).to(store.summary(summary).dtype), store.summary(summary))
        assert on_disk.shape[0] == memory.header["layers"][layer]["blocks"]
    # with a RAM budget the blocks come from disk: still exactly the same
    budget = 3 * 2 * 2 * 8 * 16 * 4 * 2
    tiered = SavedMemory.open(tmp_path / "m.bmem", tiny_llama, TierConfig(ram_budget=budget, spill_dir=str(tmp_path)))
    got = _logits_after(tiered.engine, tiered.restore(), question)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_answers_are_text_and_questions_do_not_change_the_memory(tiny_llama, tmp_path) -> None:
    memory = _build(tiny_llama, tmp_path / "m.bmem")
    before = (tmp_path / "m.bmem").read_bytes()
    first = memory.ask(QUESTION, max_new_tokens=6)
    again = memory.ask(QUESTION, max_new_tokens=6)
    assert first.token_ids == again.token_ids and len(first.token_ids) == 6
    assert first.stats.memory_tokens == memory.tokens and first.stats.prompt_tokens == len(memory.question_ids(QUESTION))
    assert (tmp_path / "m.bmem").read_bytes() == before
    assert memory.file.verify() == len(before)


def _comparable(path: Path) -> tuple[dict, bytes]:
    file = persist.MemoryFile(path)
    header = json.loads(json.dumps(file.header))
    header.pop("created")
    for doc in header["documents"]:
        doc.pop("prefill_seconds")
    # the arrays, from the first one on: the header region before them is padded, and its text
    # differs in length with the timings popped above
    data = path.read_bytes()[min(entry["offset"] for entry in file.header["arrays"].values()):]
    file.close()
    assert data  # the memory holds arrays: an empty slice would compare equal to anything
    return header, data


def test_extend_equals_building_the_concatenation(tiny_llama, tmp_path) -> None:
    both = _build(tiny_llama, tmp_path / "both.bmem")
    grown = _build(tiny_llama, tmp_path / "grown.bmem", docs=[DOC_A]).extend([DOC_B])
    assert grown.tokens == both.tokens and grown.info()["documents"][1]["name"] == "b.txt"
    header_both, data_both = _comparable(tmp_path / "both.bmem")
    header_grown, data_grown = _comparable(tmp_path / "grown.bmem")
    assert header_both == header_grown and data_both == data_grown
    question = both.question_ids(QUESTION)
    a = _logits_after(both.engine, both.restore(), question)
    b = _logits_after(grown.engine, grown.restore(), question)
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


@pytest.fixture
def saved(tiny_llama, tmp_path) -> Path:
    _build(tiny_llama, tmp_path / "m.bmem")
    return tmp_path / "m.bmem"


def _flip(path: Path, *offsets: int) -> None:
    data = bytearray(path.read_bytes())
    for offset in offsets:
        data[offset] ^= 0x40
    path.write_bytes(bytes(data))


def test_a_flipped_byte_anywhere_is_caught(tiny_llama, saved) -> None:
    header = persist.MemoryFile(saved).header
    first, page = header["arrays"]["blocks.0"]["offset"], header["page_bytes"]
    blocks = [first + i * page + 5 for i in range(header["layers"][0]["blocks"])]  # one byte in every block
    window = [header["arrays"]["layer.1.window_keys"]["offset"] + 3]
    for offsets, where in ((blocks, "block 0 of layer 0"), (window, "array layer.1.window_keys")):
        copy = saved.with_name(f"flip-{len(offsets)}.bmem")
        shutil.copy(saved, copy)
        _flip(copy, *offsets)
        memory = SavedMemory.open(copy, tiny_llama)  # opening reads neither: it still opens
        with pytest.raises(MemoryFileError, match=f"{where} fails its checksum"):
            memory.file.verify()
        with pytest.raises(MemoryFileError, match="fails its checksum"):
            memory.ask(QUESTION, max_new_tokens=2)  # the answer never uses corrupt data
    _flip(saved, persist.PREAMBLE.size + 10)  # in the header
    with pytest.raises(MemoryFileError, match="header is truncated or corrupt"):
        SavedMemory.open(saved, tiny_llama)


def test_a_corrupt_block_is_refused_every_time_it_is_read(tiny_llama, saved) -> None:
    """The pool page a failed read was meant for is given back: a second read of the block fails
    again instead of serving whatever the page held."""
    header = persist.MemoryFile(saved).header
    _flip(saved, header["arrays"]["blocks.0"]["offset"] + 7)
    memory = SavedMemory.open(saved, tiny_llama, TierConfig(ram_budget=64 * header["page_bytes"]))
    cache = memory.restore()
    for _ in range(2):
        with pytest.raises(MemoryFileError, match="block 0 of layer 0 fails its checksum"):
            cache.tiers.fetch(0, [0])
        assert (0, 0) not in cache.tiers.host.table
    assert cache.tiers.fetch(0, [1]).shape[0] == 1  # the other blocks still read
    cache.close()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="reads /proc/self/maps (Linux)")
def test_a_memory_is_read_without_mapping_it_and_outlives_its_file_object(tiny_llama, saved) -> None:
    """Blocks and arrays are read with positioned reads: nothing of the file is mapped, so blocks
    read from it never stay in this process's RSS; a restored cache keeps its own descriptor."""
    memory = SavedMemory.open(saved, tiny_llama, TierConfig(ram_budget=1 << 20))
    expected = memory.ask(QUESTION, max_new_tokens=3).token_ids
    assert str(saved) not in Path("/proc/self/maps").read_text()
    cache = memory.restore()
    memory.close()
    blocks = cache.tiers.fetch(0, [0, 1])  # read from disk after the file object is closed
    assert blocks.shape[0] == 2 and torch.isfinite(blocks).all()
    cache.close()
    assert SavedMemory.open(saved, tiny_llama).ask(QUESTION, max_new_tokens=3).token_ids == expected


@pytest.mark.parametrize("cut", [1, 5000, None])
def test_a_truncated_file_is_refused(tiny_llama, saved, cut) -> None:
    size = saved.stat().st_size
    with open(saved, "r+b") as handle:
        handle.truncate(size - cut if cut else 30)
    with pytest.raises(MemoryFileError, match="truncated|not a blockmem memory"):
        SavedMemory.open(saved, tiny_llama)


def test_other_version_missing_and_foreign_files_are_refused(tiny_llama, saved, tmp_path) -> None:
    data = bytearray(saved.read_bytes())
    data[4:8] = struct.pack("<I", persist.VERSION + 1)
    saved.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match=f"format version {persist.VERSION + 1}; this blockmem reads version"):
        SavedMemory.open(saved, tiny_llama)
    with pytest.raises(MemoryFileError, match="memory not found"):
        SavedMemory.open(tmp_path / "nothing.bmem", tiny_llama)
    (tmp_path / "notes.txt").write_text("hello, I am not a memory")
    with pytest.raises(MemoryFileError, match="not a blockmem memory file"):
        SavedMemory.open(tmp_path / "notes.txt", tiny_llama)


def test_other_model_tokenizer_and_dtype_are_refused(tiny, tiny_llama, saved, tmp_path) -> None:
    other = blockmem.load(tiny.get("qwen2")[0], device="cpu")
    with pytest.raises(MemoryFileError, match="built with model .* which differs from"):
        SavedMemory.open(saved, other)
    # the same weights with a different vocabulary: only the tokenizer differs
    directory = tmp_path / "retokenized"
    shutil.copytree(tiny.get("llama")[0], directory)
    vocab = json.loads((directory / "tokenizer.json").read_text())
    vocab["added_tokens"].append({**vocab["added_tokens"][-1], "id": len(vocab["model"]["vocab"]) + 5,
                                  "content": "<|extra|>"})
    (directory / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(MemoryFileError, match="another tokenizer"):
        SavedMemory.open(saved, blockmem.load(directory, device="cpu"))
    with pytest.raises(MemoryFileError, match="float32 activations.*--dtype float32"):
        SavedMemory.open(saved, blockmem.load(tiny.get("llama")[0], device="cpu", dtype="bfloat16"))


def _edit_method_options(path: Path, edit) -> None:
    """Rewrite a memory's header with `edit` applied to its method options, as an older blockmem
    would have written it (the header's checksum recomputed)."""
    data = bytearray(path.read_bytes())
    size = struct.unpack("<Q", data[8:16])[0]
    header = json.loads(data[48:48 + size])
    edit(header["method"]["options"])
    text = json.dumps(header).encode().ljust(size)
    data[16:48], data[48:48 + size] = hashlib.sha256(text).digest(), text
    path.write_bytes(bytes(data))


def test_memories_from_before_switch_lengths_open_as_built(tiny_llama, saved) -> None:
    """A header written before infllm, quest and streaming had `switch_length` opens as what it
    was built as: no stored block read densely."""
    _edit_method_options(saved, lambda options: options.pop("switch_length"))
    assert SavedMemory.open(saved, tiny_llama).method.switch_length == 0


@pytest.mark.parametrize("built, lacks, opens_as", [
    ("infllm:pooled_fraction=0", ("pooled_fraction", "pooled_rows", "pooled_hold"), (0.0, None, False)),
    ("infllm:pooled_fraction=0.5,pooled_rows=null,pooled_hold=false", ("pooled_rows", "pooled_hold"), (0.5, None, False)),
    ("infllm:pooled_fraction=0.5,pooled_rows=4,pooled_hold=false", ("pooled_hold",), (0.5, 4, False)),
])
def test_memories_from_before_pooled_options_open_as_built(tiny_llama, tmp_path, built, lacks, opens_as) -> None:
    """infllm's defaults changed after memories were saved without these options: a header that
    lacks them opens with the values it was built with (representatives alone before
    pooled_fraction, every row before pooled_rows, a pooled score per step before pooled_hold),
    computes what it did, and check_method compares against those values."""
    path = tmp_path / "m.bmem"
    memory = _build(tiny_llama, path, method=built)
    expected = _logits_after(memory.engine, memory.restore(), memory.question_ids(QUESTION))
    _edit_method_options(path, lambda options: [options.pop(name) for name in lacks])
    reopened = SavedMemory.open(path, tiny_llama)
    method = reopened.method
    assert (method.pooled_fraction, method.pooled_rows, method.pooled_hold) == opens_as
    got = _logits_after(reopened.engine, reopened.restore(), reopened.question_ids(QUESTION))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))
    check_method(reopened.header["method"], "infllm", {"pooled_hold": False})
    with pytest.raises(MemoryFileError, match="built with --pooled-hold False, not True"):
        check_method(reopened.header["method"], "infllm", {"pooled_hold": True})


def test_changed_settings_are_refused(saved) -> None:
    stored = persist.MemoryFile(saved).header["method"]
    check_method(stored, "infllm", {"topk": 2, "block_size": None})  # same settings, unset ones: fine
    with pytest.raises(MemoryFileError, match="built with --method infllm, not quest"):
        check_method(stored, "quest", {})
    with pytest.raises(MemoryFileError, match="built with --topk 2, not 4"):
        check_method(stored, None, {"topk": 4})


def test_an_incomplete_file_is_refused(tiny_llama, saved) -> None:
    header = persist.MemoryFile(saved).header
    text = json.dumps({**header, "complete": False}).encode()
    data = bytearray(saved.read_bytes())
    _, version, length, _ = persist.PREAMBLE.unpack(data[: persist.PREAMBLE.size])
    body = text.ljust(length, b" ")
    import hashlib
    data[: persist.PREAMBLE.size] = persist.PREAMBLE.pack(persist.MAGIC, version, length, hashlib.sha256(body).digest())
    data[persist.PREAMBLE.size: persist.PREAMBLE.size + length] = body
    saved.write_bytes(bytes(data))
    with pytest.raises(MemoryFileError, match="incomplete: a build or extend was interrupted"):
        SavedMemory.open(saved, tiny_llama)


_KILL_MIDWAY = textwrap.dedent("""
    import os, signal, sys
    import blockmem
    from blockmem.attention import create_method
    from blockmem.engine.saved import SavedMemory
    from blockmem.memory import persist

    # Ctrl-C raises KeyboardInterrupt even where this process was started with SIGINT ignored
    # (a background job of a non-interactive shell)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    calls = 0
    original = persist._Sink.write_at

    def write_at(self, offset, data):
        global calls
        calls += 1
        original(self, offset, data)
        if calls == int(sys.argv[3]):
            self.handle.flush()
            os.kill(os.getpid(), getattr(signal, sys.argv[4]))

    persist._Sink.write_at = write_at
    model = blockmem.load(sys.argv[1], device="cpu")
    method = create_method("infllm", n_init=4, n_local=16, block_size=8, topk=2)
    SavedMemory.build(model, [("long.txt", "A much longer document. " * 80)], sys.argv[2], method, prefill_chunk=32)
""")


@pytest.mark.parametrize("signal_name, at_write", [("SIGKILL", 40), ("SIGINT", 12)])
def test_an_interrupted_rebuild_leaves_the_old_memory_intact(tiny, tiny_llama, saved, signal_name, at_write) -> None:
    before = saved.read_bytes()
    script = saved.with_name("kill.py")
    script.write_text(_KILL_MIDWAY)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run([sys.executable, str(script), str(tiny.get("llama")[0]), str(saved), str(at_write),
                             signal_name], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0, result.stderr  # it really was interrupted
    assert saved.read_bytes() == before  # the old memory was not touched
    SavedMemory.open(saved, tiny_llama).file.verify()
    partials = list(saved.parent.glob(".m.bmem.partial-*"))
    if signal_name == "SIGKILL":  # a killed writer leaves its partial file behind: it never opens as valid
        assert len(partials) == 1
        with pytest.raises(MemoryFileError, match="incomplete|truncated"):
            SavedMemory.open(partials[0], tiny_llama)
        _build(tiny_llama, saved, docs=[DOC_A])  # the next writer clears it away
        assert not list(saved.parent.glob(".m.bmem.partial-*"))
    else:  # Ctrl-C: the writer removes its own partial file
        assert "KeyboardInterrupt" in result.stderr and not partials


def test_a_second_writer_is_refused_while_one_writes(tiny_llama, saved) -> None:
    with persist.writer_lock(saved):
        with pytest.raises(MemoryFileError, match="another process is writing"):
            SavedMemory.open(saved, tiny_llama).extend([DOC_B])
    SavedMemory.open(saved, tiny_llama).file.verify()


def test_a_reader_keeps_its_memory_while_a_writer_replaces_it(tiny_llama, saved) -> None:
    reader = SavedMemory.open(saved, tiny_llama)
    before = reader.ask(QUESTION, max_new_tokens=4).token_ids
    SavedMemory.open(saved, tiny_llama).extend([DOC_B])
    assert reader.ask(QUESTION, max_new_tokens=4).token_ids == before  # still the old file, whole
    assert SavedMemory.open(saved, tiny_llama).tokens > reader.tokens


def test_sliding_window_layers_are_saved_too(tiny, tmp_path) -> None:
    gemma = blockmem.load(tiny.get("gemma3")[0], device="cpu")
    memory = _build(gemma, tmp_path / "g.bmem")
    kinds = {layer["kind"] for layer in memory.header["layers"]}
    assert kinds == {"DenseLayer", "SparseLayer"}
    engine = blockmem.Engine(gemma, _method(), prefill_chunk=32)
    cache = engine.new_cache()
    tokens = memory.file.array("tokens").tolist()
    first = memory.header["documents"][0]["tokens"]
    for ids in (tokens[:first], tokens[first:]):
        engine.prefill(ids, cache)
        cache.settle()
    question = memory.question_ids(QUESTION)
    expected = _logits_after(engine, cache, question)
    got = _logits_after(memory.engine, memory.restore(), question)
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_preload_reads_every_block_into_ram_once(tiny_llama, saved) -> None:
    memory = SavedMemory.open(saved, tiny_llama)
    cache = memory.restore()
    cache.tiers.host.pages = cache.tiers.host.pages[:0]  # start empty, as after a fresh open
    cache.tiers.host.free.clear()
    cache.tiers.preload()
    blocks = sum(layer.get("blocks", 0) for layer in memory.header["layers"])
    assert len(cache.tiers.host.table) == blocks == cache.tiers.host.capacity  # one allocation, exact size
    cache.tiers.check()
    cache.close()
    plain = memory.ask(QUESTION, max_new_tokens=5)
    preloaded = memory.ask(QUESTION, max_new_tokens=5, preload=True)
    assert plain.token_ids == preloaded.token_ids
    assert preloaded.stats.tiers["disk"]["bytes_read"] == 0  # every read after the preload hit RAM


def test_nosa_reads_its_query_agnostic_blocks_ahead(tiny_llama, tmp_path) -> None:
    path = tmp_path / "n.bmem"
    memory = _build(tiny_llama, path, method="nosa")
    question = memory.question_ids(QUESTION)
    plain = SavedMemory.open(path, tiny_llama, TierConfig(ram_budget=8 * 2 * 2 * 8 * 16 * 4, spill_dir=str(tmp_path)))
    reference = _logits_after(plain.engine, plain.restore(), question)
    ahead = SavedMemory.open(path, tiny_llama, TierConfig(ram_budget=8 * 2 * 2 * 8 * 16 * 4, spill_dir=str(tmp_path)))
    cache = ahead.restore()  # restoring asks the tiers to read the agnostic blocks ahead
    cache.tiers.wait_prefetch()
    wanted = {(layer, i) for layer in range(3)
              for i in ahead.method.read_ahead(cache.layers[layer].memory.store, cache.layers[layer].spec)}
    assert wanted and cache.tiers.prefetched > 0
    assert any(key in cache.tiers.host.table for key in wanted)
    cache.tiers.check()
    got = _logits_after(ahead.engine, cache, question)
    assert all(torch.equal(a, b) for a, b in zip(reference, got, strict=True))  # reading ahead changes nothing computed

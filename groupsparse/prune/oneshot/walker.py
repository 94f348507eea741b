"""Walk a model block by block on calibration batches, accumulating each Linear layer's input statistics.

The protocol of SparseGPT and Wanda: capture the inputs of the first decoder block (a forward pre-hook with
kwargs, so the attention mask, position ids and the rotary ``position_embeddings`` that transformers 5 hands to
Llama layers come along), run each block on them with hooks that accumulate, per Linear, the column norms
``Σ_t x_tj²`` and (when asked) ``XᵀX``, let a callback prune the block, then recompute the block's outputs with
the pruned weights and feed them to the next block. Memory holds one block's activations.
"""

from __future__ import annotations

import inspect
from contextlib import nullcontext
from dataclasses import dataclass

import torch
from torch import nn

from ..selection import LM_HEAD_NAMES


class _Stop(Exception):
    """Raised by the capture hook: nothing past the first block needs to run."""


@dataclass
class InputStats:
    """Input statistics of one Linear layer over the calibration tokens."""

    sumsq: torch.Tensor            # (in,) Σ_t x_tj²; Wanda's ‖X_j‖₂ is its square root
    gram: torch.Tensor | None      # (in, in) XᵀX in float32 (as SparseGPT), only when a method needs the Hessian
    tokens: int = 0

    @property
    def col_norm(self) -> torch.Tensor:
        return self.sumsq.sqrt()


def linear_layers(block: nn.Module) -> dict[str, nn.Module]:
    """Linear-like modules of ``block`` by qualified name: ``nn.Linear`` and HF's GPT-2 ``Conv1D``."""
    return {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"}


def weight_matrix(module: nn.Module) -> torch.Tensor:
    """The weight as (out, in): rows are output units, columns input features (Conv1D stores (in, out))."""
    return module.weight.data.t() if type(module).__name__ == "Conv1D" else module.weight.data


def set_weight_matrix(module: nn.Module, w: torch.Tensor) -> None:
    w = w.t() if type(module).__name__ == "Conv1D" else w
    module.weight.data.copy_(w.to(module.weight.dtype))


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, nn.Linear) or type(m).__name__ == "Conv1D"


def _block_list(obj, same_type: bool = True) -> bool:
    """A run of decoder blocks: a non-empty ModuleList (of one module type, unless found at a known path, where
    hybrid models mix block types) that holds Linears but is none itself (a list of bare Linears is usually
    chained through activations the walk would skip)."""
    return (isinstance(obj, nn.ModuleList) and len(obj) > 0 and (not same_type or len({type(b) for b in obj}) == 1)
            and not _is_linear(obj[0]) and bool(linear_layers(obj[0])))


def find_blocks(model: nn.Module) -> tuple[nn.ModuleList | None, str]:
    """The decoder blocks of ``model`` and their path; ``(None, "")`` when it has none (a plain module).

    Known layouts first (Llama/Mistral/Qwen ``model.layers``, GPT-2 ``transformer.h``, OPT
    ``model.decoder.layers``); otherwise the ModuleList of identical blocks holding the most parameters
    (GPT-NeoX/Pythia ``gpt_neox.layers``, MPT ``transformer.blocks``, nanoGPT-style models, ...). The largest
    list wins so that per-block lists nested inside the blocks (MoE experts) are never taken for the blocks. A
    module that is not a Hugging Face model takes that list only when no Linear but an output head lies outside
    it (else it is one block: an encoder/decoder's second tower would be left dense).
    """
    for path in ("model.layers", "transformer.h", "model.decoder.layers", "decoder.layers", "layers", "h"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if _block_list(obj, same_type=False):
            return obj, path
    best, best_key = None, None
    for name, mod in model.named_modules():
        if name and _block_list(mod):
            key = (sum(p.numel() for p in mod.parameters()), -name.count("."))
            if best_key is None or key > best_key:
                best, best_key = (mod, name), key
    if best is not None and not is_language_model(model):
        # a plain module (encoder/decoder towers, an MLP's input and output layers around a list) is walked as
        # one block unless the list holds every Linear but an output head: the rest would be left dense in silence
        inside = {id(m) for m in best[0].modules()}
        if any(id(m) not in inside and n.rsplit(".", 1)[-1] not in LM_HEAD_NAMES
               for n, m in linear_layers(model).items()):
            return None, ""
    return best if best is not None else (None, "")


def is_language_model(model: nn.Module) -> bool:
    """A Hugging Face model (config + input embeddings): one the one-block fallback must never be applied to."""
    return hasattr(model, "config") and callable(getattr(model, "get_input_embeddings", None))


def _input_device(model: nn.Module) -> torch.device | None:
    """Where the model reads its inputs: the input embedding's device for HF models (the first device of a
    model spread over several), else the first parameter's."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except NotImplementedError:  # (HF models without token embeddings, e.g. Wav2Vec2)
        emb = None
    w = getattr(emb, "weight", None)
    if isinstance(w, torch.Tensor):
        return w.device
    p = next(model.parameters(), None)
    return p.device if p is not None else None


def _to(b, device):
    if device is None:
        return b
    if torch.is_tensor(b):
        return b.to(device)
    if isinstance(b, dict):
        return {k: _to(v, device) for k, v in b.items()}
    if isinstance(b, (tuple, list)):
        return type(b)(_to(v, device) for v in b)
    return b


def _batches(calibration, batch_size: int, device=None):
    """Calibration batches on the model's input device (calibration ids usually live on the CPU)."""
    if isinstance(calibration, torch.Tensor):
        return [_to(calibration[i : i + batch_size], device) for i in range(0, len(calibration), batch_size)]
    return [_to(b, device) for b in calibration]


def _call(model: nn.Module, b) -> None:
    """Run ``model`` on one calibration batch the way its forward takes it: HF models get ``input_ids=`` and
    ``use_cache=False`` (no cache to build), models with ``forward(idx)`` (nanoGPT style) the ids positionally."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):  # no inspectable signature: the Hugging Face convention
        params = None
    named = params is None or "input_ids" in params
    cache = {"use_cache": False} if params is None or "use_cache" in params or any(
        p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()) else {}
    if torch.is_tensor(b) and not torch.is_floating_point(b):
        model(input_ids=b, **cache) if named else model(b)
    elif isinstance(b, dict):
        model(**b, **cache)
    else:
        model(b)


def capture_block_inputs(model: nn.Module, blocks: nn.ModuleList, batches) -> list[tuple[tuple, dict]]:
    """(args, kwargs) the first block receives for each calibration batch (token ids or input tensors)."""
    captured: list[tuple[tuple, dict]] = []

    def hook(_mod, args, kwargs):
        captured.append((tuple(a.detach() if torch.is_tensor(a) else a for a in args), dict(kwargs)))
        raise _Stop

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in batches:
            try:
                _call(model, b)
            except _Stop:
                pass
    finally:
        handle.remove()
    if len(captured) != len(batches):
        raise RuntimeError(f"captured {len(captured)} block inputs for {len(batches)} batches: the model did not reach its first block")
    # a cache object in kwargs would grow across batches; the walk never needs one
    for _, kw in captured:
        for k in ("past_key_value", "past_key_values", "layer_past"):
            if k in kw:
                kw[k] = None
        if "use_cache" in kw:
            kw["use_cache"] = False
    return captured


def is_chain(model: nn.Module, blocks, batch) -> bool:
    """Whether each block's first input is the previous block's output on ``batch`` (the premise of feeding the
    blocks their predecessors' outputs). A ModuleList found by its shape alone may hold parallel branches. Each
    output is compared when the next block starts and dropped then: one block's output held at a time (holding
    all of them took n_blocks x a batch's activations)."""
    outs: dict[int, torch.Tensor] = {}
    ok = [True, 0]  # (all consecutive pairs equal so far, pairs compared)

    def pre(_m, args, kwargs, i):
        if i == 0:
            return
        a, b = outs.pop(i - 1, None), args[0] if args else kwargs.get("hidden_states")
        ok[0] = ok[0] and torch.is_tensor(a) and torch.is_tensor(b) and a.shape == b.shape and bool(
            torch.equal(a.to(b.device), b))
        ok[1] += 1

    handles = []
    for i, block in enumerate(blocks):
        handles.append(block.register_forward_pre_hook(lambda m, a, k, i=i: pre(m, a, k, i), with_kwargs=True))
        if i < len(blocks) - 1:
            handles.append(block.register_forward_hook(lambda _m, _a, out, i=i: outs.__setitem__(i, _first(out))))
    try:
        with torch.no_grad():
            _call(model, batch)
    finally:
        for h in handles:
            h.remove()
    return ok[0] and ok[1] == len(blocks) - 1


def _first(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def collect_stats(block: nn.Module, inputs, *, gram: bool, names=None, model: nn.Module | None = None
                  ) -> dict[str, InputStats]:
    """Run ``block`` on every (args, kwargs) of ``inputs`` and accumulate each Linear's input statistics; with
    ``model``, ``inputs`` are calibration batches run through the whole model instead."""
    layers = linear_layers(block)
    if names is not None:
        layers = {n: layers[n] for n in names}
    stats: dict[str, InputStats] = {}
    handles = []
    for name, mod in layers.items():
        n_in, dev = weight_matrix(mod).shape[1], mod.weight.device
        # on the layer's device: its inputs arrive there (a CUDA model, or one spread over several devices)
        st = InputStats(torch.zeros(n_in, dtype=torch.float64, device=dev),
                        torch.zeros(n_in, n_in, dtype=torch.float32, device=dev) if gram else None)
        stats[name] = st

        def hook(_m, args, _out, st=st):
            x = args[0].detach().reshape(-1, args[0].shape[-1]).float()
            st.sumsq += (x * x).sum(0, dtype=torch.float64)
            if st.gram is not None:
                # float32 matmul: the float64 one costs several times more on CPUs for no visible gain
                st.gram += x.t() @ x
            st.tokens += x.shape[0]

        handles.append(mod.register_forward_hook(hook))
    try:
        with torch.no_grad():
            for item in inputs:
                if model is None:
                    block(*item[0], **item[1])
                else:
                    _call(model, item)
    finally:
        for h in handles:
            h.remove()
    return stats


def run_block(block: nn.Module, inputs) -> list[tuple[tuple, dict]]:
    """Outputs of ``block`` as the next block's (args, kwargs): the first positional tensor is replaced."""
    out = []
    with torch.no_grad():
        for args, kwargs in inputs:
            y = _first(block(*args, **kwargs))
            out.append(((y,) + tuple(args[1:]), kwargs))
    return out


def walk(model: nn.Module, calibration, on_block, *, gram: bool, batch_size: int = 8, progress: bool = True,
         description: str = "pruning") -> None:
    """Call ``on_block(index, block, stats)`` for every block in order, stats from the (pruned) preceding blocks.

    ``calibration`` is an (n, L) tensor of token ids (HF models), an (n, ...) float tensor (plain modules) or a
    list of ready batches (tensors or keyword dicts). Token ids go in as ``input_ids=`` when the forward has that
    parameter, positionally otherwise. A plain module without decoder blocks is one block whose input is the
    batch itself.
    """
    blocks, _ = find_blocks(model)
    batches = _batches(calibration, batch_size, _input_device(model))
    if not batches:
        raise ValueError("calibration: got no batches, expected at least one")
    with torch.no_grad():
        chained = True
        if blocks is None:
            blocks = [model]
            inputs = [((b,), {}) for b in batches]
        elif is_chain(model, blocks, batches[0]):
            inputs = capture_block_inputs(model, blocks, batches)
        else:  # each block's statistics from whole-model forwards: slower (n_blocks passes), never wrong
            chained, inputs = False, batches
        bar = _progress(progress)
        with bar:
            task = bar.add_task(description, total=len(blocks)) if bar is not None and hasattr(bar, "add_task") else None
            for i, block in enumerate(blocks):
                stats = collect_stats(block, inputs, gram=gram, model=None if chained else model)
                on_block(i, block, stats)
                if chained and i + 1 < len(blocks):
                    inputs = run_block(block, inputs)
                if task is not None:
                    bar.update(task, advance=1)


def _progress(enabled: bool):
    if not enabled:
        return nullcontext()
    try:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    except ImportError:  # rich is a dependency, but the walk must not fail for a progress bar
        return nullcontext()
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    transient=True)

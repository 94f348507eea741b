"""Which tensors of a state_dict hold one weight (ties) or share memory in another shape (overlaps).

Used by :func:`groupsparse.prune.checkpoint.prune_state_dict`: a tie is projected once for all its names; an
overlap cannot be projected at all without changing the other tensor.
"""

from __future__ import annotations

from typing import Any, Mapping

import torch

# (output head, input embedding) names that language models tie (Hugging Face layouts, Meta's Llama format);
# matched after any common prefix such as "module."
_TIED_NAMES = (("lm_head.weight", "model.embed_tokens.weight"), ("lm_head.weight", "transformer.wte.weight"),
               ("lm_head.weight", "model.decoder.embed_tokens.weight"), ("lm_head.weight", "embed_tokens.weight"),
               ("lm_head.weight", "transformer.word_embeddings.weight"), ("lm_head.weight", "wte.weight"),
               ("embed_out.weight", "gpt_neox.embed_in.weight"), ("output.weight", "tok_embeddings.weight"))
# the dtypes the projection handles
_PROJECTABLE = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _dense(v: Any) -> bool:
    """A tensor with strided memory and data (sparse and meta tensors have no storage to compare or project)."""
    return isinstance(v, torch.Tensor) and v.layout == torch.strided and v.device.type != "meta"


def _partial_overlaps(state_dict: Mapping[str, Any], names: list[str]) -> list[str]:
    """Names among ``names`` whose memory overlaps another tensor's without being the same view (a slice or
    transpose of it): they cannot be projected apart, nor as one tied weight."""
    by_storage: dict[tuple, list] = {}
    for k, v in state_dict.items():
        if _dense(v) and v.numel():
            start = v.storage_offset() * v.element_size()
            end = start + (1 + sum((n - 1) * st for n, st in zip(v.shape, v.stride()))) * v.element_size()
            view = (start, tuple(v.shape), tuple(v.stride()), v.dtype)
            by_storage.setdefault((v.untyped_storage().data_ptr(), v.device), []).append((start, end, view, k))
    wanted, out = set(names), []
    for items in by_storage.values():
        if len(items) < 2:
            continue
        items.sort(key=lambda t: t[:2])
        for i, (s0, e0, v0, k0) in enumerate(items):
            for s1, e1, v1, k1 in items[i + 1:]:
                if s1 >= e0:
                    break
                if v0 != v1:  # overlapping spans of different views (a conservative test: strides may interleave)
                    out += [k for k in (k0, k1) if k in wanted and k not in out]
    return [n for n in names if n in out]


def find_ties(state_dict: Mapping[str, Any], *, config: Mapping | None = None) -> list[list[str]]:
    """Groups of names that hold one weight: tensors sharing storage (the same view), and a language model's
    output head with its input embedding (by the usual names) when ``config["tie_word_embeddings"]`` says so
    or, without that entry, when both hold equal values (a tied model saved with cloned copies)."""
    group_of: dict[str, list[str]] = {}

    def join(a: str, b: str) -> None:
        ga, gb = group_of.setdefault(a, [a]), group_of.setdefault(b, [b])
        if ga is not gb:
            ga.extend(gb)
            for n in gb:
                group_of[n] = ga

    first_of = {}
    for k, v in state_dict.items():
        if _dense(v) and v.numel():
            view = (v.untyped_storage().data_ptr(), v.device, v.storage_offset(), tuple(v.shape), tuple(v.stride()))
            if view in first_of:
                join(first_of[view], k)
            else:
                first_of[view] = k
    tie_cfg = config.get("tie_word_embeddings") if isinstance(config, Mapping) else None
    for head in state_dict:
        for head_name, embed_name in _TIED_NAMES:
            prefix = head[: -len(head_name)]
            if not head.endswith(head_name) or (prefix and not prefix.endswith(".")):
                continue
            embed = prefix + embed_name
            a, b = state_dict[head], state_dict.get(embed)
            if not (_dense(a) and _dense(b)):
                continue
            if head in group_of and group_of.get(embed) is group_of[head]:
                continue  # already tied by storage
            same = a.shape == b.shape and a.dtype == b.dtype
            # never by config alone: a head of another shape (padded vocabulary) would get the embedding's tensor
            if same and (tie_cfg is True or (tie_cfg is None and torch.equal(a, b))):
                join(head, embed)
    unique = {id(g): g for g in group_of.values()}
    return [sorted(g, key=list(state_dict).index) for g in unique.values()]

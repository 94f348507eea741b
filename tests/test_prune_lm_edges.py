"""prune_model at its edges: block discovery beyond the known layouts, all-or-nothing writes, option checks,
OWL's allocation bounds, devices, and LMs called with positional token ids."""

import pytest
import torch
from torch import nn

from groupsparse.prune.oneshot import find_blocks, linear_layers, prune_model


def _ids(n=4, length=12, vocab=64, seed=3):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def _neox():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.GPTNeoXConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                     num_attention_heads=4, max_position_embeddings=64)
    torch.manual_seed(0)
    return transformers.GPTNeoXForCausalLM(cfg).eval()


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_gpt_neox_blocks_found_and_head_dense(method):
    model = _neox()
    head0 = model.embed_out.weight.clone() if hasattr(model, "embed_out") else model.lm_head.weight.clone()
    blocks, path = find_blocks(model)
    assert path == "gpt_neox.layers" and len(blocks) == 2
    res = prune_model(model, _ids(), method=method, sparsity=0.5, progress=False)
    head = model.get_output_embeddings().weight
    assert torch.equal(head, head0)
    assert int((model.get_input_embeddings().weight == 0).sum()) == 0
    assert sorted({e["block"] for e in res.layers}) == [0, 1]
    per_block = len(linear_layers(blocks[0]))
    assert len(res.layers) == 2 * per_block
    assert all(e["zeros"] == round(0.5 * e["numel"]) or method == "wanda" for e in res.layers)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc, self.proj = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)

    def forward(self, x):
        return x + self.proj(torch.relu(self.fc(x)))


class _Stack(nn.Module):
    """Blocks at an unknown path (``trunk.stages``), inside a ModuleDict, with an untied head."""

    def __init__(self, v=32, d=16, n=3):
        super().__init__()
        self.emb = nn.Embedding(v, d)
        self.trunk = nn.ModuleDict(dict(stages=nn.ModuleList([_Block(d) for _ in range(n)]),
                                    experts=nn.ModuleList([nn.Linear(d, d) for _ in range(2)])))
        self.lm_head = nn.Linear(d, v, bias=False)

    config = None  # an LM in the Hugging Face mould (config, input embeddings): its blocks are searched for

    def get_input_embeddings(self):
        return self.emb

    def forward(self, input_ids, use_cache=None):
        x = self.emb(input_ids)
        for b in self.trunk.stages:
            x = b(x)
        return self.lm_head(x)


def test_unknown_layout_largest_module_list_of_blocks():
    torch.manual_seed(0)
    model = _Stack()
    blocks, path = find_blocks(model)
    assert path == "trunk.stages" and len(blocks) == 3   # not the list of bare Linears
    head0 = model.lm_head.weight.clone()
    res = prune_model(model, _ids(vocab=32), method="wanda", sparsity=0.5, progress=False)
    assert torch.equal(model.lm_head.weight, head0)
    assert {e["name"] for e in res.layers} == {"fc", "proj"} and len(res.layers) == 6


def test_plain_module_keeps_its_head_dense():
    torch.manual_seed(0)
    seq = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
    model = nn.Module()
    model.body, model.lm_head = seq, nn.Linear(16, 4)
    model.forward = lambda x: model.lm_head(model.body(x))
    head0 = model.lm_head.weight.clone()
    res = prune_model(model, torch.randn(16, 8), method="wanda", sparsity=0.5, progress=False)
    assert torch.equal(model.lm_head.weight, head0)
    assert [e["name"] for e in res.layers] == ["body.0"]


def test_hf_model_without_blocks_is_refused():
    model = _neox()
    model.gpt_neox.layers = nn.ModuleList()   # nothing walkable left
    w0 = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="no decoder blocks.*expected"):
        prune_model(model, _ids(), method="magnitude", sparsity=0.5, progress=False)
    assert all(torch.equal(v, w0[k]) for k, v in model.state_dict().items())


def _narrow_mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 6), nn.ReLU(), nn.Linear(6, 2))


@pytest.mark.parametrize("kw,msg", [(dict(method="wanda", pattern="2:4"), "in_features=6 for layer '4'"),
                                    (dict(method="magnitude", pattern="2:4"), "expected a multiple of M=4"),
                                    (dict(method="gsp", sparsity=0.9), r"expected at most 0\.8333"),
                                    (dict(method="gsp", sparsity=0.97, group="model"), "expected at most"),
                                    (dict(method="owl", sparsity=0.9), r"expected at most 0\.8333 for OWL")])
def test_infeasible_layer_is_refused_before_any_write(kw, msg):
    model = _narrow_mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match=msg):
        prune_model(model, torch.randn(32, 16), progress=False, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_failure_part_way_restores_the_written_weights(monkeypatch):
    from groupsparse.prune.oneshot import pruner

    real, calls = pruner.sparsegpt, []

    def flaky(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("cholesky failed")
        return real(*a, **k)

    monkeypatch.setattr(pruner, "sparsegpt", flaky)
    model = _narrow_mlp()
    model.train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(RuntimeError, match="cholesky"):
        prune_model(model, torch.randn(32, 16), method="sparsegpt", sparsity=0.5, progress=False,
                    restore_on_error=True)  # (opt-in: the copy costs host memory of every pruned weight)
    assert len(calls) == 3 and model.training
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4))


@pytest.mark.parametrize("kw", [dict(method="owl", sparsity=0.5), dict(method="gsp", group="model", sparsity=0.5),
                                dict(method="wanda", sparsity=0.5), dict(method="magnitude", pattern="2:4")], ids=str)
def test_exclude_that_removes_every_layer_is_refused(kw):
    with pytest.raises(ValueError, match=r"no Linear layer to prune: exclude=\('\*',\) leave none of the 2 Linear.*expected"):
        prune_model(_mlp(), torch.randn(16, 8), exclude=("*",), progress=False, **kw)


@pytest.mark.parametrize("kw,err,msg", [
    (dict(batch_size=0), ValueError, "batch_size: got 0, expected a positive integer"),
    (dict(batch_size=2.0), ValueError, "batch_size: got 2.0"),
    (dict(blocksize=0), ValueError, "blocksize: got 0"),
    (dict(damp=-0.1), ValueError, "damp: got -0.1, expected a finite number >= 0"),
    (dict(damp=float("nan")), ValueError, "damp: got nan"),
    (dict(owl_m=0.0), ValueError, "owl_m: got 0.0, expected a finite number > 0"),
    (dict(owl_lambda=float("inf")), ValueError, "owl_lambda: got inf"),
    (dict(normalize="global"), ValueError, "normalize: got 'global'"),
    (dict(exclude="0"), TypeError, "exclude: got '0', expected a tuple of glob strings"),
], ids=lambda v: str(v) if not isinstance(v, type) else "")
def test_numeric_options_are_checked_at_the_boundary(kw, err, msg):
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(err, match=msg.replace(".", r"\.").replace("(", r"\(")):
        prune_model(model, torch.randn(16, 8), method="sparsegpt", sparsity=0.5, progress=False, **kw)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("p,top", [(0.03, 1.0), (0.95, 1.0), (0.9, 0.9375), (0.0, 1.0), (0.6, 1.0)])
def test_owl_allocation_keeps_mean_and_bounds(p, top):
    from groupsparse.prune.oneshot import owl_sparsities

    ratios = [0.01, 0.02, 0.05, 0.08]
    sp = owl_sparsities(ratios, p, 0.08, **({} if top == 1.0 else dict(max_sparsity=top)))
    assert sum(sp) / 4 == pytest.approx(p, abs=1e-12)
    assert all(0.0 <= s <= top for s in sp)
    assert sp == sorted(sp, reverse=True)              # more outliers, fewer zeros, still
    assert max(sp) - min(sp) <= 0.16 + 1e-12
    if 0.08 <= p <= top - 0.08:
        assert max(sp) - min(sp) == pytest.approx(0.16)  # the full spread wherever it fits


def test_owl_allocation_refuses_an_infeasible_mean():
    from groupsparse.prune.oneshot import owl_sparsities

    with pytest.raises(ValueError, match=r"fraction: got 0.95, expected in \[0, 0.9000\]"):
        owl_sparsities([0.01, 0.02], 0.95, max_sparsity=0.9)


class _Chain(nn.Module):
    def __init__(self, d=16, n=3):
        super().__init__()
        self.layers = nn.ModuleList([_Block(d) for _ in range(n)])

    def forward(self, x):
        for b in self.layers:
            x = b(x)
        return x


def test_owl_prune_model_keeps_the_mean_and_never_empties_a_row():
    torch.manual_seed(0)
    model = _Chain()
    x = torch.randn(64, 16) * torch.logspace(-1, 1, 16)
    res = prune_model(model, x, method="owl", sparsity=0.85, owl_lambda=0.3, progress=False)
    sp = [b["sparsity"] for b in res.blocks]
    assert len(sp) == 3 and max(sp) > min(sp)
    assert sum(sp) / 3 == pytest.approx(0.85, abs=1e-12) and max(sp) <= 1 - 1 / 16
    for m in linear_layers(model).values():
        assert ((m.weight != 0).sum(1) >= 1).all()


def test_statistics_live_on_the_layer_device():
    """The meta device stands in for an accelerator: statistics must be allocated where the layer is, since
    its inputs arrive there (a CPU accumulator is 'Expected all tensors to be on the same device' on CUDA)."""
    from groupsparse.prune.oneshot import collect_stats
    from groupsparse.prune.oneshot.walker import _batches, _input_device

    block = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 4)).to("meta")
    x = torch.randn(6, 8, device="meta")
    stats = collect_stats(block, [((x,), {})], gram=True)
    assert all(st.sumsq.device.type == "meta" and st.gram.device.type == "meta" for st in stats.values())
    assert _input_device(block).type == "meta"
    assert all(b.device.type == "meta" for b in _batches(torch.zeros(5, 8), 2, torch.device("meta")))
    dict_batch = _batches([{"input_ids": torch.zeros(2, 3, dtype=torch.long)}], 1, torch.device("meta"))[0]
    assert dict_batch["input_ids"].device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("kw", [dict(method="wanda", sparsity=0.5), dict(method="sparsegpt", sparsity=0.5),
                                dict(method="owl", sparsity=0.5), dict(method="gsp", sparsity=0.5, group="model"),
                                dict(method="gsp", pattern="2:4", refit=True), dict(method="magnitude", sparsity=0.5)],
                         ids=str)
def test_cuda_model_with_cpu_calibration(kw):
    ref, model = _chain_pair()
    x = torch.randn(64, 16) * torch.logspace(-1, 1, 16)
    prune_model(ref, x, progress=False, **kw)
    model.cuda()
    res = prune_model(model, x, progress=False, **kw)
    assert all(m.weight.device.type == "cuda" for m in linear_layers(model).values())
    zeros = sum(int((m.weight == 0).sum()) for m in linear_layers(model).values())
    assert zeros == sum(e["zeros"] for e in res.layers) > 0
    same = [float(((a.weight == 0) == (b.weight.cpu() == 0)).float().mean())
            for a, b in zip(linear_layers(ref).values(), linear_layers(model).values())]
    assert min(same) > 0.97    # float32 sums in another order may swap near-tied entries


def _chain_pair():
    torch.manual_seed(0)
    a = _Chain()
    b = _Chain()
    b.load_state_dict(a.state_dict())
    return a, b


class _NanoGPT(nn.Module):
    """nanoGPT's calling convention: ``forward(idx, targets=None)``, no ``input_ids``/``use_cache``."""

    def __init__(self, v=32, d=16, n=2):
        super().__init__()
        self.transformer = nn.ModuleDict(dict(wte=nn.Embedding(v, d), h=nn.ModuleList([_Block(d) for _ in range(n)])))
        self.lm_head = nn.Linear(d, v, bias=False)

    def forward(self, idx, targets=None):
        x = self.transformer.wte(idx)
        for b in self.transformer.h:
            x = b(x)
        return self.lm_head(x)


@pytest.mark.parametrize("form", ["tensor", "list", "dict"])
def test_positional_token_ids_model_is_calibrated(form):
    torch.manual_seed(0)
    model = _NanoGPT()
    ids = _ids(n=8, vocab=32)
    cal = {"tensor": ids, "list": [ids[:4], ids[4:]], "dict": [{"idx": ids[:4]}, {"idx": ids[4:]}]}[form]
    head0 = model.lm_head.weight.clone()
    res = prune_model(model, cal, method="wanda", sparsity=0.5, progress=False)
    assert len(res.layers) == 4 and res.zero_fraction == pytest.approx(0.5)
    assert torch.equal(model.lm_head.weight, head0)


class _Wide(_Block):
    pass


def test_known_path_accepts_mixed_block_types():
    """Hybrid models (attention and other blocks in one model.layers) keep being walked at their known path."""
    torch.manual_seed(0)
    model = _Chain()
    model.layers[1] = _Wide(16)
    blocks, path = find_blocks(model)
    assert path == "layers" and len(blocks) == 3


def test_hf_blocks_are_recognised_as_a_chain():
    from groupsparse.prune.oneshot.walker import is_chain

    model = _neox()
    blocks, _ = find_blocks(model)
    assert is_chain(model, blocks, _ids(n=2))


class _Branches(nn.Module):
    """A ModuleList of identical modules that are parallel branches, not a chain: each reads the input."""

    def __init__(self, d=8, n=3):
        super().__init__()
        self.branches = nn.ModuleList([nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, d)) for _ in range(n)])

    def forward(self, x):
        return sum(b(x) for b in self.branches)


def test_parallel_branches_get_statistics_of_their_true_inputs():
    """Feeding branch i's output to branch i+1 would give wrong statistics in silence; the walk must notice
    the list is no chain and take each block's statistics from whole-model forwards."""
    from groupsparse.prune.oneshot import row_mask, wanda_scores

    torch.manual_seed(0)
    model = _Branches()
    x = torch.randn(32, 8) * torch.logspace(-1, 1, 8)
    norm = (x.double() ** 2).sum(0).sqrt()        # every branch's first Linear reads x itself
    firsts = [b[0].weight.detach().clone() for b in model.branches]
    prune_model(model, x, method="wanda", sparsity=0.5, progress=False)
    for w0, b in zip(firsts, model.branches):
        assert torch.equal(b[0].weight == 0, row_mask(wanda_scores(w0, norm), 0.5) | (w0 == 0))


def test_model_with_only_a_head_is_refused():
    model = nn.Module()
    model.lm_head = nn.Linear(8, 4)
    model.forward = model.lm_head
    with pytest.raises(ValueError, match=r"exclude=\(\) and 1 output head\(s\) kept dense by policy"):
        prune_model(model, torch.randn(4, 8), method="wanda", sparsity=0.5, progress=False)


def test_plain_model_with_linears_outside_its_block_list_is_one_block():
    """An encoder/decoder in plain torch: the largest list alone was walked, the other tower, the input and
    the output layers left dense in silence (6 of 12 Linears, 0.28 zeros for 0.5)."""
    torch.manual_seed(0)

    class EncDec(nn.Module):
        def __init__(self, d=16):
            super().__init__()
            self.enc = nn.ModuleList([_Block(d) for _ in range(3)])
            self.mid = nn.Linear(d, d)
            self.dec = nn.ModuleList([_Block(d) for _ in range(2)])
            self.out = nn.Linear(d, d)

        def forward(self, x):
            for b in self.enc:
                x = b(x)
            x = self.mid(x)
            for b in self.dec:
                x = b(x)
            return self.out(x)

    model = EncDec()
    assert find_blocks(model) == (None, "")
    res = prune_model(model, torch.randn(32, 16), method="wanda", sparsity=0.5, progress=False)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    assert len(res.layers) == len(linears) == 12
    assert all(float((m.weight == 0).float().mean()) == 0.5 for m in linears)

"""optim=muon: which parameters Muon trains, one step against a hand-computed update (Newton-Schulz of the
Nesterov momentum, the same lr scaling, decoupled weight decay), a resume that continues bit for bit, two DDP
ranks against one process, FSDP refused in one line, and the on-device skip of a non-finite step (torch's step
bit for bit when kept, nothing changed when skipped, no host sync)."""

from __future__ import annotations

import copy
import json
import math
import socket

import numpy as np
import pytest
import torch

from llm.checkpoint.files import optimizer_from_flat, optimizer_to_flat
from llm.contract import Data
from llm.data.pretrain import PackedTokens
from llm.errors import ConfigError
from llm.model import build_gpt
from llm.train import LanguageModeling, MuonConfig, RunInfo, Trainer, orthogonalize, trainer_settings
from llm.train.muon import BatchedMuon
from llm.train.steps import optimizer_step

TINY = dict(vocab_size=64, n_layer=2, n_head=2, n_kv_head=1, d_model=16, max_seq_len=16)


def _model(**kw):
    torch.manual_seed(0)
    return build_gpt(**{**TINY, **kw})


def _loss(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (4, 9), generator=g)
    return model(ids[:, :-1], labels=ids[:, 1:]) / ids[:, 1:].numel()  # mean NLL per token


def _newton_schulz(m: torch.Tensor, steps=5) -> torch.Tensor:
    """The quintic iteration of Keller Jordan's Muon, written out: x <- a x + (b A + c A^2) x with A = x x^T, on the
    matrix scaled to Frobenius norm 1 (wide orientation, bf16; each line one rounding, as in torch's)."""
    a, b, c = 3.4445, -4.7750, 2.0315
    x = m.bfloat16()
    tall = m.shape[0] > m.shape[1]
    x = x.T if tall else x
    x = x / x.norm().clamp(min=1e-7)
    for _ in range(steps):
        gram = x @ x.T
        poly = torch.addmm(gram, gram, gram, beta=b, alpha=c)  # b A + c A^2
        x = torch.addmm(x, poly, x, beta=a)  # a x + poly x
    return (x.T if tall else x).float()


def test_groups_muon_on_block_matrices_adamw_on_the_rest():
    model = _model(tie_embeddings=False)
    groups = {g["name"]: g for g in MuonConfig(lr=0.02, adam_lr=0.001).build(model, "cpu").param_groups}
    names = {id(p): n for n, p in model.named_parameters()}
    assert sorted(names[id(p)] for p in groups["muon"]["params"]) == sorted(
        n for n, p in model.named_parameters() if n.startswith("blocks.") and p.dim() == 2
    )
    assert [names[id(p)] for p in groups["adam"]["params"]] == ["lm_head.weight"]  # untied head: AdamW, decayed
    assert "tok_emb.weight" in {names[id(p)] for p in groups["adam_no_decay"]["params"]}
    assert groups["muon"]["lr"] == 0.02 and groups["adam"]["lr"] == groups["adam_no_decay"]["lr"] == 0.001
    tied = MuonConfig().build(_model(), "cpu")  # tied: the embedding is the head, once, in AdamW without decay
    assert [g["name"] for g in tied.param_groups] == ["muon", "adam_no_decay"]
    assert sum(len(g["params"]) for g in tied.param_groups) == len(list(_model().parameters()))


def test_two_steps_equal_the_hand_computed_update():
    cfg = MuonConfig(lr=0.02, weight_decay=0.1, momentum=0.9, adam_lr=0.01, betas=(0.9, 0.95))
    model, ref = _model(), _model()
    opt = cfg.build(model, "cpu")
    adam = torch.optim.AdamW(
        [p for n, p in ref.named_parameters() if not (n.startswith("blocks.") and p.dim() == 2)],
        lr=0.01,
        betas=(0.9, 0.95),
        eps=cfg.eps,
        weight_decay=0.0,
    )
    matrices = [(n, p) for n, p in ref.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    buf = {n: torch.zeros_like(p) for n, p in matrices}
    for seed in (0, 1):  # the second step uses the momentum of the first
        _loss(model, seed).backward()
        opt.step()
        opt.zero_grad()
        _loss(ref, seed).backward()
        with torch.no_grad():
            for n, p in matrices:
                buf[n] = 0.9 * buf[n] + 0.1 * p.grad  # torch's momentum: an average (lerp), not a sum
                update = _newton_schulz(0.1 * p.grad + 0.9 * buf[n])  # Nesterov: the gradient pulled to the average
                lr = 0.02 * 0.2 * math.sqrt(max(p.shape))  # match_rms_adamw: AdamW's update RMS
                p.mul_(1 - 0.02 * 0.1).sub_(lr * update)  # decoupled decay with the unscaled lr
                p.grad = None
        adam.step()
        adam.zero_grad()
        for (n, a), b in zip(model.named_parameters(), ref.parameters()):
            assert torch.allclose(a, b, atol=1e-5, rtol=0), n


def test_state_round_trips_through_the_checkpoint_format():
    cfg = MuonConfig(lr=0.02)
    model = _model()
    opt = cfg.build(model, "cpu")
    _loss(model).backward()
    opt.step()
    tensors, meta = optimizer_to_flat(opt)
    tensors = {k: v.clone() for k, v in tensors.items()}  # as read back from optimizer.safetensors (no sharing)
    meta = json.loads(json.dumps(meta))  # what optimizer.json holds
    other = _model()
    other.load_state_dict(model.state_dict())
    opt2 = cfg.build(other, "cpu")
    opt2.load_state_dict(optimizer_from_flat(tensors, meta))
    for m, o in ((model, opt), (other, opt2)):
        o.zero_grad()
        _loss(m, 3).backward()
        o.step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


class _Tokens(Data):
    def __init__(self, path):
        np.random.default_rng(0).integers(0, 64, 4000).astype(np.uint16).tofile(path)
        self.train = self.val = PackedTokens(path, 8, "uint16")

    def prepare(self):
        return self


def _fit(run_dir, data, steps, early_stop=None, **kw):
    settings = trainer_settings(
        max_steps=steps,
        batch_size=4,
        seq_len=8,
        eval_every=3,
        log_every=1,
        save_every=3,
        eval_batches=1,
        progress=False,
        sample={"max_new_tokens": 0},
    )
    optim = MuonConfig(lr=0.02, warmup_steps=1, schedule="wsd", decay_fraction=0.5)
    run = RunInfo(str(run_dir), **kw)
    return Trainer(_model(), data, LanguageModeling(), optim, settings, run, early_stop=early_stop).fit()


def test_resume_continues_bit_for_bit(tmp_path):
    data = _Tokens(tmp_path / "t.bin")
    _fit(tmp_path / "full", data, 6)
    _fit(tmp_path / "cut", data, 6, early_stop=lambda step, _: "cut" if step == 3 else None)  # saves step 3, stops
    _fit(tmp_path / "cut", data, 6, resume="auto")
    lines = lambda d: [  # noqa: E731
        {k: v for k, v in json.loads(x).items() if k not in ("tokens_per_s", "wall_seconds")}
        for x in (d / "metrics.jsonl").read_text().splitlines()
    ]
    full, resumed = lines(tmp_path / "full"), lines(tmp_path / "cut")
    assert resumed == full and len(full) == 7 and "lr/adam_no_decay" not in full[0]


def test_fsdp_is_refused_in_one_line(tmp_path):
    settings = trainer_settings(max_steps=1, batch_size=2, seq_len=8, strategy="fsdp")
    with pytest.raises(ConfigError, match="optim=muon needs whole matrices and trainer.strategy=fsdp shards"):
        Trainer(_model(), None, LanguageModeling(), MuonConfig(), settings, RunInfo(str(tmp_path)))


@pytest.mark.parametrize(("key", "value"), [("adjust_lr", "none"), ("momentum", 1.0), ("adam_lr", 0)])
def test_bad_keys_are_named(key, value):
    with pytest.raises(ConfigError, match=f"optim.{key}"):
        MuonConfig(**{key: value})


# DDP's averaged gradient equals one process's up to fp32 summation order; Newton-Schulz runs in bf16 and amplifies
# that with every step: the losses differ by 2e-7, 2e-7, 2e-6 after 0, 1, 2 updates and by 1.2e-5 after 3
STEPS = 3


def _ddp_worker(rank, port, out):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        model = _model()
        ddp = DistributedDataParallel(model)
        opt = MuonConfig(lr=0.02).build(model, "cpu")
        losses = []
        for step in range(STEPS):
            ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step))[2 * rank : 2 * rank + 2]
            loss = ddp(ids[:, :-1], labels=ids[:, 1:]) / ids[:, 1:].numel()
            loss.backward()
            opt.step()
            opt.zero_grad()
            losses.append(loss.detach().clone())
        out.put((rank, [x.item() for x in losses]))
    finally:
        dist.destroy_process_group()


def test_two_ddp_ranks_match_one_process():
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_ddp_worker, args=(r, port, out)) for r in range(2)]
    for p in procs:
        p.start()
    ranks = sorted((out.get(timeout=120) for _ in procs), key=lambda r: r[0])
    for p in procs:
        p.join(timeout=30)
    model = _model()
    opt = MuonConfig(lr=0.02).build(model, "cpu")
    for step in range(STEPS):
        ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(step))
        loss = model(ids[:, :-1], labels=ids[:, 1:]) / ids[:, 1:].numel()
        loss.backward()
        opt.step()
        opt.zero_grad()
        halves = [ranks[0][1][step], ranks[1][1][step]]
        assert sum(halves) / 2 == pytest.approx(loss.item(), abs=1e-5)  # the mean of the ranks' halves


def _muon_pair(**kw):
    """torch's Muon and ours on two copies of the same model (nesterov off, to see both momentum forms)."""
    a, b = _model(), _model()
    params = lambda m: [p for n, p in m.named_parameters() if n.startswith("blocks.") and p.dim() == 2]  # noqa: E731
    return a, b, torch.optim.Muon(params(a), **kw), BatchedMuon(params(b), **kw)


@pytest.mark.parametrize("kw", [{"lr": 0.02}, {"lr": 0.05, "nesterov": False, "adjust_lr_fn": "match_rms_adamw"}])
def test_skipping_muon_is_torchs_step_bit_for_bit_and_skips_on_the_device(kw):
    torch_model, ours, torch_opt, opt = _muon_pair(**kw)
    for seed in range(4):
        for m in (torch_model, ours):
            _loss(m, seed).backward()
        before = [p.clone() for p in opt.param_groups[0]["params"]]
        momenta = [opt.state[p]["momentum_buffer"].clone() for p in opt.param_groups[0]["params"] if opt.state.get(p)]
        if seed == 2:  # a skipped step: NaN gradients, found_inf set; weights and momentum stay as they were
            for p in opt.param_groups[0]["params"]:
                p.grad.fill_(float("nan"))
            opt.found_inf = torch.tensor(1.0)
            opt.step()
            assert all(torch.equal(a, b) for a, b in zip(opt.param_groups[0]["params"], before))
            assert momenta and all(
                torch.equal(opt.state[p]["momentum_buffer"], m) for p, m in zip(opt.param_groups[0]["params"], momenta)
            )
            torch_opt.zero_grad()  # the reference never sees that step
        else:
            opt.found_inf = torch.tensor(0.0)
            opt.step()
            torch_opt.step()
        opt.zero_grad()
        torch_opt.zero_grad()
        for a, b in zip(torch_model.parameters(), ours.parameters()):
            assert torch.equal(a, b)
        for a, b in zip(torch_opt.param_groups[0]["params"], opt.param_groups[0]["params"]):
            assert torch.equal(torch_opt.state[a]["momentum_buffer"], opt.state[b]["momentum_buffer"])


def test_the_loop_skips_a_muon_step_without_a_host_sync(monkeypatch):
    """optimizer_step with optim=muon on an accelerator (fused AdamW): found_inf goes to both optimizers, nothing is
    read on the host; a non-finite gradient leaves every weight as it was, and a finite one trains."""
    model = _model()
    opt = MuonConfig(lr=0.02).build(model, "cuda")  # an accelerator's build (it works on CPU tensors too)
    assert opt.defaults["fused"] and not MuonConfig(fused=False).build(_model(), "cuda").defaults["fused"]
    assert not MuonConfig().build(_model(), "cpu").defaults["fused"]  # CPU: torch's Muon, the flag read on the host
    _loss(model).backward()  # a first step: AdamW's and Muon's state exist
    opt.step()
    opt.zero_grad()
    before = [p.clone() for p in model.parameters()]
    monkeypatch.setattr(torch.Tensor, "item", lambda self: pytest.fail("a host sync in the optimizer step"))
    (_loss(model) * float("nan")).backward()
    _, bad = optimizer_step(opt, model.parameters(), 1.0)
    assert bad == 1 and all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    _loss(model).backward()
    _, bad = optimizer_step(opt, model.parameters(), 1.0)
    assert bad == 0 and all(not torch.equal(a, b) for a, b in zip(model.parameters(), before))


# Mixed shapes: tall and wide matrices that share a stack once laid wide (16x8 and 8x16), a square one, one alone,
# and 3-D stacks [n, out, in] whose slices join the 2-D matrices of their shape
MIXED = [(16, 8), (8, 16), (8, 8), (24, 8), (3, 8, 16), (2, 16, 8)]


def _matrices(tensors):
    """Every matrix of 2-D and 3-D tensors, a 3-D one's slices in order."""
    return [m for t in tensors for m in (t if t.dim() == 3 else [t])]


def _against_torchs_muon(shapes, kw):
    """BatchedMuon on 2-D and 3-D parameters of these shapes against torch's Muon on every matrix alone (a 3-D
    parameter's slices as separate matrices, each with its own momentum and its own shape's lr): equal bit for bit
    over three steps, and a step skipped on the device (found_inf = 1) changes nothing."""
    kw = {"lr": 0.02, "momentum": 0.9, **kw}
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]
    slices = [torch.nn.Parameter(m.detach().clone()) for m in _matrices(params)]
    batched, per_matrix = BatchedMuon(params, **kw), torch.optim.Muon(slices, **kw)
    for step in range(4):
        grads = [torch.randn(s, generator=gen) for s in shapes]
        for p, g in zip(params, grads):
            p.grad = g.clone()
        batched.found_inf = torch.tensor(float(step == 2))
        if step == 2:  # skipped: the reference takes no step
            before = [p.detach().clone() for p in params]
            batched.step()
            assert all(torch.equal(p, b) for p, b in zip(params, before))
            continue
        for s, g in zip(slices, _matrices(grads)):
            s.grad = g.clone()
        batched.step()
        per_matrix.step()
        assert all(torch.equal(a, b) for a, b in zip(_matrices(params), slices))
        momenta = _matrices([batched.state[p]["momentum_buffer"] for p in params])
        assert all(torch.equal(a, per_matrix.state[s]["momentum_buffer"]) for a, s in zip(momenta, slices))


@pytest.mark.parametrize(
    "kw", [{"adjust_lr_fn": "match_rms_adamw"}, {"adjust_lr_fn": "original", "nesterov": False, "weight_decay": 0.0}]
)
def test_batched_update_is_torchs_per_matrix_update_bit_for_bit(kw):
    _against_torchs_muon(MIXED, kw)


def test_tall_matrices_at_onednn_sizes_in_groups_are_torchs_bit_for_bit(monkeypatch):
    """Sizes where torch's bf16 matmuls run in oneDNN (MIXED's are smaller): a tall stack iterated as it lies equals
    torch's wide iteration bit for bit; with GROUP_BYTES below one stack's size every stack is a group of its own."""
    monkeypatch.setattr(orthogonalize, "GROUP_BYTES", 2 * 64 * 192)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # 60 small matmuls a step: one thread beats two waiting for each other on a busy machine
    try:
        _against_torchs_muon([(192, 64), (64, 192), (64, 64), (2, 192, 64), (192, 64)], {"adjust_lr_fn": "original"})
    finally:
        torch.set_num_threads(threads)
    assert len(orthogonalize.stack_plan((torch.Size([192, 64]), torch.Size([64, 64])), 2 * 64 * 192)) == 2


def test_checkpoints_of_torchs_muon_load_into_the_batched_one():
    """The state dict is torch.optim.Muon's (a momentum buffer per parameter, the same group keys): a checkpoint
    written before batching resumes, and the steps after it are the ones torch's Muon would have taken."""
    torch_model, ours, torch_opt, _ = _muon_pair(lr=0.02, adjust_lr_fn="match_rms_adamw")
    _loss(torch_model).backward()
    torch_opt.step()
    torch_opt.zero_grad()
    ours.load_state_dict(torch_model.state_dict())
    params = [p for n, p in ours.named_parameters() if n.startswith("blocks.") and p.dim() == 2]
    opt = BatchedMuon(params, lr=0.02, adjust_lr_fn="match_rms_adamw")
    sd = copy.deepcopy(torch_opt.state_dict())  # as read back from a checkpoint: no tensor shared with torch_opt
    opt.load_state_dict(sd)
    assert opt.state_dict()["param_groups"] == sd["param_groups"]
    for seed in (1, 2):
        for m, o in ((torch_model, torch_opt), (ours, opt)):
            _loss(m, seed).backward()
            o.step()
            o.zero_grad()
    assert all(torch.equal(a, b) for a, b in zip(torch_model.parameters(), ours.parameters()))


def test_a_3d_parameter_in_the_blocks_goes_to_muon():
    """Stacked expert weights [n, out, in] inside a block (a mixture-of-experts layer) are Muon's, and train."""
    model = _model()
    model.blocks[0].register_parameter("experts", torch.nn.Parameter(torch.randn(2, 32, 16) * 0.02))
    opt = MuonConfig(lr=0.02).build(model, "cpu")
    assert any(p is model.blocks[0].experts for p in opt.param_groups[0]["params"])
    before = model.blocks[0].experts.detach().clone()
    model.blocks[0].experts.grad = torch.randn(2, 32, 16)
    _loss(model).backward()
    opt.step()
    assert not torch.equal(before, model.blocks[0].experts)

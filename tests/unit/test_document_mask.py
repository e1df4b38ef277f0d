"""Document masking in packed pretraining (task.data.document_mask): a packed window's loss is the sum of its
documents' losses, each run alone from position 0; no token sees the document before it; positions restart after
each EOS (the EOS ends its document). The mask and positions come from cached tokens: the cache is unchanged."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llm.contract import ATTN_MASK, INPUT_IDS, LABELS, POSITION_IDS
from llm.data import FileCorpus, PackedTokens, PretrainData
from llm.data.documents import documents_of
from llm.errors import ConfigError
from llm.model import build_gpt
from llm.train.objectives import LanguageModeling

EOS, V, T = 1, 97, 24
DOC_LENGTHS = [7, 3, 15, 1, 9, 11, 5, 13, 4]  # each plus its EOS; a window cuts documents anywhere


def stream(tmp_path, lengths=DOC_LENGTHS, seed=0) -> tuple[PackedTokens, np.ndarray]:
    """Windows of T over documents of random tokens (never EOS), each ended by EOS, as a token file."""
    rng = np.random.default_rng(seed)
    tokens = np.concatenate([np.append(rng.integers(2, V, n), EOS) for n in lengths]).astype(np.uint16)
    path = tmp_path / f"tokens{seed}.bin"
    tokens.tofile(path)
    return PackedTokens(path, T, eos_id=EOS), tokens


def model(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=64)
    return build_gpt(**{**cfg, **kw}).eval()


def test_positions_restart_after_each_eos_and_the_mask_is_block_diagonal(tmp_path):
    windows, tokens = stream(tmp_path)
    batch = windows.collate([windows[0], windows[1]])
    ids, pos, mask = batch[INPUT_IDS], batch[POSITION_IDS], batch[ATTN_MASK]
    assert mask.shape == (2, 1, T, T) and mask.dtype == torch.bool
    # window 0 = doc 0 (7 tokens + EOS), doc 1 (3 + EOS), 12 tokens of doc 2
    assert pos[0].tolist() == [*range(8), *range(4), *range(12)]
    assert (ids[0, [7, 11]] == EOS).all()  # the EOS is the last position of its document
    for row in range(2):
        for i in range(T):  # position 0 exactly where a document starts: the window's first token or after an EOS
            assert (pos[row, i] == 0) == (i == 0 or ids[row, i - 1] == EOS)
            if i:
                assert pos[row, i] == (0 if ids[row, i - 1] == EOS else pos[row, i - 1] + 1)
        doc = documents_of(pos[row : row + 1])[0]
        same_doc_before = (doc[:, None] == doc[None, :]) & torch.ones(T, T, dtype=torch.bool).tril()
        assert torch.equal(mask[row, 0], same_doc_before)
    assert mask[0, 0, 8, 7].logical_not() and mask[0, 0, 7, 0]  # the token after an EOS does not see it
    # without document masking: the plain causal windows, the same tokens and labels
    plain = PackedTokens(tmp_path / "tokens0.bin", T)
    assert set(plain.collate([plain[0]])) == {INPUT_IDS, LABELS}
    assert torch.equal(plain[1][LABELS], windows[1][LABELS])


@pytest.mark.parametrize("kw", [{}, {"pos_emb": "learned", "norm": "layernorm", "mlp": "gelu"}, {"sliding_window": 6}])
def test_packed_loss_equals_the_documents_losses_one_by_one(tmp_path, kw):
    windows, _ = stream(tmp_path)
    batch = windows.collate([windows[i] for i in range(len(windows))])
    net = model(**kw)
    with torch.no_grad():
        loss, _ = LanguageModeling().loss(net, batch)  # the objective passes position_ids and the mask on
        packed_nll = net(
            batch[INPUT_IDS], labels=batch[LABELS], reduction="none", **{k: batch[k] for k in (POSITION_IDS, ATTN_MASK)}
        )  # [B, T]
        total, count = 0.0, 0
        for row in range(batch[INPUT_IDS].size(0)):
            doc = documents_of(batch[POSITION_IDS][row : row + 1])[0]
            for d in doc.unique():
                where = doc == d  # one document (or its part in this window), alone from position 0
                alone = net(
                    batch[INPUT_IDS][row, where][None], labels=batch[LABELS][row, where][None], reduction="none"
                )
                torch.testing.assert_close(packed_nll[row, where], alone[0], atol=1e-5, rtol=1e-5)
                total, count = total + alone.sum().item(), count + int(where.sum())
    assert count == batch[LABELS].numel()  # every label kept, the EOS's (the next document's first token) too
    assert loss.item() == pytest.approx(total / count, rel=1e-5)
    unmasked, _ = LanguageModeling().loss(net, {k: batch[k] for k in (INPUT_IDS, LABELS)})
    assert abs(unmasked.item() - loss.item()) > 1e-4  # the mask changes the loss: it is in use


@pytest.mark.parametrize("kw", [{}, {"sliding_window": 6}])
def test_a_token_cannot_attend_to_the_previous_document(tmp_path, kw):
    _, tokens = stream(tmp_path)
    other = tokens.copy()
    before = np.arange(len(tokens)) < 12  # documents 0 and 1 (8 + 4 tokens, EOS included)
    rng = np.random.default_rng(1)
    other[before & (tokens != EOS)] = rng.integers(2, V, int((before & (tokens != EOS)).sum()))  # EOS kept
    assert (other != tokens).sum() > 5
    other.tofile(tmp_path / "other.bin")
    net = model(**kw)
    logits = {}
    for name, path in (("same", tmp_path / "tokens0.bin"), ("perturbed", tmp_path / "other.bin")):
        for masked in (True, False):
            windows = PackedTokens(path, T, eos_id=EOS if masked else None)
            batch = windows.collate([windows[0]])
            with torch.no_grad():
                logits[name, masked] = net(batch[INPUT_IDS], batch.get(POSITION_IDS), batch.get(ATTN_MASK))[0]
    after = slice(12, T)  # document 2 onwards: the perturbation cannot reach it through attention
    assert torch.equal(logits["same", True][after], logits["perturbed", True][after])
    assert not torch.allclose(logits["same", True][:12], logits["perturbed", True][:12])
    assert not torch.allclose(logits["same", False][after], logits["perturbed", False][after])  # causal: it does


def word_tokenizer():
    """A word-level tokenizer of w0 .. w49 with EOS 0: built in a few ms, nothing to train."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["<eos>", "<unk>"] + [f"w{i}" for i in range(50)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")


def test_pretrain_data_serves_masked_windows_from_the_same_cache(tmp_path):
    tokenizer, rng = word_tokenizer(), np.random.default_rng(0)
    path = tmp_path / "docs.txt"  # 60 documents (lines) of 1 to 12 words
    path.write_text("\n".join(" ".join(f"w{j}" for j in rng.integers(0, 50, rng.integers(1, 13))) for _ in range(60)))
    kwargs = dict(seq_len=16, cache_dir=str(tmp_path / "c"), val_fraction=0.2, num_proc=1)
    plain = PretrainData(tokenizer, FileCorpus(str(path)), **kwargs)
    masked = PretrainData(tokenizer, FileCorpus(str(path)), document_mask=True, **kwargs)
    assert plain.cache_key() == masked.cache_key()  # no re-tokenization: the mask is built when serving
    plain.prepare(), masked.prepare()
    assert masked.from_cache
    for split in ("train", "val"):
        served, starts = getattr(masked, split), 0
        for i in range(len(served)):
            item = served[i]
            assert torch.equal(item[INPUT_IDS], getattr(plain, split)[i][INPUT_IDS])
            ids, pos = item[INPUT_IDS], item[POSITION_IDS]
            assert pos[0] == 0 and torch.equal(pos[1:] == 0, ids[:-1] == tokenizer.eos_token_id)
            starts += int((pos[1:] == 0).sum())
        assert starts > len(served)  # documents are shorter than a window: boundaries inside windows
        assert set(served.collate([served[0]])) == {INPUT_IDS, LABELS, POSITION_IDS, ATTN_MASK}
    with pytest.raises(ConfigError, match="task.data.document_mask"):
        PretrainData(tokenizer, FileCorpus(str(path)), document_mask="yes", **kwargs)


def test_a_pretraining_run_trains_and_validates_on_masked_batches(cache_dir, tmp_path, monkeypatch):
    """task.data.document_mask=true end to end (in process): every training and validation batch is masked."""
    import llm.data.pretrain as pretrain
    from llm.tasks.train import train
    from tests.conftest import SMALL, compose_config

    masks = []
    real = pretrain.block_causal_mask
    monkeypatch.setattr(pretrain, "block_causal_mask", lambda doc: masks.append(doc.shape) or real(doc))
    steps = ["trainer.max_steps=2", "trainer.eval_every=2", "trainer.eval_batches=1", "logger=none"]
    assert compose_config().task.data.document_mask is False  # off by default
    cfg = compose_config([*SMALL, *steps, "task.sample=null", "task.data.document_mask=true"])
    results = train(cfg, tmp_path / "run")
    assert np.isfinite(results["val_loss"])
    assert len(masks) >= 3 and all(shape[1] == 64 for shape in masks)  # 2 train batches + validation

"""Data: tokenizers, corpus sources, packed pretraining windows and the resumable sampler."""

from llm.data.pretrain import PackedTokens, PretrainData
from llm.data.sampler import ResumableSampler
from llm.data.sources import FileCorpus, HubCorpus, StdlibCorpus
from llm.data.tokenizer import load_pretrained, train_bpe

__all__ = ["PackedTokens", "PretrainData", "ResumableSampler", "FileCorpus", "HubCorpus", "StdlibCorpus",
           "load_pretrained", "train_bpe"]

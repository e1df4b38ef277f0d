"""Data: tokenizers, corpus sources and their mixtures, token shards and packed pretraining windows,
chat/preference data, built-in tasks, the resumable sampler."""

from llm.data.mixture import Mixture
from llm.data.posttrain import PreferenceData, SFTData
from llm.data.pretrain import PackedTokens, PretrainData
from llm.data.prompts import PromptData
from llm.data.rows import HubRows, LocalRows
from llm.data.sampler import ResumableSampler
from llm.data.sources import FileCorpus, HubCorpus, StdlibCorpus
from llm.data.synthetic import VerifiableTasks
from llm.data.tokenizer import load_pretrained, train_bpe

__all__ = [
    "HubRows",
    "LocalRows",
    "PreferenceData",
    "PromptData",
    "SFTData",
    "VerifiableTasks",
    "PackedTokens",
    "PretrainData",
    "ResumableSampler",
    "FileCorpus",
    "HubCorpus",
    "StdlibCorpus",
    "Mixture",
    "load_pretrained",
    "train_bpe",
]

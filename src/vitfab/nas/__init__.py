"""The architecture axis (AutoFormer): supernet training, evolutionary search, extraction."""

from .extract import ExtractRequest, extract_subnet, extract_to
from .official import load_official_autoformer, published_arch
from .search import (Candidate, EvolutionarySearch, Limits, SearchConfig, SearchRequest, SearchResult, crossover,
                     mutate, pareto_front)
from .train import SupernetConfig, SupernetTrainer, build_supernet, load_supernet, resume_supernet, train_supernet

__all__ = [
    "Candidate", "EvolutionarySearch", "ExtractRequest", "Limits", "SearchConfig", "SearchRequest", "SearchResult",
    "SupernetConfig", "SupernetTrainer", "build_supernet", "crossover", "extract_subnet", "extract_to",
    "load_official_autoformer", "load_supernet", "mutate", "pareto_front", "published_arch", "resume_supernet",
    "train_supernet",
]

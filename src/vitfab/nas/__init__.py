"""The architecture axis (AutoFormer): supernet training, evolutionary search, extraction."""

from .extract import extract_subnet, extract_to
from .official import load_official_autoformer, published_arch
from .search import Candidate, EvolutionarySearch, Limits, SearchConfig, SearchResult, crossover, mutate, pareto_front
from .train import SupernetConfig, SupernetTrainer, build_supernet, load_supernet, resume_supernet, train_supernet

__all__ = [
    "Candidate", "EvolutionarySearch", "Limits", "SearchConfig", "SearchResult", "SupernetConfig", "SupernetTrainer",
    "build_supernet", "crossover", "load_official_autoformer", "published_arch", "extract_subnet", "extract_to", "load_supernet", "mutate", "pareto_front",
    "resume_supernet", "train_supernet",
]

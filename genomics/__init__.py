"""genomics: DNA language models on ssm_core (Mamba), from FASTA to embeddings and probes.

    python -m genomics.pretrain     pretrain (embedded demo genome by default, or --fasta hg38.fa)
    python -m genomics.embed        embeddings of FASTA records or BED regions (.npy / parquet)
    python -m genomics.evaluate     held-out bits per base at several context lengths
    python -m genomics.probe        logistic-regression probes (FASTA-per-class, CSV, species, planted motif)
    python -m genomics.score        zero-shot variant effect scores from a VCF (log-likelihood ratios)
    python -m genomics.finetune     fine-tune on labelled sequences, beside a k-mer logistic-regression baseline
`--stream` (evaluate, embed) carries the model's state across chunks: whole chromosomes in constant memory.
"""
from . import tokenizer
from .data import Genome, WindowBatches, WindowSampler, causal_batch, make_splits, mlm_batch
from .demo import demo_genome, known_entropy

__all__ = [
           "Genome",
           "WindowBatches",
           "WindowSampler",
           "causal_batch",
           "demo_genome",
           "known_entropy",
           "make_splits",
           "mlm_batch",
           "tokenizer",
]

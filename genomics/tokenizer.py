"""DNA tokenizer: one 256-entry byte lookup table, applied to whole numpy arrays (no per-character Python).

Ids are HyenaDNA's `CharacterTokenizer` ids, so checkpoints and token streams line up with that ecosystem:

    [CLS]=0 [SEP]=1 [BOS]=2 [MASK]=3 [PAD]=4 [RESERVED]=5 [UNK]=6  A=7 C=8 G=9 T=10 N=11

Every byte that is not A/C/G/T (either case) becomes N (IUPAC codes such as R or Y included): the model
sees "unknown base", and N is left out of the loss. With `keep_softmask=True` soft-masked (lower-case)
bases get four extra ids a=12 c=13 g=14 t=15, so the repeat mask reaches the model as an input; targets
always use the upper-case ids.
"""
from __future__ import annotations

import numpy as np
import torch

SPECIALS = ["[CLS]", "[SEP]", "[BOS]", "[MASK]", "[PAD]", "[RESERVED]", "[UNK]"]
CLS, SEP, BOS, MASK, PAD, RESERVED, UNK = range(7)
A, C, G, T, N = 7, 8, 9, 10, 11
BASES = (A, C, G, T)
VOCAB_SIZE = 12
SOFTMASK_VOCAB_SIZE = 16
SOFT_OFFSET = 5          # lower-case id = upper-case id + 5 (a=12 ... t=15)
IGNORE_INDEX = -100      # targets that do not count in the loss (N, padding, unmasked MLM positions)

ID_TO_CHAR = np.array(list("0123456ACGTNacgt"), dtype="S1")  # specials print as digits


def _lut(keep_softmask: bool) -> np.ndarray:
    lut = np.full(256, N, dtype=np.uint8)
    for ch, i in zip("ACGT", BASES):
        lut[ord(ch)] = i
        lut[ord(ch.lower())] = i + SOFT_OFFSET if keep_softmask else i
    return lut


_LUTS = {False: _lut(False), True: _lut(True)}


def encode_bytes(seq: np.ndarray | bytes | str, keep_softmask: bool = False) -> np.ndarray:
    """Bytes (any shape of uint8, or a str/bytes) -> token ids, uint8, same shape."""
    if isinstance(seq, str):
        seq = seq.encode("ascii", errors="replace")
    arr = np.frombuffer(seq, dtype=np.uint8) if isinstance(seq, (bytes, bytearray, memoryview)) else seq
    return _LUTS[keep_softmask][arr]


def decode(ids: np.ndarray | torch.Tensor) -> str:
    ids = ids.cpu().numpy() if isinstance(ids, torch.Tensor) else np.asarray(ids)
    return ID_TO_CHAR[ids.astype(np.int64)].tobytes().decode()


def complement_map(vocab_size: int = VOCAB_SIZE) -> list[int]:
    """Token id -> id of its complement base (specials and N map to themselves)."""
    comp = list(range(vocab_size))
    for x, y in ((A, T), (C, G)):
        comp[x], comp[y] = y, x
        if vocab_size > y + SOFT_OFFSET:
            comp[x + SOFT_OFFSET], comp[y + SOFT_OFFSET] = y + SOFT_OFFSET, x + SOFT_OFFSET
    return comp


_COMP_LUT = np.array(complement_map(SOFTMASK_VOCAB_SIZE), dtype=np.uint8)


def reverse_complement(ids: np.ndarray) -> np.ndarray:
    """Reverse complement along the last axis of an id array."""
    return _COMP_LUT[ids[..., ::-1]]


def unmask(ids: np.ndarray) -> np.ndarray:
    """Soft-masked ids (12..15) -> their upper-case ids: what targets use."""
    return np.where(ids >= A + SOFT_OFFSET, ids - SOFT_OFFSET, ids).astype(ids.dtype)

"""Token batches of fixed width: the one left-padding helper (rollout prompts, GRM prompts)."""

import numpy as np


def left_pad(sequences, length, pad_id):
    """[N, length] int32 tokens and a bool mask, each sequence right-aligned; longer ones keep their
    last tokens.

    Returns (tokens, mask, number truncated) so truncation is counted, never silent.
    """
    tokens = np.full((len(sequences), length), pad_id, np.int32)
    mask = np.zeros((len(sequences), length), bool)
    truncated = 0
    for i, seq in enumerate(sequences):
        seq = list(seq)
        if len(seq) > length:
            truncated += 1
            seq = seq[-length:]
        if len(seq):
            tokens[i, length - len(seq):] = seq
            mask[i, length - len(seq):] = True
    return tokens, mask, truncated

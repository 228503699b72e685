"""Special tokens (BOS, EOS, padding): which ids they are, and dropping their positions.

The language model sees every token, but a dictionary trained on special-token positions
spends features on them (a feature that fires only on `<|endoftext|>`, document boundaries as
top examples). With `special_tokens.exclude` on, SAE training, sae_metrics and the feature
statistics skip those positions; the browser still shows the tokens in context, marked.
`resolve_special_token_ids` turns the config's `special_tokens.token_ids` ('auto' or a list)
into ids of a tokenizer; `keep_positions` applies them to token ids (the feature sampler drops
those rows batch by batch: core/features/sampling.py). Tests: tests/test_special_tokens.py.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from sae_assets.core.config import ConfigError, SpecialTokenIds


def resolve_special_token_ids(setting: SpecialTokenIds, tokenizer, *, eos_id: int) -> tuple[int, ...]:
    """Sorted ids of the special tokens of a HF `tokenizers.Tokenizer`.

    'auto': the end-of-text id that separates packed documents (`eos_id`, from the tokenizer
    asset's manifest) and every added token the tokenizer flags special (a pretrained model's
    BOS, EOS and padding tokens). A list is taken as given, but each id must exist in the
    vocabulary: a ConfigError names `special_tokens.token_ids` otherwise.
    """
    vocab_size = tokenizer.get_vocab_size()
    if setting == "auto":
        flagged = {int(i) for i, token in tokenizer.get_added_tokens_decoder().items() if token.special}
        return tuple(sorted(flagged | {int(eos_id)}))
    for i, token_id in enumerate(setting):
        if not 0 <= token_id < vocab_size:
            raise ConfigError(f"config key 'special_tokens.token_ids[{i}]' is {token_id}, not an id of the "
                              f"tokenizer, whose vocabulary has {vocab_size} tokens (0..{vocab_size - 1})")
    return tuple(sorted(set(int(i) for i in setting)))


def keep_positions(token_ids: np.ndarray, excluded: Sequence[int]) -> np.ndarray:
    """Bool array of `token_ids`' shape: True where the token is not one of `excluded`."""
    token_ids = np.asarray(token_ids)
    if not len(excluded):
        return np.ones(token_ids.shape, dtype=bool)
    return ~np.isin(token_ids, np.asarray(excluded, dtype=np.int64))

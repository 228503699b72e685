"""Tests for sae_assets.core.model.lm and lm_train: the embedded TL-native model, its training loop,
save/load, hook-name checks, the hashed split, and a named model booted offline from a tiny
GPT-2 written to a temporary directory. Tiny shapes throughout; the file runs in seconds."""

from __future__ import annotations

import json
import math
import socket

import numpy as np
import pytest
import torch

from sae_assets.core.config import ModelConfig, replace
from sae_assets.core.model.lm import (
    build_embedded_model,
    check_hook_names,
    evaluate_loss,
    forward_logits,
    hook_names,
    load_embedded_model,
    load_named_model,
    next_token_loss,
    save_embedded_model,
    split_is_validation,
    unigram_entropy,
)
from sae_assets.core.model.training import batch_indices, lr_at_step, train_language_model

VOCAB, CTX = 32, 16
TINY = ModelConfig(n_layers=1, d_model=32, n_heads=2, d_mlp=64, batch_size=16, train_tokens=16 * CTX * 120,
                   learning_rate=1e-2, warmup_steps=10, seed=0)


def tiny_model(cfg: ModelConfig = TINY):
    return build_embedded_model(cfg, vocab_size=VOCAB, context_length=CTX)


def successor_corpus(n: int, seed: int) -> torch.Tensor:
    """(n, CTX) sequences that count up mod VOCAB from a random start: bigram-deterministic."""
    starts = torch.randint(0, VOCAB, (n, 1), generator=torch.Generator().manual_seed(seed))
    return (starts + torch.arange(CTX)) % VOCAB  # (n, CTX)


def test_build_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a, b = tiny_model(), tiny_model()
    assert torch.equal(torch.rand(1), before)
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    other = build_embedded_model(replace(TINY, seed=1), vocab_size=VOCAB, context_length=CTX)
    assert not torch.equal(other.state_dict()["embed.weight"], sa["embed.weight"])
    assert forward_logits(a, successor_corpus(3, 0)).shape == (3, CTX, VOCAB)
    assert a.cfg.n_layers == 1 and a.cfg.d_vocab == VOCAB and a.cfg.n_ctx == CTX and a.cfg.act_fn == "gelu"


def test_hook_names_and_wrong_name_error_lists_valid_names():
    model = tiny_model()
    names = hook_names(model)
    for expected in ("hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_post", "blocks.0.hook_mlp_out",
                     "blocks.0.attn.hook_pattern", "blocks.0.mlp.hook_post", "ln_final.hook_normalized"):
        assert expected in names
    check_hook_names(model, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
    with pytest.raises(ValueError) as err:
        check_hook_names(model, ["blocks.0.hook_resid_pst", "blocks.3.hook_resid_post"])
    message = str(err.value)
    assert "'blocks.0.hook_resid_pst'" in message and "'blocks.3.hook_resid_post'" in message
    assert "did you mean 'blocks.0.hook_resid_post'" in message
    assert "Valid hook names:" in message and "blocks.0.hook_mlp_out" in message
    _, cache = model.run_with_cache(successor_corpus(2, 0), names_filter=lambda n: n == "blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape == (2, CTX, TINY.d_model)


def test_split_is_deterministic_stable_under_appends_and_independent_of_order():
    ids = np.arange(2000, dtype=np.int64)
    mask = split_is_validation(ids, 0.1, seed=0)
    assert mask.dtype == bool and mask.shape == ids.shape
    assert 0.07 < mask.mean() < 0.13
    assert np.array_equal(mask, split_is_validation(ids, 0.1, seed=0))
    grown = split_is_validation(np.arange(5000, dtype=np.int64), 0.1, seed=0)
    assert np.array_equal(grown[:2000], mask)
    perm = np.random.default_rng(0).permutation(2000)
    assert np.array_equal(split_is_validation(ids[perm], 0.1, seed=0), mask[perm])
    assert not np.array_equal(split_is_validation(ids, 0.1, seed=1), mask)


def test_unigram_entropy():
    assert unigram_entropy(np.array([0, 1, 2, 3] * 5)) == pytest.approx(math.log(4))
    assert unigram_entropy(np.array([[7, 7], [7, 7]])) == pytest.approx(0.0)
    with pytest.raises(ValueError):
        unigram_entropy(np.array([], dtype=np.int64))


def test_lr_schedule_warms_up_then_decays():
    lrs = [lr_at_step(s, peak_lr=1.0, warmup_steps=4, total_steps=20) for s in range(20)]
    assert lrs[:4] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:]))
    assert lrs[-1] > 0.1 and lr_at_step(20, peak_lr=1.0, warmup_steps=4, total_steps=20) == pytest.approx(0.1)


def test_batch_indices_are_seeded_full_and_cover_each_epoch():
    batches = list(batch_indices(10, 4, 5, seed=3))
    assert all(b.shape == (4,) for b in batches)
    flat = torch.cat(batches)
    assert sorted(flat[:10].tolist()) == list(range(10))  # epoch one is a permutation
    assert torch.equal(flat, torch.cat(list(batch_indices(10, 4, 5, seed=3))))
    assert not torch.equal(flat, torch.cat(list(batch_indices(10, 4, 5, seed=4))))
    assert torch.equal(flat[:8], torch.cat(list(batch_indices(10, 4, 2, seed=3))))  # a prefix of a longer run


SIZE_PAIRS = [(n, b) for n in (1, 2, 3, 5, 7, 10, 11, 16, 31, 64) for b in (1, 2, 3, 4, 6, 9, 16, 31) if b <= n]


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_batch_indices_never_repeat_a_sequence_within_a_batch(seed):
    assert any(b < n < 2 * b for n, b in SIZE_PAIRS) and any(n % b for n, b in SIZE_PAIRS)
    for n, b in SIZE_PAIRS:
        steps = 5 * n // b + 7  # several epochs, ending mid-epoch
        for step, batch in enumerate(batch_indices(n, b, steps, seed)):
            assert batch.shape == (b,) and batch.dtype == torch.int64
            assert len(set(batch.tolist())) == b, f"N={n} B={b} batch {step} repeats: {batch.tolist()}"
            assert 0 <= int(batch.min()) and int(batch.max()) < n


def test_batch_indices_use_every_sequence_equally_often_and_once_per_epoch():
    for n, b in SIZE_PAIRS:
        for steps in (1, n // b + 1, 3 * n // b + 2, 7 * n // b):
            flat = torch.cat(list(batch_indices(n, b, max(steps, 1), seed=5)))
            counts = torch.bincount(flat, minlength=n)
            assert int(counts.max() - counts.min()) <= 1, f"N={n} B={b} steps={steps}: {counts.tolist()}"
        flat = torch.cat(list(batch_indices(n, b, 4 * n, seed=5)))
        for epoch in range(len(flat) // n):  # every whole epoch of the stream is a permutation
            assert sorted(flat[epoch * n:(epoch + 1) * n].tolist()) == list(range(n)), (n, b, epoch)


def test_batch_size_above_the_sequence_count_is_a_clear_error():
    with pytest.raises(ValueError, match=r"model\.batch_size=5 .*training sequences \(2\)"):
        batch_indices(2, 5, 1, seed=0)
    with pytest.raises(ValueError, match=r"model\.batch_size=0"):
        batch_indices(4, 0, 1, seed=0)
    cfg = replace(TINY, batch_size=16)
    with pytest.raises(ValueError, match=r"model\.batch_size=16 .*\(8\)"):
        train_language_model(tiny_model(cfg), successor_corpus(8, 0), successor_corpus(4, 1), cfg)


def test_evaluate_loss_matches_cross_entropy_and_ignores_batch_size():
    model, tokens = tiny_model(), successor_corpus(7, 1)
    with torch.no_grad():
        expected = next_token_loss(model(tokens), tokens).item()
    assert evaluate_loss(model, tokens, batch_size=3) == pytest.approx(expected, rel=1e-5)
    assert evaluate_loss(model, tokens, batch_size=100) == pytest.approx(expected, rel=1e-5)


def test_training_beats_unigram_entropy_and_is_reproducible():
    train, val = successor_corpus(256, 0), successor_corpus(32, 1)
    baseline = unigram_entropy(val.numpy())
    model = tiny_model()
    initial = evaluate_loss(model, val, 16)
    result = train_language_model(model, train, val, TINY, log_every=10, eval_every=40)
    assert result.steps == 120
    assert result.val_loss < 0.25 * baseline and result.val_loss < initial
    assert result.tokens_per_second > 0 and math.isfinite(result.final_train_loss)
    assert [e["step"] for e in result.curve] == list(range(10, 121, 10))
    assert [e["step"] for e in result.curve if "val_loss" in e] == [40, 80, 120]
    assert result.curve[-1]["val_loss"] == result.val_loss
    assert result.curve[-1]["tokens_seen"] == 120 * 16 * CTX
    assert {"step", "tokens_seen", "train_loss", "lr"} <= result.curve[0].keys()
    assert not model.training
    again = train_language_model(tiny_model(), train, val, TINY, log_every=10, eval_every=40)
    assert again.val_loss == result.val_loss and again.final_train_loss == result.final_train_loss


def test_training_raises_naming_the_step_on_divergence():
    train, val = successor_corpus(32, 0), successor_corpus(4, 1)
    cfg = replace(TINY, learning_rate=1e30, warmup_steps=0, max_grad_norm=0.0, train_tokens=16 * CTX * 10)
    with pytest.raises(ValueError, match=r"at step \d+"):
        train_language_model(tiny_model(cfg), train, val, cfg)
    poisoned = tiny_model()
    with torch.no_grad():
        next(poisoned.parameters()).fill_(float("nan"))
    with pytest.raises(ValueError, match=r"training loss became nan at step 1\b"):
        train_language_model(poisoned, train, val, TINY)


def test_training_rejects_bad_token_tensors():
    model, val = tiny_model(), successor_corpus(4, 1)
    with pytest.raises(ValueError, match="train_tokens must be a non-empty"):
        train_language_model(model, torch.empty(0, CTX, dtype=torch.int64), val, TINY)
    with pytest.raises(ValueError, match="outside the vocabulary"):
        train_language_model(model, successor_corpus(4, 0) + VOCAB, val, TINY)
    with pytest.raises(ValueError, match="n_ctx"):
        train_language_model(model, torch.zeros(4, CTX + 1, dtype=torch.int64), val, TINY)


def test_save_load_round_trip_is_exact(tmp_path):
    model = tiny_model()
    short = replace(TINY, train_tokens=16 * CTX * 3)
    train_language_model(model, successor_corpus(64, 0), successor_corpus(4, 1), short)  # weights off init
    files = save_embedded_model(model, cfg=TINY, vocab_size=VOCAB, context_length=CTX, directory=tmp_path / "lm")
    assert sorted(files) == sorted(p.name for p in (tmp_path / "lm").iterdir())
    sidecar = json.loads((tmp_path / "lm" / "model_config.json").read_text())
    assert sidecar["architecture"]["d_vocab"] == VOCAB and sidecar["model_config"]["d_model"] == TINY.d_model
    loaded = load_embedded_model(tmp_path / "lm")
    saved, restored = model.state_dict(), loaded.state_dict()
    assert saved.keys() == restored.keys() and all(torch.equal(saved[k], restored[k]) for k in saved)
    tokens = successor_corpus(5, 2)
    assert torch.equal(forward_logits(model, tokens), forward_logits(loaded, tokens))


@pytest.fixture
def offline(monkeypatch):
    """HF_HUB_OFFLINE=1 (env and the already-imported constant) and no outbound sockets."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def write_tiny_gpt2(directory, with_tokenizer: bool) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, n_positions=32)).save_pretrained(directory)
    if with_tokenizer:
        vocab = {"<|endoftext|>": 0, **{f"w{i}": i for i in range(1, 100)}}
        backend = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
        backend.pre_tokenizer = pre_tokenizers.Whitespace()
        special = "<|endoftext|>"
        PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=special, eos_token=special,
                                unk_token=special).save_pretrained(directory)


def test_named_model_boots_offline_from_a_local_directory(tmp_path, offline):
    from transformers import AutoModelForCausalLM

    write_tiny_gpt2(tmp_path, with_tokenizer=True)
    model = load_named_model(str(tmp_path))
    assert model.tokenizer.vocab_size == 100
    hf = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    tokens = torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = hf(tokens).logits
    assert torch.allclose(forward_logits(model, tokens), expected, atol=1e-5, rtol=0)
    check_hook_names(model, ["blocks.0.hook_resid_post", "blocks.0.hook_mlp_out"])
    _, cache = model.run_with_cache(tokens, names_filter=lambda n: n == "blocks.0.hook_resid_post")
    assert cache["blocks.0.hook_resid_post"].shape == (2, 12, 32)
    assert evaluate_loss(model, tokens, batch_size=1) > 0


def test_named_model_without_tokenizer_is_a_clear_error(tmp_path, offline):
    write_tiny_gpt2(tmp_path, with_tokenizer=False)
    with pytest.raises(ValueError, match="no usable tokenizer"):
        load_named_model(str(tmp_path))

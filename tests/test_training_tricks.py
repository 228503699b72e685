"""The pieces behind bench/training_tricks.py ("My best guess at the important tricks for
training 1L SAEs"): resample points as steps or fractions that must fall inside the run, plain
re-initialisation against Anthropic's resampling, and the data orders (SAELens-style mixing
buffer, cache order). Toy data, tiny shapes, one torch thread.
"""

from __future__ import annotations

import json

import pytest
import torch
from support import toy_sae_config

from sae_assets.core.config import ConfigError, DictionaryPoint, SaeConfig, load_config, replace, resolve_resample_steps
from sae_assets.core.sae import build_sae, train_sae
from sae_assets.core.sae.data_order import buffered_batches, cache_order_batches, mixing_buffer
from sae_assets.core.sae.resample import resample_dead_features
from sae_assets.core.sae.toy import make_toy_data, toy_batches
from sae_assets.core.sae.training import make_optimizer
from sae_assets.defs.dictionary_assets import SAE_DICTIONARY

D, G, B = 32, 64, 128
RELU = DictionaryPoint("relu", G, 0.5)

pytestmark = pytest.mark.usefixtures("single_torch_thread")


@pytest.fixture(scope="module")
def toy():
    return make_toy_data(G, D, seed=0, mean_active=3.0, exponent=0.5)


# --- resample points: steps or fractions, always inside the run ------------------------------------

def test_resample_points_resolve_as_steps_or_fractions_of_the_run():
    assert resolve_resample_steps((0.25, 60, 0.5), 100) == (25, 50, 60)
    assert resolve_resample_steps((0.5, 50), 100) == (50,)
    assert resolve_resample_steps((), 100) == ()
    cfg = SaeConfig(sweep=(RELU,), train_tokens=200 * B, batch_size=B, resample_steps=(0.5, 150.0))
    assert cfg.resample_steps == (0.5, 150) and isinstance(cfg.resample_steps[1], int)


@pytest.mark.parametrize("points", [(50, 150), (100,), (0.001,), (1.5,), (0,), (-3,)])
def test_a_resample_point_outside_the_run_is_refused_naming_the_key_and_the_points(points):
    with pytest.raises(ConfigError, match=r"sae\.resample_steps") as caught:
        SaeConfig(sweep=(RELU,), train_tokens=100 * B, batch_size=B, resample=True, resample_steps=points)
    assert RELU.key in str(caught.value) and "100 steps" in str(caught.value)
    SaeConfig(sweep=(RELU,), train_tokens=100 * B, batch_size=B, resample=False, resample_steps=points)


def test_the_packaged_default_shortened_below_its_resample_steps_fails_to_load():
    # The silent case this guards against: sae.train_tokens cut so that [500, 1000] lie past the end.
    with pytest.raises(ConfigError, match=r"sae\.resample_steps. holds step 500, outside a run of 400 steps"):
        load_config(overrides={"sae": {"train_tokens": 400 * 1024}})
    assert load_config(overrides={"sae": {"train_tokens": 400 * 1024, "resample_steps": [0.3, 0.6]}})


def test_training_refuses_a_schedule_outside_the_run_naming_the_point(toy):
    cfg = toy_sae_config(RELU, 10, B, resample=True, resample_steps=(5,))
    object.__setattr__(cfg, "resample_steps", (12,))  # past the run, as a config built around the check would be
    sae = build_sae(RELU, D, cfg, next(toy_batches(toy, 256, seed=9)(0)))
    with pytest.raises(ValueError, match=rf"sae\.resample_steps.*{RELU.key}"):
        train_sae(sae, toy_batches(toy, B), cfg, RELU)


@pytest.mark.parametrize("method", ["anthropic", "reinit"])
def test_a_fractional_resample_point_resamples_once_at_its_step(toy, method):
    cfg = toy_sae_config(RELU, 12, B, resample=True, resample_steps=(0.5,), resample_method=method,
                         dead_after_tokens=2 * B, lr_warmup_steps=0, lr_decay_fraction=0.0, rewarm_steps=4)
    sae = build_sae(RELU, D, cfg, next(toy_batches(toy, 256, seed=9)(0)))
    with torch.no_grad():
        sae.b_enc[:8] = -100.0  # eight features that cannot fire: dead by step 6
    outcome = train_sae(sae, toy_batches(toy, B), cfg, RELU, log_every=1)
    lrs = {row["step"]: row["lr"] for row in outcome.curve}  # row s+1 carries step s's LR
    assert outcome.resamples == 1
    assert lrs[6] == pytest.approx(3e-3) and lrs[7] == pytest.approx(3e-4), "the re-warm-up starts at step 6"


def test_resample_method_enters_the_dictionary_hash_only_off_its_default():
    cfg = load_config(None)
    key = cfg.sae.sweep[0].key
    values = SAE_DICTIONARY.config_values(cfg)
    # As before the key existed: no resample_method, and the steps hash as the ints they were.
    assert "sae.resample_method" not in values and json.dumps(values["sae.resample_steps"]) == "[500, 1000]"
    reinit = replace(cfg, sae=replace(cfg.sae, resample_method="reinit"))
    assert SAE_DICTIONARY.config_values(reinit)["sae.resample_method"] == "reinit"
    assert SAE_DICTIONARY.config_hash(reinit, key) != SAE_DICTIONARY.config_hash(cfg, key)
    with pytest.raises(ConfigError, match=r"sae\.resample_method"):
        load_config(overrides={"sae": {"resample_method": "fancy"}})


def test_reinit_points_revived_features_at_random_not_at_the_inputs(toy):
    x = next(toy_batches(toy, 512, seed=3)(0))
    dead_F = torch.zeros(G, dtype=torch.bool)
    dead_F[[2, 9, 30, 41]] = True
    directions = {}
    for method in ("anthropic", "reinit"):
        sae = build_sae(RELU, D, toy_sae_config(RELU, 10, B), x)
        live_norm = sae.W_enc[:, ~dead_F].norm(dim=0).mean()
        resample_dead_features(sae, make_optimizer(sae, 1e-3), x, dead_F, torch.Generator().manual_seed(0),
                               method=method)
        assert torch.allclose(sae.W_dec[dead_F].norm(dim=-1), torch.ones(4))
        assert torch.allclose(sae.W_enc[:, dead_F].norm(dim=0), torch.full((4,), 0.2 * live_norm.item()))
        centred = x * sae.input_scale - sae.b_dec
        cosines = torch.nn.functional.normalize(centred, dim=-1) @ sae.W_dec[dead_F].T  # (512, 4)
        directions[method] = cosines.max(0).values
    assert (directions["anthropic"] > 0.999).all(), "Anthropic's directions are inputs of the batch"
    assert (directions["reinit"] < 0.9).all(), "plain re-initialisation ignores the inputs"


# --- data orders ---------------------------------------------------------------------------------

def _rows(n: int) -> torch.Tensor:
    """(n, 2) rows whose first column is their cache-order position."""
    return torch.stack([torch.arange(n, dtype=torch.float32), torch.zeros(n)], dim=1)


def test_cache_order_serves_consecutive_rows_and_runs_on_into_the_next_epoch():
    batches = cache_order_batches(_rows(10), 4)
    got = [b[:, 0].tolist() for _, b in zip(range(3), batches(0))]
    assert got == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 0, 1]]
    assert next(batches(2))[:, 0].tolist() == [8, 9, 0, 1]


def test_mixing_buffer_serves_every_row_once_never_early_and_keeps_half_back():
    N, batch, buffer = 4096, 32, 512
    served = torch.cat(list(mixing_buffer(_rows(N).split(batch), buffer_rows=buffer, batch_size=batch,
                                          generator=torch.Generator().manual_seed(0))))
    source = served[:, 0].long()
    assert sorted(source.tolist()) == list(range(N)), "each row exactly once"
    position = torch.arange(N)
    assert (source < position + buffer).all(), "no row is served before it arrives"
    assert not torch.equal(source, position), "the order is mixed"
    delay = position - source
    # Half the buffer stays behind at each serving, so some rows wait through several refills:
    # longer than one buffer, which a block shuffle (permute a buffer, serve all of it) never does.
    assert int(delay.max()) > buffer
    first_fill = source[: buffer - buffer // 2]
    assert first_fill.max() < buffer and len(set(first_fill.tolist())) == len(first_fill)
    with pytest.raises(ValueError, match="buffer_rows"):
        mixing_buffer([], buffer_rows=16, batch_size=32, generator=torch.Generator())


def test_buffered_batches_are_a_pure_function_of_the_step():
    batches = buffered_batches(_rows(1000), 16, buffer_rows=128, seed=5)
    run = [b for _, b in zip(range(40), batches(0))]
    resumed = [b for _, b in zip(range(10), batches(30))]
    assert all(torch.equal(a, b) for a, b in zip(run[30:], resumed))
    other_seed = next(buffered_batches(_rows(1000), 16, buffer_rows=128, seed=6)(0))
    assert not torch.equal(run[0], other_seed)

"""The abstract sparse autoencoder: parameters, input scaling, encode/decode and the loss frame.

`SparseAutoencoder` owns the four SAELens-layout parameters (W_enc (D, F), b_enc (F),
W_dec (F, D), b_dec (D)) and a scalar buffer `input_scale`. Inputs are multiplied by
`input_scale` before anything else, so that their mean norm is sqrt(D) (Anthropic, April 2024
update; `set_input_scale_from`), and reconstructions are divided by it again: `encode`,
`decode` and `forward` speak the caller's units, while the parameters and `loss` live in the
scaled space. An architecture is one subclass that supplies `activate` (pre-activations to
features), `penalties` (its sparsity and auxiliary losses) and, where its recipe needs them,
the decoder constraints `constrain_gradients` / `constrain_weights`. Optional hooks: an
activation with per-feature parameters encodes a feature slice through `activate_range`; one
that trains differently from how it infers (BatchTopK) overrides `activate_train`, which
`loss` calls; per-feature parameters beyond the four are reset on resampling by
`reset_features` and travel to SAELens through `saelens_tensors` / `load_saelens_tensors`.
Sparse training: an architecture that keeps a few latents per row in training (TopK, BatchTopK,
Matryoshka; `sparse_decoder`) returns them from `train_codes` as `SparseCodes`, chosen from
pre-activations computed without a graph; `loss` attaches just those entries to the encoder
(`pre_entries`, whose backward is N x D for N kept entries) and decodes with `sparse_decode` (an
`embedding_bag` of decoder rows weighted by the activations, N x D forward and backward). Only
the encoder's forward product stays B x F x D (it must score every latent), against five such
products densely; loss and gradients are the dense path's up to float rounding. With the input
centred on b_dec, b_dec's gradient through the encoder is taken as -W_enc (sum_B grad_pre)
rather than through a (B, F) @ (F, D) product. The pieces are in sparse.py.
Transcoders: built with `d_out`, the module reads activations x (B, D_in) of one hook and
reconstructs y (B, D_out) of another (an MLP's input -> its output). W_dec is then (F, D_out),
b_dec (D_out,) and is never subtracted from the input; a second scalar buffer `output_scale`
scales the target as `input_scale` scales the input, and `loss(x, info, target_BD=y)` measures
the reconstruction against y (architectures read the scaled target from `StepInfo.target_BD`
through `reconstruction_target`). Training batches of a transcoder are the two hooks' rows side
by side, (B, D_in + D_out); `split_rows` parts them.
One file per architecture: relu, topk, jumprelu, batchtopk, matryoshka, gated.
Tests: tests/test_sae_core.py, tests/test_sae_architectures.py.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from sae_assets.core.sae.sparse import CentredLinear, PreEntries, SparseCodes, sparse_decode

# Letter key: B batch rows, D input width, F features (dictionary width), N sample rows (or
# kept entries of SparseCodes); for a transcoder, E its output width (D_out).


class StepInfo(NamedTuple):
    """What a loss may need to know about training progress; all optional."""

    step: int = 0
    """Optimizer steps taken so far (0-based index of the current step)."""
    total_steps: int = 0
    """Steps the whole run takes; 0 = unknown (warm-ups then count as finished)."""
    dead_F: Tensor | None = None
    """(F,) bool, features currently dead (TopK's AuxK loss uses it); None = none known."""
    codes: SparseCodes | None = None
    """The batch's training activations as `SparseCodes` when the architecture trains sparsely;
    set by `loss` for `penalties` (Matryoshka's prefix reconstructions use them; then the
    `pre_BF` that `penalties` gets has no graph, and AuxK attaches its entries by `pre_entries`)."""
    target_BD: Tensor | None = None
    """A transcoder's reconstruction target (B, E) in its scaled space, set by `loss`; None for an
    SAE, whose target is its own scaled input (see `reconstruction_target`)."""


def reconstruction_target(xs_BD: Tensor, info: StepInfo) -> Tensor:
    """What `penalties` compare reconstructions with: the scaled input, or a transcoder's target."""
    return xs_BD if info.target_BD is None else info.target_BD


class LossOutput(NamedTuple):
    """One batch's loss; `total = mse + sparsity + aux` is what gets back-propagated."""

    total: Tensor
    """Scalar to back-propagate."""
    mse: Tensor
    """Scalar: ||x - x_hat||^2 summed over D, mean over the batch, in the scaled input space."""
    sparsity: Tensor
    """Scalar: the sparsity penalty as added to `total` (coefficient and warm-up applied)."""
    aux: Tensor
    """Scalar: the auxiliary loss as added to `total` (TopK's AuxK, a Gated SAE's gate
    reconstruction, Matryoshka's inner-prefix losses; 0 where none)."""
    l0: Tensor
    """Scalar: mean number of non-zero features per row."""
    f: Tensor
    """(B, F) feature activations of the batch (attached to the graph, except where the loss is
    computed by a fused function with its own backward: ReLU's)."""
    fired_F: Tensor | None = None
    """(F,) bool: the features non-zero on some row of the batch, for the dead-feature tracker
    (so it need not scan f again); None where not computed."""


def active_counts(f_BF: Tensor) -> tuple[Tensor, Tensor]:
    """(l0, fired_F) of a batch of activations, which are >= 0 in every architecture: the mean
    number of non-zero entries per row (0-d, exact: one sign per entry, row sums exact below 2**24
    features, then float64) and (F,) bool, the features non-zero on some row. Both from passes
    that vectorise: torch's count_nonzero and its reductions over bool tensors are several
    times slower on the CPU, and at a small d_in they cost as much as a product."""
    B = f_BF.shape[0]
    if B == 0:
        return f_BF.new_zeros(()), torch.zeros(f_BF.shape[1], dtype=torch.bool, device=f_BF.device)
    l0 = (torch.sign(f_BF).sum(1).sum(dtype=torch.float64) / B).to(f_BF.dtype)
    return l0, f_BF.amax(0) > 0


class SparseAutoencoder(nn.Module, ABC):
    """Base of every architecture: x_hat = (f(x * s) @ W_dec + b_dec) / s, s = input_scale."""

    architecture: ClassVar[str]
    """Our name for the architecture, as in DictionaryPoint.architecture ('relu', 'topk', ...)."""
    saelens_architecture: ClassVar[str]
    """The SAELens cfg.json `architecture` this maps to ('standard', 'topk', 'jumprelu', 'gated')."""
    init_decoder_norm: ClassVar[float] = 1.0
    """Norm given to decoder rows by `initialize` (the recipe's choice)."""
    elementwise_activation: ClassVar[bool] = False
    """True when `activate` treats each pre-activation alone, so a slice of features can be
    encoded without the others (ReLU); False when it compares features (TopK)."""
    activation_is_relu: ClassVar[bool] = False
    """True when `activate` is relu(pre) and nothing else, so the entries > 0 of the
    pre-activations are the activations (`encode_range(..., rectify=False)`)."""
    sparse_decoder: bool = False
    """True when `loss` trains through `train_codes` (TopK, BatchTopK, Matryoshka set it on the
    instance; setting it False there gives the dense path, which tests compare against)."""
    training_revision: ClassVar[int] = 0
    """Bumped when a change to this architecture's code (not to the config: a loss term, a
    constructor default `make_sae` leaves alone) changes the weights a sweep point trains.
    sae_dictionary hashes it where > 0 (identity.dictionary_point) into the manifest and the
    checkpoint tag, so an old checkpoint is never resumed and bench/sae_sweep.py retrains just
    this architecture. Dagster marks partitions stale by the asset's code version, not by that
    hash, so a bump goes with one of SAE_DICTIONARY's version (dictionary_assets.TRAINED_REVISIONS;
    tests/test_identity.py holds the two together)."""

    def __init__(self, d_in: int, width: int, *, apply_b_dec_to_input: bool, d_out: int | None = None) -> None:
        super().__init__()
        if d_in < 1 or width < 1 or (d_out is not None and d_out < 1):
            raise ValueError(f"d_in, width and d_out must be >= 1, got {d_in}, {width} and {d_out}")
        if d_out is not None and apply_b_dec_to_input:
            raise ValueError("a transcoder (d_out given) cannot subtract b_dec, an output-space bias, from its input")
        self.d_in, self.width = int(d_in), int(width)
        self.transcoder = d_out is not None
        self.d_out = int(d_out) if d_out is not None else self.d_in
        self.apply_b_dec_to_input = bool(apply_b_dec_to_input)
        self.W_enc = nn.Parameter(torch.zeros(d_in, width))
        self.b_enc = nn.Parameter(torch.zeros(width))
        self.W_dec = nn.Parameter(torch.zeros(width, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.register_buffer("input_scale", torch.tensor(1.0))
        if self.transcoder:  # an SAE's state dict keeps the keys it always had
            self.register_buffer("output_scale", torch.tensor(1.0))

    # --- what an architecture supplies -------------------------------------------------

    @abstractmethod
    def activate(self, pre_BF: Tensor) -> Tensor:
        """Feature activations f (B, F) from encoder pre-activations (B, F)."""

    @abstractmethod
    def penalties(self, x_BD: Tensor, pre_BF: Tensor, f_BF: Tensor, x_hat_BD: Tensor,
                  info: StepInfo) -> tuple[Tensor, Tensor]:
        """(sparsity, aux) scalars for scaled inputs x and reconstructions x_hat."""

    @abstractmethod
    def hyperparameters(self) -> dict[str, Any]:
        """Constructor keyword arguments beyond d_in and width (what io.py records)."""

    def activate_range(self, pre_BW: Tensor, lo: int, hi: int) -> Tensor:
        """Activations of the features [lo, hi) from their pre-activations (B, hi - lo); only
        called when `elementwise_activation`. Default: `activate` (no per-feature parameters)."""
        return self.activate(pre_BW)

    def activate_train(self, pre_BF: Tensor) -> Tensor:
        """The activation `loss` uses (training); default `activate`. BatchTopK differs."""
        return self.activate(pre_BF)

    def train_codes(self, pre_BF: Tensor) -> SparseCodes:
        """When `sparse_decoder`: the entries `activate_train` keeps, as `SparseCodes` whose values
        are the ReLU of those pre-activations (what TopK and BatchTopK keep); `pre_BF` comes
        without a graph and `loss` re-attaches the values through `pre_entries`."""
        raise NotImplementedError(f"{type(self).__name__} has no sparse training path")

    def pre_entries(self, x_scaled_BD: Tensor, pre_BF: Tensor, rows_N: Tensor, features_N: Tensor) -> Tensor:
        """(N,) pre-activations at (rows_N, features_N), attached to the encoder's parameters, with
        values read from `pre_BF` (= pre_activations(x_scaled), no graph needed) and a backward
        that costs N x D, not B x F x D."""
        c_D = self.b_dec if self.apply_b_dec_to_input else None
        return PreEntries.apply(pre_BF.detach(), x_scaled_BD, c_D, self.W_enc, self.b_enc, rows_N, features_N)

    def decode_codes(self, codes: SparseCodes) -> Tensor:
        """(B, D) reconstruction in the scaled space from sparse codes, = decode_scaled(codes.dense())."""
        return sparse_decode(codes, self.W_dec) + self.b_dec

    def reset_features(self, index_R: Tensor) -> list[tuple[Tensor, int]]:
        """Reset this architecture's own per-feature parameters of resampled features to their
        initial values; returns (parameter, feature dim) pairs whose optimizer state to zero."""
        return []

    def saelens_tensors(self) -> dict[str, Tensor]:
        """Tensors SAELens needs beyond W_enc, b_enc, W_dec, b_dec, by SAELens name (acting on
        pre-activations, which folding the input scale leaves unchanged)."""
        return {}

    def load_saelens_tensors(self, tensors: dict[str, Tensor]) -> None:
        """Set what `saelens_tensors` exports from a loaded state dict. Default: nothing."""

    def saelens_fields(self) -> dict[str, Any]:
        """Extra cfg.json keys SAELens reads for this architecture (e.g. k for TopK)."""
        return {}

    def constrain_gradients(self) -> None:
        """Called after backward, before the optimizer step. Default: no constraint."""

    def constrain_weights(self) -> None:
        """Called after the optimizer step. Default: no constraint."""

    # --- shared machinery ---------------------------------------------------------------

    @property
    def target_scale(self) -> Tensor:
        """0-d: the factor on the reconstruction target (`output_scale` for a transcoder, else
        `input_scale`); reconstructions are divided by it back into the caller's units."""
        return self.output_scale if self.transcoder else self.input_scale

    @property
    def row_width(self) -> int:
        """Width of one training row: D_in, or D_in + D_out for a transcoder (input | target)."""
        return self.d_in + self.d_out if self.transcoder else self.d_in

    def split_rows(self, rows_BR: Tensor) -> tuple[Tensor, Tensor | None]:
        """(input (B, D_in), target (B, D_out) or None for an SAE) of training rows (B, row_width)."""
        if not self.transcoder:
            return rows_BR, None
        return rows_BR[:, :self.d_in], rows_BR[:, self.d_in:]

    def pre_activations(self, x_scaled_BD: Tensor) -> Tensor:
        """(B, F) encoder pre-activations of inputs already in the scaled space."""
        if x_scaled_BD.ndim != 2:  # leading dims beyond one batch dim: plain products
            centred = x_scaled_BD - self.b_dec if self.apply_b_dec_to_input else x_scaled_BD
            return centred @ self.W_enc + self.b_enc
        if self.apply_b_dec_to_input:
            return CentredLinear.apply(x_scaled_BD, self.b_dec, self.W_enc, self.b_enc)
        return torch.addmm(self.b_enc, x_scaled_BD, self.W_enc)

    def decode_scaled(self, f_BF: Tensor) -> Tensor:
        """(B, D) reconstruction in the scaled space."""
        if f_BF.ndim != 2:
            return f_BF @ self.W_dec + self.b_dec
        return torch.addmm(self.b_dec, f_BF, self.W_dec)

    def encode(self, x_BD: Tensor) -> Tensor:
        """Feature activations (B, F) of inputs (B, D) in the caller's units."""
        return self.activate(self.pre_activations(x_BD * self.input_scale))

    def encode_range(self, x_BD: Tensor, lo: int, hi: int, *, rectify: bool = True) -> Tensor:
        """Activations (B, hi - lo) of the features [lo, hi), equal to encode(x)[:, lo:hi].

        With an elementwise activation only those W_enc columns are multiplied, so the cost
        and memory are B x (hi - lo); otherwise (TopK) every pre-activation is needed.
        `rectify=False` is for callers that read only the entries > 0 (the feature sampler):
        where the activation is a plain ReLU of the pre-activation, the pre-activations come
        back as they are (their entries > 0 are the activations, the rest are its zeros), one
        pass over the (B, W) output fewer; other architectures ignore it.
        """
        if not 0 <= lo < hi <= self.width:
            raise ValueError(f"feature range [{lo}, {hi}) lies outside the dictionary's {self.width} features")
        if not self.elementwise_activation:
            return self.activate(self.pre_activations(x_BD * self.input_scale))[:, lo:hi]
        # The feature sampler's hot path, where at a small d_in every pass over the (B, D) input or
        # the (B, W) output costs about as much as the product itself: the input scale s goes into
        # the (D, W) weight slice and the decoder bias into the (W,) encoder bias, so that the
        # input is read once and the output written once (addmm):
        #   ((x s - b_dec) @ W + b_enc) = x @ (s W) + (b_enc - b_dec @ W)
        # equal to encode(x)[:, lo:hi] up to float rounding.
        W_DW = self.W_enc[:, lo:hi]
        b_W = self.b_enc[lo:hi] - self.b_dec @ W_DW if self.apply_b_dec_to_input else self.b_enc[lo:hi]
        pre_BW = torch.addmm(b_W, x_BD, W_DW * self.input_scale)
        return pre_BW if not rectify and self.activation_is_relu else self.activate_range(pre_BW, lo, hi)

    def decoder_directions(self, lo: int = 0, hi: int | None = None) -> Tensor:
        """(hi - lo, D) decoder rows of features [lo, hi) in the units of the model's activations
        (what one unit of each feature adds to x_hat), detached: for logit effects and the like."""
        return (self.W_dec[lo:hi] / self.target_scale).detach()

    def decode(self, f_BF: Tensor) -> Tensor:
        """Reconstruction (B, D) (a transcoder: (B, E)) in the caller's units."""
        return self.decode_scaled(f_BF) / self.target_scale

    def forward(self, x_BD: Tensor) -> tuple[Tensor, Tensor]:
        """(x_hat (B, D) in the caller's units, f (B, F))."""
        f_BF = self.encode(x_BD)
        return self.decode(f_BF), f_BF

    def scaled_target(self, x_BD: Tensor, target_BD: Tensor | None) -> Tensor | None:
        """A transcoder's target (B, E) in its scaled space; None for an SAE (its target is its
        input). Raises ValueError when a transcoder gets no target or an SAE gets one."""
        if self.transcoder != (target_BD is not None):
            raise ValueError("a transcoder's loss needs target_BD (its output hook's activations)" if self.transcoder
                             else "an SAE reconstructs its input: target_BD is only for transcoders")
        if target_BD is None:
            return None
        if target_BD.shape != (x_BD.shape[0], self.d_out):
            raise ValueError(f"target must be ({x_BD.shape[0]}, {self.d_out}), got {tuple(target_BD.shape)}")
        return target_BD * self.output_scale

    def loss(self, x_BD: Tensor, step_info: StepInfo | None = None, target_BD: Tensor | None = None) -> LossOutput:
        """The training loss of a batch in the caller's units, computed in the scaled space;
        a transcoder's against `target_BD` (B, E), an SAE's against x."""
        info = step_info if step_info is not None else StepInfo()
        xs_BD = x_BD * self.input_scale
        ys_BD = self.scaled_target(x_BD, target_BD)
        info = info._replace(target_BD=ys_BD)
        codes = None
        if self.sparse_decoder:  # only the kept entries are attached; f is built for the caller
            with torch.no_grad():
                pre_BF = self.pre_activations(xs_BD)
            codes = self.train_codes(pre_BF)
            values_N = self.pre_entries(xs_BD, pre_BF, codes.rows_N, codes.features_N).relu()
            codes = codes._replace(values_N=values_N)
            f_BF, x_hat_BD = codes.dense(), self.decode_codes(codes)
            info = info._replace(codes=codes)
        else:
            pre_BF = self.pre_activations(xs_BD)
            f_BF = self.activate_train(pre_BF)
            x_hat_BD = self.decode_scaled(f_BF)
        mse = (x_hat_BD - reconstruction_target(xs_BD, info)).pow(2).sum(-1).mean()
        sparsity, aux = self.penalties(xs_BD, pre_BF, f_BF, x_hat_BD, info)
        with torch.no_grad():
            if codes is None:
                l0, fired_F = active_counts(f_BF.detach())
            else:  # the same, from the N entries rather than B x F
                kept_N = codes.values_N != 0
                l0 = kept_N.sum(dtype=f_BF.dtype) / f_BF.shape[0]
                fired_F = torch.zeros(self.width, dtype=torch.bool, device=f_BF.device)
                fired_F[codes.features_N[kept_N]] = True
        return LossOutput(mse + sparsity + aux, mse, sparsity, aux, l0, f_BF, fired_F)

    @torch.no_grad()
    def set_input_scale_from(self, sample_ND: Tensor) -> float:
        """Set `input_scale` = sqrt(D) / mean ||x|| over a sample of inputs; returns it."""
        self.input_scale.fill_(_norm_scale(sample_ND, self.d_in, "inputs"))
        return float(self.input_scale)

    @torch.no_grad()
    def set_output_scale_from(self, sample_NE: Tensor) -> float:
        """A transcoder's `output_scale` = sqrt(E) / mean ||y|| over a sample of targets; returns it."""
        if not self.transcoder:
            raise ValueError("only a transcoder has an output scale (an SAE's is its input scale)")
        self.output_scale.fill_(_norm_scale(sample_NE, self.d_out, "targets"))
        return float(self.output_scale)

    @torch.no_grad()
    def initialize(self, W_dec_FD: Tensor, W_enc_FD: Tensor | None = None) -> None:
        """Decoder rows = the given directions at `init_decoder_norm`, W_enc = W_dec^T, biases 0.
        A transcoder's encoder reads another space: its (F, D_in) directions come as `W_enc_FD`
        (at the same norm)."""
        if W_dec_FD.shape != (self.width, self.d_out):
            raise ValueError(f"W_dec must be ({self.width}, {self.d_out}), got {tuple(W_dec_FD.shape)}")
        if self.transcoder != (W_enc_FD is not None):
            raise ValueError("a transcoder's initialisation needs encoder directions W_enc_FD (and an SAE's ties them)")
        self.W_dec.copy_(_unit_rows(W_dec_FD.to(self.W_dec)) * self.init_decoder_norm)
        if W_enc_FD is None:
            self.W_enc.copy_(self.W_dec.T)
        else:
            if W_enc_FD.shape != (self.width, self.d_in):
                raise ValueError(f"W_enc directions must be ({self.width}, {self.d_in}), got {tuple(W_enc_FD.shape)}")
            self.W_enc.copy_((_unit_rows(W_enc_FD.to(self.W_enc)) * self.init_decoder_norm).T)
        self.b_enc.zero_()
        self.b_dec.zero_()


def _norm_scale(sample_ND: Tensor, width: int, what: str) -> float:
    """sqrt(width) / the mean row norm of a (N, width) sample: the factor that brings its rows to
    mean norm sqrt(width). ValueError for another shape or a mean norm that is 0 or not finite."""
    if sample_ND.ndim != 2 or sample_ND.shape[1] != width:
        raise ValueError(f"{what} sample must be (N, {width}), got {tuple(sample_ND.shape)}")
    mean_norm = sample_ND.float().norm(dim=-1).mean().item()
    if not math.isfinite(mean_norm) or mean_norm <= 0:
        raise ValueError(f"cannot scale {what}: their mean norm is {mean_norm}")
    return math.sqrt(width) / mean_norm


def _unit_rows(rows_FD: Tensor) -> Tensor:
    return rows_FD / rows_FD.norm(dim=-1, keepdim=True).clamp_min(1e-12)

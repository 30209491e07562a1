"""The sections of a run config: one frozen dataclass per component (STYLE R4), each field with its default, its
allowed range (``_field(..., ge=...)``, checked by the loader) and a docstring (docs/config.md is generated from them).

Each component takes only its own section (``ZarrBank.open(cfg.bank)``, never the whole ``Config``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

__all__ = [
    "RunCfg",
    "DataCfg",
    "SynthCfg",
    "ModelCfg",
    "HeadCfg",
    "LossCfg",
    "TrainCfg",
    "EngineCfg",
    "BankCfg",
    "CacheCfg",
    "EvalCfg",
    "Config",
    "section_names",
]


def _field(default: Any, *, ge: float | None = None, gt: float | None = None, le: float | None = None,
           lt: float | None = None) -> Any:
    """A dataclass field with an allowed range checked by the loader."""
    bounds = {k: v for k, v in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if v is not None}
    return field(default=default, metadata=bounds)


@dataclass(frozen=True, kw_only=True, slots=True)
class RunCfg:
    """[run]: naming, seeding and placement of a run."""

    name: str = "synth_tiny"
    """Run name; outputs go to ``<output_dir>/<name>/`` (config, metrics, checkpoints, eval)."""
    output_dir: str = "runs"
    """Parent directory of run directories."""
    seed: int = _field(0, ge=0)
    """Seed of model init, data order and augmentation."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """``auto`` uses a GPU when one is present, else the CPU."""
    tensorboard: Literal["auto", "on", "off"] = "auto"
    """Also write the step metrics as TensorBoard events to ``<output_dir>/<name>/tensorboard/``: ``auto`` when the
    ``tensorboard`` package is installed (the ``tensorboard`` extra), ``on`` always (refused at start when the
    package is missing), ``off`` never. ``metrics.jsonl`` is always written."""


@dataclass(frozen=True, kw_only=True, slots=True)
class DataCfg:
    """[data]: where the training shards are and how they are read."""

    path: str = "data/synth_tiny"
    """Dataset directory with ``shards/*.tar``, ``index.json`` and (optionally) ``pairs.bin``."""
    generate_if_missing: bool = True
    """Generate the synthetic dataset described by [synth] when ``path`` has no ``index.json``."""
    num_workers: int = _field(2, ge=0)
    """DataLoader worker processes (0 reads in the training process)."""
    shuffle_buffer: int = _field(8192, ge=1)
    """Samples held in the shuffle buffer of each reader."""
    decoder: Literal["auto", "simplejpeg", "pil"] = "auto"
    """JPEG decoder of the loader's workers (the same pixels, docs/data.md): ``auto`` simplejpeg when installed
    (about 3x less CPU per 112 px face), else PIL."""
    sampler: Literal["auto", "instance", "identity", "attention", "dual", "block"] = "auto"
    """How samples form batches (docs/data.md): ``auto`` the one the head needs (``attention`` for ``attfc``,
    ``dual`` for ``dcp``, ``identity`` for ``vfc``, ``instance`` otherwise; the resolved config shows it);
    ``instance`` uniform images, streamed shard by shard; ``identity``
    P = batch_size / K identities × K images; ``attention`` a query image plus ``num_keys`` key images of its identity
    per item (batches of shape (B, 1+k, 3, S, S), for an AttFC head); ``dual`` an instance batch plus an identity
    batch of ``dual_identities`` × K images (F2C); ``block`` every image once, identities drawn from a sliding
    window of ``block_window`` bank blocks so that the nvme tier reads blocks in order."""
    images_per_identity: int = _field(4, ge=1)
    """K: images of each identity in an ``identity`` batch and in the identity part of a ``dual`` batch."""
    dual_identities: int = _field(0, ge=0)
    """``dual``: identities in the identity part of a batch; 0 = batch_size // images_per_identity."""
    num_keys: int = _field(2, ge=1)
    """``attention``: key images per query (AttFC draws 2)."""
    keys_include_query: bool = False
    """``attention``: draw the keys uniformly, with replacement, from all the identity's images, the query included
    (AttFC's loader, ``random.choices``), instead of from its other images. A key that repeats the query (flipped
    independently) is an easy, instance-level positive; on ``synth_tiny`` it is what lets ``attfc`` learn in one
    epoch (docs/methods.md)."""
    shard_window: int = _field(4, ge=1)
    """``identity``, ``attention``, ``dual``: items are mixed among this many neighbouring shards of an
    epoch-random shard order (the planned samplers' shuffle buffer)."""
    block_window: int = _field(0, ge=0)
    """``block``: bank blocks a batch's identities are drawn from (the width of the sliding window); 0 = the blocks
    the nvme tier keeps in RAM (``bank.cache_blocks``)."""
    block_rows: int = _field(0, ge=0)
    """``block``: ids per bank block; 0 = the bank's ``chunk_rows`` (bank.chunk_rows, or its automatic value)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SynthCfg:
    """[synth]: the embedded synthetic face dataset (also the options of ``offloadfr synth``)."""

    num_identities: int = _field(2000, ge=2)
    """Training identities (ids ``0 .. num_identities-1``)."""
    num_holdout: int = _field(300, ge=2)
    """Held-out identities, used only for the verification pairs."""
    image_size: int = _field(32, ge=8, le=512)
    """Side of the square images written, in pixels."""
    seed: int = _field(0, ge=0)
    """Same seed, byte-identical dataset."""
    min_images: int = _field(4, ge=2)
    """Fewest images of a training identity."""
    max_images: int = _field(60, ge=2)
    """Most images of a training identity."""
    mean_images: float = _field(20.0, gt=0)
    """Mean images per training identity (long-tailed between min and max)."""
    num_pairs: int = _field(3000, ge=20)
    """Verification pairs in ``pairs.bin`` (half same identity, half different)."""
    samples_per_shard: int = _field(2000, ge=1)
    """Samples per tar shard (a shard never splits an identity, so shards may hold a few more)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCfg:
    """[model]: the backbone."""

    backbone: str = "tiny"
    """Registered backbone name: ``tiny``, ``iresnet18``, ``iresnet50``, ``iresnet100``, ``mobilefacenet``."""
    embedding_size: int = _field(512, ge=2)
    """Width D of the embedding (and of every class center)."""
    image_size: int = _field(112, ge=8, le=512)
    """Input side in pixels; images are resized to it when the dataset differs."""


@dataclass(frozen=True, kw_only=True, slots=True)
class HeadCfg:
    """[head]: the classifier over identities."""

    kind: Literal["fc", "partial_fc", "pfc_dense", "vfc", "attfc", "dcp"] = "fc"
    """``fc``: all class centers on the device (small N only); ``partial_fc``: centers in the bank ([bank]), K of
    them resident in the device container ([cache]); ``pfc_dense``: arcface_torch's PartialFC_V2 on the device
    (dense weight and momentum, negatives resampled every step; a baseline); ``vfc``: Virtual FC, ``num_anchors``
    anchors rebuilt from each batch's features (meant for the identity P×K sampler; docs/methods.md); ``attfc``:
    AttFC, a FIFO of generative class centers made by an EMA key encoder from key images (needs
    ``data.sampler = "attention"``; docs/methods.md); ``dcp``: F2C's Dynamic Class Pool, per-identity features of an
    EMA gallery net in an LRU pool (needs ``data.sampler = "dual"``; docs/methods.md)."""
    sample_rate: float = _field(1.0, gt=0, le=1)
    """Partial FC heads: fraction of the classes in each step's softmax (the batch's positives are always in)."""
    momentum: float = _field(0.9, ge=0, lt=1)
    """SGD momentum of the class centers."""
    weight_decay: float = _field(5e-4, ge=0)
    """Weight decay of the class centers, applied only to rows that received a gradient."""
    lr_scale: float = _field(1.0, gt=0)
    """Head learning rate = ``lr_scale`` × the scheduled backbone learning rate."""
    kernel: Literal["torch", "triton"] = "torch"
    """``fc`` and ``partial_fc`` on one process: row normalisation, margin and softmax cross-entropy in plain PyTorch
    (the reference) or in fused Triton kernels (CUDA, needs the triton package; not for ``loss.kind = "adasin"``;
    multi-process runs keep the plain sharded loss). Same values to float tolerance (docs/kernels.md)."""
    gemm_precision: Literal["fp32", "tf32", "bf16"] = "fp32"
    """``fc`` and ``partial_fc``: arithmetic of the logit GEMMs (forward and backward): ``fp32`` exact, ``tf32`` TF32
    tensor cores on CUDA, ``bf16`` normalised operands rounded to bfloat16 (docs/kernels.md)."""
    num_anchors: int = _field(0, ge=0)
    """``vfc``: M, the anchors (rows) of the virtual FC; identity ``i`` belongs to group ``i mod M``. 0 = the Virtual
    FC code's 1000, but at most half the identities (M ≥ N gives every identity an anchor of its own that its batch
    overwrites: 11.7 points below ``fc`` on the real faces where N / 2 gave about 7; docs/methods.md). A batch can hold
    at most M distinct identities; identities beyond that are ignored."""
    key_momentum: float = _field(0.999, ge=0, lt=1)
    """``attfc``: m of the key encoder's EMA, θ_k ← m·θ_k + (1 − m)·θ_q after each optimizer step (the code's 0.999)."""
    queue_fraction: float = _field(0.3, gt=0, le=1)
    """``attfc``: size of the Dynamic Class Container (the FIFO of generative class centers) as a fraction of the
    identities, Q = max(1, int(fraction × N)) (the code's 30 %, which it also rounds down to a multiple of the
    batch)."""
    attention_temperature: float = _field(1.0, gt=0)
    """``attfc``: temperature τ of the key attention softmax_j(cos(query, key_j) / τ) (the code's 1; an option
    because the paper's "quality weighting" formula was not available)."""
    batch_negatives: bool = False
    """``attfc``: also use the other samples' generative class centers of the batch as negatives (same label masked);
    the code (false) uses only each query's own center and the queue."""
    dcp_form: Literal["single", "symmetric"] = "symmetric"
    """``dcp``: ``single`` is the paper's one pass (gallery half → pool update, probe half → loss); ``symmetric`` the
    authors' code: a first pass with the halves swapped whose pool changes are rolled back, then the persistent pass;
    the loss is the sum of both (the backbone and the gallery net each see the whole batch)."""
    pool_fraction: float = _field(0.01, gt=0, le=1)
    """``dcp``: size S of the Dynamic Class Pool as a fraction of the identities, S = max(1, int(fraction × N)) (the
    code's README: 1 % or 0.1 %)."""
    gallery_momentum: float = _field(0.99, ge=0, lt=1)
    """``dcp``: m of the gallery net's EMA, θ_G ← m·θ_G + (1 − m)·θ_P once per optimizer step (the code's 0.99)."""
    hard_negatives: int = _field(0, ge=0)
    """``dcp``: k of the outlier term (mean of the k largest cosines, clipped at 0, of each probe whose identity is
    not in the pool); 0 = the code's rule min(max(int(0.0002·S), 3), 10)."""
    bank_negatives: int = _field(0, ge=0)
    """``dcp`` and ``attfc``: 0 = bank off (the authors' code); n > 0 = bank on: each identity's latest generated
    center is also written to the class bank ([bank]), and each step n ids written before are read back from it as
    extra negative columns (docs/methods.md)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LossCfg:
    """[loss]: the margin applied to the cosine logits, then softmax cross-entropy."""

    kind: Literal["arcface", "cosface", "combined", "adasin"] = "arcface"
    """Margin: ``arcface`` s·cos(θ+m), ``cosface`` s·(cosθ−m), ``combined`` s·(cos(m1·θ+m2)−m3), ``adasin``
    s·cos(θ+m) on the positive and hard negatives modulated by Φ = t + h·sin(θ/2) (docs/methods.md)."""
    s: float = _field(64.0, gt=0)
    """Logit scale."""
    arcface_m: float = 0.5
    """Additive angular margin of ``arcface`` (radians, in [0, π/2))."""
    cosface_m: float = 0.4
    """Additive cosine margin of ``cosface`` (in [0, 1))."""
    combined_m: tuple[float, float, float] = (1.0, 0.3, 0.2)
    """(m1, m2, m3) of ``combined``."""
    arcface_grad: Literal["analytic", "straight_through"] = "analytic"
    """``analytic``: true derivative of cos(θ+m); ``straight_through``: arcface_torch's (margin in the forward only)."""
    adasin_m: float = 0.5
    """``adasin``: angular margin of the positive (radians, in [0, π/2)); with ``adasin_positive = "adaptive"`` the
    margin of a row is ``adasin_m`` × 2·sin(θ/2)."""
    adasin_h: float = 0.333
    """``adasin``: weight h of the difficulty sin(θ/2) in the modulation Φ = t + h·sin(θ/2) (>= 0; not published:
    0.333 is AdaFace's h)."""
    adasin_alpha: float = 0.01
    """``adasin``: EMA rate of t, the running mean positive cosine (in (0, 1]; CurricularFace's 0.01)."""
    adasin_positive: Literal["fixed", "adaptive"] = "fixed"
    """``adasin``: positive penalty cos(θ + m) with ``fixed`` m (the default reconstruction) or ``adaptive``
    m·2·sin(θ/2), growing with the difficulty."""
    adasin_negatives: Literal["hard", "all", "none"] = "hard"
    """``adasin``: negatives modulated to cos·(Φ + cos): ``hard`` ones (cos above the penalised positive, the
    default reconstruction), ``all`` of them, or ``none`` (then adasin is ArcFace)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class TrainCfg:
    """[train]: optimisation of the backbone (and the schedule the head follows)."""

    batch_size: int = _field(128, ge=1)
    """Images per step per process."""
    epochs: int = _field(20, ge=1)
    """Passes over the training set."""
    max_steps: int = _field(0, ge=0)
    """Stop after this many steps (0: no limit besides ``epochs``)."""
    optimizer: Literal["sgd", "adamw"] = "sgd"
    """Backbone optimizer."""
    lr: float = _field(0.1, gt=0)
    """Peak learning rate."""
    momentum: float = _field(0.9, ge=0, lt=1)
    """SGD momentum of the backbone."""
    weight_decay: float = _field(5e-4, ge=0)
    """Backbone weight decay."""
    scheduler: Literal["poly", "cosine", "constant", "multistep", "mhlr"] = "poly"
    """``poly``: linear warmup then linear decay to 0 (arcface_torch); ``cosine``; ``constant``; ``multistep``: ×
    ``multistep_gamma`` at each of ``multistep_milestones``; ``mhlr``: halve when the loss plateaus (Moving Haar LR,
    the double-EMA form of its released code; docs/methods.md). Warmup comes first in every case."""
    warmup_steps: int = _field(0, ge=0)
    """Linear warmup steps from 0 to ``lr``."""
    multistep_milestones: tuple[int, ...] = ()
    """``multistep``: steps (not epochs) at which the learning rate is multiplied by ``multistep_gamma``, strictly
    increasing; epoch milestones E become E × steps per epoch."""
    multistep_gamma: float = _field(0.1, gt=0, le=1)
    """``multistep``: factor applied at each milestone."""
    mhlr_alpha: float = _field(0.001, gt=0, le=1)
    """``mhlr``: rate α of the first EMA, of the per-step loss decrease."""
    mhlr_beta: float = _field(0.001, gt=0, le=1)
    """``mhlr``: rate β of the second EMA, of the first one."""
    mhlr_threshold: float = _field(5e-5, gt=0)
    """``mhlr``: λ; a step is on a plateau while the double EMA of the loss decrease is below it."""
    mhlr_tolerance: float = _field(0.05, gt=0, le=1)
    """``mhlr``: plateau steps before a halving, as a fraction of the run's steps (at least 1 step)."""
    mhlr_factor: float = _field(2.0, gt=1)
    """``mhlr``: δ; the learning rate is divided by it at each plateau."""
    mhlr_max_decays: int = _field(8, ge=0)
    """``mhlr``: the learning rate is divided at most this many times."""
    grad_clip: float = _field(5.0, ge=0)
    """Clip the backbone gradient norm to this (0: off)."""
    cpu_threads: int = _field(0, ge=0)
    """Torch compute threads when training on the CPU; 0 = cores minus data workers (at least 1). Two compute
    threads next to two decoding workers on 2 cores ran 2.8x slower than one thread (contention)."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """``auto``: bf16 autocast on a GPU, fp32 on the CPU."""
    nonfinite: Literal["stop", "skip"] = "stop"
    """A NaN/Inf loss or gradient norm: ``stop`` the run (nothing is updated or saved from that step), or ``skip``
    the step (no update, counted as ``train/skipped_steps``) and stop after ``max_skipped_in_row`` in a row."""
    max_skipped_in_row: int = _field(5, ge=1)
    """``nonfinite = "skip"``: consecutive skipped steps that stop the run."""
    log_every: int = _field(20, ge=1)
    """Steps between metric lines."""
    checkpoint_every: int = _field(0, ge=0)
    """Steps between checkpoints (0: none by step count; ``checkpoint_every_minutes`` still applies, and the run
    always checkpoints at the end)."""
    checkpoint_every_minutes: float = _field(30.0, ge=0)
    """Wall time between checkpoints, counted from the end of the previous one (0: none by time), so a killed run
    loses at most this much training; beside ``checkpoint_every`` (docs/checkpoints.md gives a checkpoint's cost)."""
    keep_checkpoints: int = _field(2, ge=1)
    """Newest checkpoints kept on disk."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EngineCfg:
    """[engine]: what trains the backbone."""

    kind: Literal["plain", "deepspeed"] = "plain"
    """``plain``: a PyTorch optimizer in this process; ``deepspeed``: DeepSpeed, configured by ``deepspeed_config``."""
    deepspeed_config: str = "ds_configs/deepspeed/zero2_offload_cpu.json"
    """DeepSpeed JSON with DeepSpeed-only knobs (ZeRO stage, offload); batch size and clipping come from [train]."""


@dataclass(frozen=True, kw_only=True, slots=True)
class BankCfg:
    """[bank]: the class-center bank that holds every identity's rows off the device."""

    tier: Literal["ram", "nvme"] = "ram"
    """``ram``: whole bank in host memory, flushed to Zarr at checkpoints; ``nvme``: served block by block."""
    path: str = ""
    """Zarr group directory; empty means ``<run dir>/bank``."""
    chunk_rows: int = _field(0, ge=0)
    """Rows per Zarr chunk (a block); 0 picks about 2 MiB per chunk."""
    init_std: float = _field(0.01, gt=0)
    """Standard deviation of the deterministic N(0, std) initial rows."""
    seed: int = _field(0, ge=0)
    """Seed of the per-id initialiser."""
    cache_blocks: int = _field(64, ge=1)
    """nvme tier: blocks the RAM working set may hold."""
    io_threads: int = _field(0, ge=0)
    """Threads that load (read or initialise) the blocks one bank call misses, in parallel: the nvme tier's cache
    misses and the ram tier's first touch of a block. 0 = one per CPU core, the cores shared by the run's processes on
    the machine, at most 8; 1 = one at a time on the calling thread (the prefetcher's)."""
    dtype: Literal["float32", "bfloat16"] = "float32"
    """What bank rows (centers and momentum) are stored and moved in: ``bfloat16`` halves host RAM, disk and bank
    traffic; rows are updated in float32 on the device and rounded to nearest once per write-back (docs/bank.md).
    Fixed when the bank is created: opening a bank of another dtype is refused."""


@dataclass(frozen=True, kw_only=True, slots=True)
class CacheCfg:
    """[cache]: the Dynamic Class Container on the device."""

    num_slots: int = _field(0, ge=0)
    """K, rows resident on the device; 0 means all classes."""
    policy: Literal["lru", "fifo"] = "lru"
    """Eviction policy."""
    lookahead: int = _field(2, ge=1)
    """L, batches the plan looks ahead."""


@dataclass(frozen=True, kw_only=True, slots=True)
class EvalCfg:
    """[eval]: verification on held-out pairs."""

    pairs: tuple[str, ...] = ()
    """Verification packs (InsightFace ``.bin``); empty means ``<data.path>/pairs.bin``."""
    flip: bool = True
    """Flip test: sum the embeddings of an image and its mirror."""
    batch_size: int = _field(256, ge=1)
    """Images per forward pass."""
    at_end: bool = True
    """Evaluate when training ends."""
    ijb: str = ""
    """IJB-B / IJB-C root (``meta/``, ``loose_crop/``; docs/ijb.md) for 1:1 template verification after the packs;
    empty: none."""
    ijb_protocol: Literal["IJBC", "IJBB"] = "IJBC"
    """Which protocol's meta files (``ijbc_*`` or ``ijbb_*``) to evaluate."""
    ijb_detector_score: bool = True
    """IJB: weight each image's feature by its detector score (the reference's default)."""
    ijb_media_pooling: bool = True
    """IJB: average the images of one media (video frames) before summing a template's media (the reference's)."""
    ijb_normalize_images: bool = False
    """IJB: L2-normalise each image's feature before pooling (the reference keeps its norm)."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Config:
    """A whole run: one section per component."""

    run: RunCfg = field(default_factory=RunCfg)
    data: DataCfg = field(default_factory=DataCfg)
    synth: SynthCfg = field(default_factory=SynthCfg)
    model: ModelCfg = field(default_factory=ModelCfg)
    head: HeadCfg = field(default_factory=HeadCfg)
    loss: LossCfg = field(default_factory=LossCfg)
    train: TrainCfg = field(default_factory=TrainCfg)
    engine: EngineCfg = field(default_factory=EngineCfg)
    bank: BankCfg = field(default_factory=BankCfg)
    cache: CacheCfg = field(default_factory=CacheCfg)
    eval: EvalCfg = field(default_factory=EvalCfg)
    head_defaults: tuple[str, ...] = field(default=(), compare=False, metadata={"section": False})
    """Not a section: the ``section.name`` keys whose value the head chose (its defaults and ``data.sampler =
    "auto"``; :mod:`offloadfr.config.head_defaults`) because the run file and ``--set`` left them unset."""


def section_names() -> tuple[str, ...]:
    """The sections of :class:`Config`, in order (its fields but ``head_defaults``)."""
    return tuple(f.name for f in dataclasses.fields(Config) if f.metadata.get("section", True))

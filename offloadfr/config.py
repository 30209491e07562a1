"""Typed run configuration: one frozen dataclass per component, loaded from TOML with dotted overrides.

A run config file (``ds_configs/runs/*.toml``) lists only what differs from the defaults below (STYLE R5)::

    [run]
    name = "synth_tiny"

    [train]
    batch_size = 128

Overrides use the same dotted keys: ``--set train.batch_size=64 --set run.name=try2``. Every key, type and range is
checked; a mistake raises :class:`~offloadfr.errors.ConfigError` with one line naming the key, the bad value and
what is allowed. The resolved config is saved with every run and checkpoint (``to_toml``) and can be read back
(``config_from_dict``). Each component takes only its own section (``ZarrBank.open(cfg.bank)``, never the whole
``Config``; STYLE R4).
"""

from __future__ import annotations

import dataclasses
import difflib
import tomllib
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import tomli_w

from offloadfr.errors import ConfigError

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
    "load_config",
    "check_synth",
    "apply_overrides",
    "config_from_dict",
    "config_to_dict",
    "to_toml",
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
    sampler: Literal["instance", "identity", "attention", "dual", "block"] = "instance"
    """How samples form batches (docs/data.md): ``instance`` uniform images, streamed shard by shard; ``identity``
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
    num_anchors: int = _field(1000, ge=2)
    """``vfc``: M, the anchors (rows) of the virtual FC; identity ``i`` belongs to group ``i mod M``. The Virtual FC
    code uses 1000. A batch can hold at most M distinct identities; identities beyond that are ignored."""
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
    """Steps between checkpoints (0: only at the end)."""
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


# --------------------------------------------------------------------------------------------------------------------
# loading and checking


def _suggest(name: str, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(name, known, n=1)
    return f"did you mean {prefix + close[0]!r}? " if close else ""


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return f"a list of {_describe(args[0])}"
        return f"a list of {len(args)} values ({', '.join(_describe(a) for a in args)})"
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(tp, str(tp))


def _coerce(key: str, value: Any, tp: Any) -> Any:
    """Returns ``value`` converted to ``tp`` or raises ConfigError naming ``key``."""
    origin = typing.get_origin(tp)
    bad = ConfigError(f"{key} = {value!r} has the wrong type: expected {_describe(tp)}")
    if origin is Literal:
        if value not in typing.get_args(tp) or isinstance(value, bool) != isinstance(typing.get_args(tp)[0], bool):
            raise ConfigError(f"{key} = {value!r} is not allowed: expected {_describe(tp)}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise bad
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(key, v, args[0]) for v in value)
        if len(value) != len(args):
            raise bad
        return tuple(_coerce(key, v, a) for v, a in zip(value, args, strict=True))
    if tp is bool:
        if not isinstance(value, bool):
            raise bad
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise bad
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise bad
        return value
    raise AssertionError(f"{key}: unsupported config type {tp}")


def _check_range(key: str, value: Any, bounds: typing.Mapping[str, float]) -> None:
    checks = {"ge": (lambda v, b: v >= b, ">="), "gt": (lambda v, b: v > b, ">"),
              "le": (lambda v, b: v <= b, "<="), "lt": (lambda v, b: v < b, "<")}
    for name, bound in bounds.items():
        ok, sym = checks[name]
        if not ok(value, bound):
            allowed = " and ".join(f"{checks[n][1]} {b}" for n, b in bounds.items())
            raise ConfigError(f"{key} = {value!r} is out of range: must be {allowed}")


def _build_section(cls: type, section: str, values: dict[str, Any]) -> Any:
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in values.items():
        key = f"{section}.{name}"
        if name not in fields:
            known = list(fields)
            raise ConfigError(f"unknown config key {key!r}; {_suggest(name, known, section + '.')}keys in [{section}]: "
                              + ", ".join(known))
        coerced = _coerce(key, value, hints[name])
        _check_range(key, coerced, fields[name].metadata)
        kwargs[name] = coerced
    return cls(**kwargs)


def config_from_dict(data: dict[str, Any]) -> Config:
    """Builds a :class:`Config` from nested ``{section: {key: value}}``, checking every key, type and range.

    Raises:
        ConfigError: an unknown section or key, a wrong type, or a value out of range.
    """
    sections = {f.name: f for f in dataclasses.fields(Config)}
    hints = typing.get_type_hints(Config)
    built = {}
    for section, values in data.items():
        if section not in sections:
            raise ConfigError(f"unknown config section [{section}]; {_suggest(section, list(sections))}"
                              f"sections: {', '.join(sections)}")
        if not isinstance(values, dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {values!r}")
        built[section] = _build_section(hints[section], section, values)
    cfg = Config(**built)
    _check_cross_fields(cfg)
    return cfg


def _check_cross_fields(cfg: Config) -> None:
    check_synth(cfg.synth)
    _check_milestones(cfg.train)
    if (cfg.head.kind == "attfc") != (cfg.data.sampler == "attention"):
        raise ConfigError(f"head.kind = {cfg.head.kind!r} with data.sampler = {cfg.data.sampler!r}: the attfc head "
                          "and the attention sampler (query + key images) go together; set both or neither")
    if (cfg.head.kernel, cfg.head.gemm_precision) != ("torch", "fp32") and cfg.head.kind not in ("fc", "partial_fc"):
        raise ConfigError(f"head.kernel = {cfg.head.kernel!r}, head.gemm_precision = {cfg.head.gemm_precision!r} with "
                          f"head.kind = {cfg.head.kind!r}: only fc and partial_fc have these options; set them to "
                          "'torch' and 'fp32'")
    if cfg.head.kernel == "triton" and cfg.loss.kind == "adasin":
        raise ConfigError("head.kernel = 'triton' with loss.kind = 'adasin': the fused kernel changes only the "
                          "positive column and adasin changes hard negatives too; set head.kernel = 'torch'")
    if cfg.head.kind == "dcp" and (cfg.data.sampler != "dual" or cfg.data.images_per_identity < 2):
        raise ConfigError(f"head.kind = 'dcp' with data.sampler = {cfg.data.sampler!r} and data.images_per_identity = "
                          f"{cfg.data.images_per_identity}: the dcp head needs identity pairs, set data.sampler = "
                          "'dual' and data.images_per_identity >= 2")


def _check_milestones(t: TrainCfg) -> None:
    ms = t.multistep_milestones
    if any(m < 1 for m in ms) or any(b <= a for a, b in zip(ms, ms[1:], strict=False)):
        raise ConfigError(f"train.multistep_milestones = {list(ms)} must be strictly increasing steps >= 1, "
                          "e.g. [3000, 4000]")
    if t.scheduler == "multistep" and not ms:
        raise ConfigError("train.multistep_milestones = [] but train.scheduler = 'multistep' needs at least one "
                          "milestone step, e.g. --set train.multistep_milestones=[3000,4000]")


def check_synth(s: SynthCfg) -> None:
    """Checks what the per-field ranges cannot: ``min_images <= mean_images <= max_images``.

    Raises:
        ConfigError: naming the keys and values that disagree.
    """
    if s.min_images > s.max_images:
        raise ConfigError(f"synth.min_images = {s.min_images} exceeds synth.max_images = {s.max_images}; "
                          "lower min_images or raise max_images")
    if not s.min_images <= s.mean_images <= s.max_images:
        raise ConfigError(f"synth.mean_images = {s.mean_images} must lie between synth.min_images = {s.min_images} "
                          f"and synth.max_images = {s.max_images}")


def config_to_dict(cfg: Config) -> dict[str, dict[str, Any]]:
    """The nested ``{section: {key: value}}`` form of ``cfg`` (tuples become lists), the inverse of
    :func:`config_from_dict`."""

    def plain(v: Any) -> Any:
        return list(v) if isinstance(v, tuple) else v

    return {f.name: {k.name: plain(getattr(getattr(cfg, f.name), k.name))
                     for k in dataclasses.fields(getattr(cfg, f.name))}
            for f in dataclasses.fields(cfg)}


def to_toml(cfg: Config) -> str:
    """The fully resolved config as TOML text (what ``--print-config`` prints and every run saves)."""
    return tomli_w.dumps(config_to_dict(cfg))


def _parse_value(text: str) -> Any:
    """A TOML value (``64``, ``0.1``, ``true``, ``"x"``, ``[1, 2]``), or the raw text when it is not valid TOML."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Returns a copy of nested ``data`` with ``section.key=value`` overrides applied.

    Raises:
        ConfigError: an override is not of the form ``section.key=value``.
    """
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in data.items()}
    for item in overrides:
        key, sep, text = item.partition("=")
        section, dot, name = key.strip().partition(".")
        if not sep or not dot or not section or not name or "." in name:
            raise ConfigError(f"--set {item!r} is malformed: write section.key=value, e.g. --set train.batch_size=64")
        out.setdefault(section, {})
        if not isinstance(out[section], dict):
            raise ConfigError(f"[{section}] must be a table of keys, got {out[section]!r}")
        out[section][name] = _parse_value(text.strip())
    return out


def _read_run_file(path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """The nested dict of a run TOML, with the file named by its top-level ``inherit`` key merged underneath."""
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist; pass a file from ds_configs/runs/")
    if path.resolve() in seen:
        raise ConfigError(f"config file {str(path)!r} inherits from itself through {[str(p) for p in seen]}")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {str(path)!r} is not valid TOML: {e}") from None
    parent = data.pop("inherit", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"inherit = {parent!r} in {str(path)!r} must be a file name, e.g. \"synth_tiny.toml\"")
    merged = _read_run_file(path.parent / parent, (*seen, path.resolve()))
    for section, values in data.items():
        if isinstance(values, dict) and isinstance(merged.get(section), dict):
            merged[section] = {**merged[section], **values}
        else:
            merged[section] = values
    return merged


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    """Loads a run config: defaults, then the TOML file at ``path`` (if any), then ``overrides``.

    A run file may start with ``inherit = "other.toml"`` (a path relative to it): the other file is loaded first and
    this one's keys override it, so a variant of a run lists only what it changes.

    Args:
        path: a run TOML such as ``ds_configs/runs/synth_tiny.toml``; None for the defaults alone.
        overrides: ``section.key=value`` strings, applied in order after the file.

    Returns:
        The checked, frozen :class:`Config`.

    Raises:
        ConfigError: the file is missing or not valid TOML, or any key, type or range is wrong.

    Example::

        cfg = load_config("ds_configs/runs/synth_tiny.toml", ["train.batch_size=64"])
    """
    data = _read_run_file(Path(path)) if path is not None else {}
    return config_from_dict(apply_overrides(data, overrides or []))

"""The ``offloadfr`` command: ``synth``, ``convert``, ``train``, ``eval``, ``plot``, ``export``, ``embed``, ``inspect``.

Any :class:`~offloadfr.errors.OffloadFRError` (a bad config key, a missing dataset, ...) ends the command with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

__all__ = ["main"]

_DEFAULT_RUN = "ds_configs/runs/synth_tiny.toml"


def _default_config() -> str | None:
    """The default run config, found relative to the working directory or to this checkout."""
    for root in (Path.cwd(), Path(__file__).resolve().parent.parent):
        if (root / _DEFAULT_RUN).is_file():
            return str(root / _DEFAULT_RUN)
    return None


def _cmd_train(args: argparse.Namespace) -> int:
    from offloadfr.config import load_config, to_toml

    cfg = load_config(args.config if args.config else _default_config(), args.set)
    if args.print_config:
        print(to_toml(cfg), end="")
        return 0
    from offloadfr.train.trainer import train

    result = train(cfg, resume=args.resume)
    if result.stopped or result.rank != 0:  # one summary per run, from rank 0
        return 0
    summary = f"run {cfg.run.name}: {result.steps} steps, {result.images_per_second:.0f} img/s, " \
              f"final loss {result.final_loss:.3f}"
    if result.eval is not None:
        ev = result.eval if "packs" not in result.eval else result.eval["packs"][0]
        tar = ", ".join(f"TAR@FAR={k} {v:.3f}" for k, v in ev["tar_at_far"].items())
        summary += f"\n  verification accuracy {ev['accuracy']:.4f} ± {ev['accuracy_std']:.4f} " \
                   f"(threshold {ev['threshold']:.3f}); {tar}"
        for row in result.eval.get("packs", [])[1:]:
            if "protocol" in row:  # eval.ijb
                summary += f"\n  {row['protocol']}: " + ", ".join(f"TAR@FAR={k} {v:.4f}"
                                                                  for k, v in row["tar_at_far"].items())
    elif cfg.eval.at_end:
        summary += "\n  not evaluated: no verification pack (set eval.pairs)"
    tb = ", tensorboard/" if (result.run_dir / "tensorboard").is_dir() else ""
    ev_file = ", eval.json" if result.eval is not None else ""
    summary += f"\n  outputs: {result.run_dir}/ (config.toml, metrics.jsonl{tb}{ev_file}, checkpoints/)"
    summary += f"\n  next: offloadfr plot {result.run_dir}; offloadfr inspect run {result.run_dir}"
    print(summary)
    return 0


def _cmd_synth(args: argparse.Namespace) -> int:
    import dataclasses
    import time

    from offloadfr.config import SynthCfg, config_from_dict
    from offloadfr.data.synth import generate_synthetic

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(SynthCfg) if getattr(args, f.name) is not None}
    cfg = config_from_dict({"synth": given}).synth  # checks types and ranges like any config
    _check_outputs(("--out", args.out), directory=True)
    t0 = time.perf_counter()
    index = generate_synthetic(Path(args.out), cfg, progress=not args.quiet)
    print(f"wrote {index.num_classes} identities, {index.num_samples} images and {cfg.num_pairs} verification pairs "
          f"to {args.out} in {time.perf_counter() - t0:.1f}s")
    return 0


def _cmd_eval(args: argparse.Namespace) -> int:
    import torch

    from offloadfr.models import build_backbone
    from offloadfr.train.checkpoint import load_checkpoint, load_checkpoint_config
    from offloadfr.train.trainer import evaluate_run

    ijb_options = (args.protocol, args.flip, args.detector_score, args.media_pooling, args.normalize_images)
    if not args.ijb and any(v is not None for v in ijb_options):
        from offloadfr.errors import ConfigError

        raise ConfigError("--protocol, --[no-]flip, --[no-]detector-score, --[no-]media-pooling and "
                          "--[no-]normalize-images choose how --ijb evaluates; add --ijb ROOT")
    cfg = load_checkpoint_config(args.checkpoint)
    state, ckpt_dir = load_checkpoint(args.checkpoint)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size,
                           image_size=cfg.model.image_size)
    model.load_state_dict(state["engine"]["model"])
    model.to(device)
    pairs = args.pairs or list(cfg.eval.pairs) or [str(Path(cfg.data.path) / "pairs.bin")]
    if args.ijb:  # IJB-B/C instead of the packs (unless --pairs is given too), with the run's [eval] choices
        import dataclasses

        given = {"ijb": args.ijb, "ijb_protocol": args.protocol, "flip": args.flip,
                 "ijb_detector_score": args.detector_score, "ijb_media_pooling": args.media_pooling,
                 "ijb_normalize_images": args.normalize_images}
        cfg = dataclasses.replace(cfg, eval=dataclasses.replace(
            cfg.eval, **{k: v for k, v in given.items() if v is not None}))
        pairs = args.pairs or []
    run_dir = ckpt_dir.parent.parent
    out = evaluate_run(model, cfg, pairs, run_dir, step=state.get("step"))
    for row in out.get("packs", [out]):
        print(json.dumps({k: v for k, v in row.items() if k != "roc"}))  # the ROC points stay in eval.json
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    from offloadfr.tools.plot import plot_run

    result = plot_run(args.run_dir)
    for path in result.written:
        print(path)
    for name, why in result.skipped.items():
        print(f"offloadfr: skipped {name}: {why}", file=sys.stderr)
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from offloadfr.errors import ConfigError
    from offloadfr.tools.backbone import load_backbone
    from offloadfr.tools.export import export_onnx, export_state_dict, export_torchscript

    if not (args.onnx or args.torchscript or args.state_dict):
        raise ConfigError("nothing to export; give --onnx OUT.onnx, --torchscript OUT.pt and/or --state-dict OUT.pt")
    _check_outputs(("--onnx", args.onnx), ("--torchscript", args.torchscript), ("--state-dict", args.state_dict))
    model, cfg, ckpt_dir = load_backbone(args.checkpoint)
    print(f"exporting the backbone of {ckpt_dir}")
    m = cfg.model
    what = f"{m.backbone}, input (B, 3, {m.image_size}, {m.image_size}) in [-1, 1], output (B, {m.embedding_size})"
    if args.onnx:
        diff = export_onnx(model, args.onnx, image_size=m.image_size)
        print(f"wrote {args.onnx} ({what}; ONNX Runtime matches PyTorch to {diff:.1e})")
    if args.torchscript:
        diff = export_torchscript(model, args.torchscript, image_size=m.image_size)
        print(f"wrote {args.torchscript} (TorchScript, {what}; matches eager to {diff:.1e})")
    if args.state_dict:
        export_state_dict(model, args.state_dict)
        print(f"wrote {args.state_dict} (state dict; load into build_backbone({m.backbone!r}, "
              f"embedding_size={m.embedding_size}, image_size={m.image_size}))")
    return 0


def _cmd_embed(args: argparse.Namespace) -> int:
    from offloadfr.tools.backbone import load_backbone
    from offloadfr.tools.embed import embed_files

    _check_outputs(("--out", args.out))
    model, cfg, _ = load_backbone(args.checkpoint)
    emb = embed_files(model, args.images, image_size=cfg.model.image_size, batch_size=args.batch_size,
                      flip=args.flip)
    if args.out:
        import numpy as np

        np.save(args.out, emb)
        print(f"wrote {args.out}: {emb.shape[0]} x {emb.shape[1]} float32, L2-normalised, rows in argument order")
        return 0
    for path, row in zip(args.images, emb, strict=True):
        print(json.dumps({"path": path, "embedding": [round(float(v), 6) for v in row]}))
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from offloadfr.tools.inspect import inspect_bank, inspect_run, render

    info = inspect_bank(args.path) if args.what == "bank" else inspect_run(args.path)
    print(json.dumps(info, indent=2) if args.json else render(info))
    return 0


def _cmd_convert(args: argparse.Namespace) -> int:
    import time

    from offloadfr.data.convert_folder import convert_folder
    from offloadfr.data.convert_rec import convert_rec

    _check_outputs(("OUT", args.out), directory=True)
    common = {"samples_per_shard": args.samples_per_shard, "seed": args.seed, "check": args.check,
              "num_workers": args.workers, "progress": not args.quiet}
    t0 = time.perf_counter()
    if args.format == "folder":
        align = _align_options(args)
        summary = convert_folder(args.root, args.out, image_size=None if align else args.image_size, align=align,
                                 **common)
    else:
        summary = convert_rec(args.path, args.out, layout=args.layout, label_dtype=args.label_dtype, **common)
    print(f"{summary} in {time.perf_counter() - t0:.1f}s")
    return 0


def _align_options(args: argparse.Namespace):  # type: ignore[no-untyped-def]
    """The alignment options of ``--align`` (None without it); ``--face``/``--min-score`` need ``--align``."""
    from offloadfr.data.convert_align import AlignOptions
    from offloadfr.errors import ConfigError

    if not args.align:
        if args.face is not None or args.min_score is not None:
            raise ConfigError("--face and --min-score choose how --align aligns faces; add --align")
        return None
    return AlignOptions(image_size=args.image_size or 112, face=args.face or "largest",
                        min_score=0.5 if args.min_score is None else args.min_score)


def _cmd_pairs(args: argparse.Namespace) -> int:
    import time

    from offloadfr.data.make_pairs import make_pairs
    from offloadfr.errors import ConfigError

    if args.image_size is not None and not args.align:
        raise ConfigError("--image-size sets the side of the aligned crop; add --align (without it the images are "
                          "copied as they are)")
    _check_outputs(("OUT", args.out))
    t0 = time.perf_counter()
    summary = make_pairs(args.root, args.out, pairs_txt=args.pairs_txt, num_pairs=args.num_pairs,
                         num_folds=args.num_folds, seed=args.seed, align=_align_options(args),
                         num_workers=args.workers, progress=not args.quiet)
    print(f"{summary} in {time.perf_counter() - t0:.1f}s")
    return 0


def _add_align_options(q: argparse.ArgumentParser, what: str) -> None:
    q.add_argument("--align", action="store_true", help=f"detect each face and align it onto ArcFace's 112x112 "
                   f"five-point template ({what}; needs pip install 'offloadfr[align]')")
    q.add_argument("--face", choices=["largest", "center"],
                   help="with --align, which face of a photo with several: largest (default) or the one nearest "
                        "the centre (LFW-style photos)")
    q.add_argument("--min-score", dest="min_score", type=float,
                   help="with --align, the detector's confidence threshold (default 0.5)")


def _check_outputs(*named: tuple[str, str | None], directory: bool = False) -> None:
    """Refuses, before any work, an output path (``(option, path)``; None: not given) that cannot be written: one
    line and exit code 2 (``OutputPathError``) instead of a traceback at the end."""
    from offloadfr.train.preflight import check_output

    for option, path in named:
        if path:
            check_output(path, option, directory=directory)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="offloadfr", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a run config (default: ds_configs/runs/synth_tiny.toml)")
    p.add_argument("--config", help="run TOML (ds_configs/runs/*.toml)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override one config value; repeatable")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="auto|CKPT",
                   help="continue from the newest checkpoint of the run (auto) or from the checkpoint CKPT")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("synth", help="write the synthetic face dataset (shards, index.json, pairs.bin)")
    p.add_argument("--out", required=True, help="dataset directory to create")
    p.add_argument("--num-identities", dest="num_identities", type=int)
    p.add_argument("--num-holdout", dest="num_holdout", type=int)
    p.add_argument("--image-size", dest="image_size", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--min-images", dest="min_images", type=int)
    p.add_argument("--max-images", dest="max_images", type=int)
    p.add_argument("--mean-images", dest="mean_images", type=float)
    p.add_argument("--num-pairs", dest="num_pairs", type=int)
    p.add_argument("--samples-per-shard", dest="samples_per_shard", type=int)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_synth)

    p = sub.add_parser("eval", help="verification of a checkpoint on .bin pair packs or IJB-B/IJB-C templates")
    p.add_argument("--checkpoint", required=True, help="runs/<name>/checkpoints/step_N, or a run directory")
    p.add_argument("--pairs", nargs="+", help="verification packs (default: the run's eval.pairs or pairs.bin)")
    p.add_argument("--ijb", metavar="ROOT", help="IJB root (meta/, loose_crop/; docs/ijb.md): 1:1 template "
                   "verification, TAR@FAR 1e-6..1e-1 (with --pairs: after the packs)")
    p.add_argument("--protocol", choices=["IJBC", "IJBB"], help="IJB meta files to use (default: eval.ijb_protocol)")
    for flag, what in (("flip", "flip test"), ("detector-score", "weight images by detector score"),
                       ("media-pooling", "average each media's images first"),
                       ("normalize-images", "L2-normalise image features before pooling")):
        p.add_argument(f"--{flag}", action=argparse.BooleanOptionalAction, help=f"IJB: {what} (default: the run's "
                       "[eval] value)")
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("plot", help="PNGs of a run (loss, lr, throughput, prefetch stall, ROC) in RUN_DIR/plots/")
    p.add_argument("run_dir", metavar="RUN_DIR", help="runs/<name>")
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser("export", help="export the backbone of a checkpoint (ONNX, TorchScript, state dict)")
    p.add_argument("checkpoint", metavar="CKPT", help="runs/<name>/checkpoints/step_N, or a run directory (newest)")
    p.add_argument("--onnx", metavar="OUT.onnx", help="ONNX, dynamic batch, checked against PyTorch (atol 1e-4)")
    p.add_argument("--torchscript", metavar="OUT.pt", help="traced TorchScript module (torch.jit.load)")
    p.add_argument("--state-dict", dest="state_dict", metavar="OUT.pt", help="the backbone's state_dict (torch.load)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("embed", help="L2-normalised embeddings of image files (JSON lines, or .npy with --out)")
    p.add_argument("checkpoint", metavar="CKPT", help="runs/<name>/checkpoints/step_N, or a run directory (newest)")
    p.add_argument("images", metavar="IMAGES", nargs="+", help="aligned face crops (JPEG, PNG)")
    p.add_argument("--out", metavar="OUT.npy", help="save an (N, D) float32 array instead of printing")
    p.add_argument("--flip", action="store_true", help="add the mirrored image's embedding (evaluation's flip test)")
    p.add_argument("--batch-size", dest="batch_size", type=int, default=64, help="images per forward pass")
    p.set_defaults(func=_cmd_embed)

    sub.add_parser("bench", help="the benchmarks, the same as python launch/bench.py (offloadfr bench --help)")

    p = sub.add_parser("inspect", help="what is in a bank or a run directory")
    p.add_argument("what", choices=["bank", "run"], help="bank: a Zarr class-center bank; run: runs/<name>")
    p.add_argument("path", metavar="PATH", help="the bank directory or the run directory")
    p.add_argument("--json", action="store_true", help="print JSON instead of text")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser("convert", help="convert an image folder or an InsightFace RecordIO pack to shards")
    formats = p.add_subparsers(dest="format", required=True)
    sources = {"folder": ("root", "ROOT/<identity>/*.jpg|jpeg|png: one sub-folder of images per identity"),
               "rec": ("path", "InsightFace pack: its directory (train.rec, train.idx, property) or its .rec")}
    for name, (dest, what) in sources.items():
        q = formats.add_parser(name, help=what)
        q.add_argument(dest, metavar=dest.upper(), help=what)
        q.add_argument("out", metavar="OUT", help="dataset directory to create (or an interrupted one to resume)")
        q.add_argument("--samples-per-shard", dest="samples_per_shard", type=int, default=2000,
                       help="target images per shard (shards hold whole identities)")
        q.add_argument("--seed", type=int, default=0, help="seed of the identity order")
        q.add_argument("--check", choices=["decode", "header"], default="decode",
                       help="decode: full decode catches truncated images (default); header: magic bytes only")
        q.add_argument("--workers", type=int, default=0, help="processes writing shards in parallel")
        q.add_argument("--quiet", action="store_true", help="no progress bar")
        if name == "folder":
            q.add_argument("--image-size", dest="image_size", type=int,
                           help="with --align: side of the aligned crop (default 112); without: image_size "
                                "recorded in index.json (default: side of the first image)")
            _add_align_options(q, "images without a face are skipped and listed in OUT/align_report.json")
        else:
            q.add_argument("--layout", choices=["auto", "ranges", "labels"], default="auto",
                           help="ranges: header record 0 + identity ranges (MS1M, Glint360K); labels: one label "
                                "per record; auto: detect")
            q.add_argument("--label-dtype", dest="label_dtype", choices=["float32", "float64"], default="float32",
                           help="float type of the record labels (float64 for IdQQ packs)")
        q.set_defaults(func=_cmd_convert)

    p = sub.add_parser("pairs", help="a verification pack (.bin, as eval reads) from an image folder: LFW-style "
                       "pairs.txt or balanced random pairs in 10 folds")
    p.add_argument("root", metavar="ROOT", help="ROOT/<identity>/*.jpg|jpeg|png: one sub-folder per identity")
    p.add_argument("out", metavar="OUT", help="the pack to write, e.g. lfw.bin (its report: OUT with .json)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--pairs-txt", dest="pairs_txt", metavar="PAIRS.txt",
                     help="LFW-style pairs: 'name i j' (same) / 'name1 i name2 j' (different) lines, i from 1")
    how.add_argument("--num-pairs", dest="num_pairs", type=int, metavar="N",
                     help="N balanced random pairs: per fold N/(2*folds) same, then as many different")
    p.add_argument("--num-folds", dest="num_folds", type=int, default=10,
                   help="folds of the random pairs, over disjoint identities (default 10, as eval uses)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random pairs")
    p.add_argument("--image-size", dest="image_size", type=int, help="with --align: side of the crop (default 112)")
    _add_align_options(p, "a pair with an image without a face is dropped (pairs.txt) or drawn again (random)")
    p.add_argument("--workers", type=int, default=0, help="processes preparing images in parallel")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_cmd_pairs)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Runs the ``offloadfr`` command line; returns the exit code (2 for bad input)."""
    from offloadfr.errors import OffloadFRError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:  # the benchmarks parse their own options (offloadfr/bench/cli.py)
        from offloadfr.bench.cli import main as bench_main

        return bench_main(argv[1:])
    args = _build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except OffloadFRError as e:
        print(f"offloadfr: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("offloadfr: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

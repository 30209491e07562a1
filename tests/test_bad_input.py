"""The bad-input catalogue (docs/troubleshooting.md): each wrong input ends the command with exit code 2 and one
line on stderr naming the problem, never a traceback. Each case would catch an error path regressing into a crash
deep in a run (or into silent acceptance)."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from offloadfr.cli import main

REPO = Path(__file__).resolve().parent.parent
TINY = ["synth.num_identities=16", "synth.num_holdout=6", "synth.num_pairs=20", "synth.min_images=3",
        "synth.max_images=8", "synth.mean_images=5.0", "synth.samples_per_shard=30", "data.num_workers=0",
        "train.batch_size=8", "train.epochs=1", "eval.at_end=false"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny dataset and one finished run (run.name=ok) shared by the cases."""
    root = tmp_path_factory.mktemp("bad")
    assert main(["train", *_sets(root, "ok")]) == 0
    return root


def _sets(root: Path, name: str, *extra: str) -> list[str]:
    out = []
    for kv in [f"data.path={root / 'data'}", f"run.output_dir={root / 'runs'}", f"run.name={name}", *TINY, *extra]:
        out += ["--set", kv]
    return out


def _copy_data(root: Path, dest: str) -> Path:
    target = root / dest
    if not target.exists():
        shutil.copytree(root / "data", target)
    return target


def _drop_shard(root: Path) -> list[str]:
    d = _copy_data(root, "no_shard")
    next((d / "shards").glob("*.tar")).unlink()
    return ["train", *_sets(root, "x", f"data.path={d}", "data.generate_if_missing=false")]


def _empty_shard(root: Path) -> list[str]:
    d = _copy_data(root, "empty_shard")
    next((d / "shards").glob("*.tar")).write_bytes(b"")
    return ["train", *_sets(root, "x", f"data.path={d}", "data.generate_if_missing=false")]


def _index_without_samples(root: Path) -> list[str]:
    d = _copy_data(root, "no_samples")
    index = json.loads((d / "index.json").read_text())
    for shard in index["shards"]:
        shard.update(ids=[], counts=[], num_samples=0)
    index["num_samples"] = 0
    (d / "index.json").write_text(json.dumps(index))
    return ["train", *_sets(root, "x", f"data.path={d}", "data.generate_if_missing=false")]


def _shrink_classes(root: Path) -> list[str]:
    d = _copy_data(root, "few_classes")
    index = json.loads((d / "index.json").read_text())
    index["num_classes"] = 4
    (d / "index.json").write_text(json.dumps(index))
    return ["train", *_sets(root, "x", f"data.path={d}", "data.generate_if_missing=false")]


def _bank_of_other_dim(root: Path) -> list[str]:
    bank = root / "bank_dim"
    assert main(["train", *_sets(root, "b1", "head.kind=partial_fc", f"bank.path={bank}")]) == 0
    return ["train", *_sets(root, "b2", "head.kind=partial_fc", f"bank.path={bank}", "model.embedding_size=64")]


def _bank_of_other_kind(root: Path) -> list[str]:
    from offloadfr.bank import ZarrBank

    bank = root / "bank_kind"
    ZarrBank.create(bank, num_classes=16, dim=128, arrays=("centers", "momentum"), head_kind="attfc").close()
    return ["train", *_sets(root, "b3", "head.kind=partial_fc", f"bank.path={bank}")]


def _bad_toml(root: Path) -> list[str]:
    (root / "bad.toml").write_text("[train\nbatch_size = 3\n")
    return ["train", "--config", str(root / "bad.toml")]


def _empty_dir(root: Path) -> list[str]:
    (root / "empty").mkdir(exist_ok=True)
    return ["train", *_sets(root, "x", f"data.path={root / 'empty'}", "data.generate_if_missing=false")]


def _other_backbone_resume(root: Path) -> list[str]:
    return ["train", "--resume", "auto", *_sets(root, "ok", "model.embedding_size=64")]


def _convert_missing(root: Path) -> list[str]:
    return ["convert", "folder", str(root / "nope"), str(root / "conv_out")]


def _eval_missing_pairs(root: Path) -> list[str]:
    return ["eval", "--checkpoint", str(root / "runs" / "ok"), "--pairs", str(root / "nope.bin")]


def _a_file(root: Path) -> Path:
    """A regular file: a path under it can never be created (portable, unlike permissions, which root ignores)."""
    f = root / "a_file"
    f.write_text("not a directory\n")
    return f


def _truncated_pack(root: Path) -> list[str]:
    pack = root / "truncated.bin"
    pack.write_bytes((root / "data" / "pairs.bin").read_bytes()[:500])
    return ["train", *_sets(root, "x", "eval.at_end=true", f"eval.pairs=['{pack}']")]


def _broken_checkpoint(root: Path, dest: str, damage: Callable[[Path], None]) -> list[str]:
    ckpt = root / dest / "step_00000010"
    if not ckpt.exists():
        shutil.copytree(root / "runs" / "ok" / "checkpoints" / "step_00000010", ckpt)
        damage(ckpt)
    return ["train", "--resume", str(ckpt), *_sets(root, "x")]


def _bad_ds_json(root: Path) -> list[str]:
    (root / "bad_ds.json").write_text('{"zero_optimization": {"stage": 2},}')
    return ["train", *_sets(root, "x", "engine.kind=deepspeed", f"engine.deepspeed_config={root / 'bad_ds.json'}")]


def _ijb(root: Path, dest: str, damage: Callable[[Path], None]) -> list[str]:
    """`offloadfr eval --ijb` of the run "ok" on a tiny IJB-C layout (tests/_ijb_fixture.py) damaged by ``damage``."""
    from tests._ijb_fixture import build_ijb_fixture

    ijb = root / dest
    if not ijb.exists():
        build_ijb_fixture(ijb, num_identities=3, templates_per_identity=2)
        damage(ijb)
    return ["eval", "--checkpoint", str(root / "runs" / "ok"), "--ijb", str(ijb), "--protocol", "IJBC"]


def _drop_field(ijb: Path) -> None:
    path = ijb / "meta" / "ijbc_name_5pts_score.txt"
    lines = path.read_text().splitlines()
    lines[1] = " ".join(lines[1].split()[:-1])  # the detector score missing
    path.write_text("\n".join(lines) + "\n")


def _image_folder(root: Path) -> Path:
    """``root/faces/<Name>/<Name>_000i.jpg``: two identities of two tiny images (LFW naming)."""
    from PIL import Image

    folder = root / "faces"
    if not folder.exists():
        for k, name in enumerate(("Ann", "Bob")):
            (folder / name).mkdir(parents=True)
            for i in (1, 2):
                Image.new("RGB", (8, 8), (60 * k, 40 * i, 0)).save(folder / name / f"{name}_{i:04d}.jpg")
    return folder


def _pairs_txt(root: Path, dest: str, text: str) -> list[str]:
    """`offloadfr pairs` of the tiny image folder with the pairs file ``text``."""
    (root / dest).write_text(text)
    return ["pairs", str(_image_folder(root)), str(root / f"{dest}.bin"), "--pairs-txt", str(root / dest)]


Case = tuple[str, Callable[[Path], list[str]], str]
CASES: list[Case] = [
    ("unknown key", lambda r: ["train", "--set", "train.batchsize=3"], "unknown config key 'train.batchsize'"),
    ("unknown section", lambda r: ["train", "--set", "optim.lr=3"], "unknown config section [optim]"),
    ("wrong type", lambda r: ["train", "--set", "train.batch_size=abc"], "has the wrong type"),
    ("negative size", lambda r: ["train", "--set", "train.batch_size=-1"], "train.batch_size = -1 is out of range"),
    ("zero epochs", lambda r: ["train", "--set", "train.epochs=0"], "train.epochs = 0 is out of range"),
    ("bad choice", lambda r: ["train", "--set", "loss.kind=sphereface"], "loss.kind = 'sphereface' is not allowed"),
    ("malformed --set", lambda r: ["train", "--set", "trainlr=1"], "is malformed"),
    ("missing config file", lambda r: ["train", "--config", str(r / "nope.toml")], "does not exist"),
    ("invalid TOML", _bad_toml, "is not valid TOML"),
    ("unknown backbone", lambda r: ["train", *_sets(r, "x", "model.backbone=resnet")], "model.backbone = 'resnet'"),
    ("image size unfit", lambda r: ["train", *_sets(r, "x", "model.backbone=iresnet50", "model.image_size=40")],
     "model.image_size = 40"),
    ("margin out of range", lambda r: ["train", *_sets(r, "x", "loss.arcface_m=2.0")], "loss.arcface_m"),
    ("cuda without a GPU", lambda r: ["train", *_sets(r, "x", "run.device=cuda")], "run.device = 'cuda'"),
    ("missing data dir", lambda r: ["train", *_sets(r, "x", f"data.path={r / 'nothing'}",
                                                    "data.generate_if_missing=false")], "nothing"),
    ("dataset without index", _empty_dir, "index.json"),
    ("missing shard", _drop_shard, "shard-"),
    ("empty shard", _empty_shard, "is empty (0 bytes)"),
    ("shards without samples", _index_without_samples, "lists 0 samples over"),
    ("labels outside num_classes", _shrink_classes, "outside [0, 4)"),
    ("synth counts inconsistent", lambda r: ["synth", "--out", str(r / "s"), "--min-images", "10",
                                             "--max-images", "5"], "synth.min_images = 10 exceeds"),
    ("num_slots below a batch", lambda r: ["train", *_sets(r, "x", "head.kind=partial_fc", "cache.num_slots=4")],
     "cache.num_slots=4 cannot hold"),
    ("bank of another dim", _bank_of_other_dim, "dim=128 but this run needs dim=64"),
    ("bank of another head kind", _bank_of_other_kind, "head_kind='attfc'"),
    ("checkpoint of another model", _other_backbone_resume, "model.embedding_size = 128 but this run has 64"),
    ("checkpoint of another backbone",
     lambda r: ["train", "--resume", "auto", *_sets(r, "ok", "model.backbone=iresnet18")],
     "model.backbone = 'tiny' but this run has 'iresnet18'"),
    ("missing DeepSpeed JSON", lambda r: ["train", *_sets(r, "x", "engine.kind=deepspeed",
                                                          "engine.deepspeed_config=nope.json")],
     "engine.deepspeed_config"),
    ("eval of a missing checkpoint", lambda r: ["eval", "--checkpoint", str(r / "nope")], "nope"),
    ("eval of a missing pack", _eval_missing_pairs, "nope.bin"),
    ("convert of a missing folder", _convert_missing, "nope"),
    ("run name leaving output_dir", lambda r: ["train", *_sets(r, "../../escaped")],
     "run.name = '../../escaped' is not a single directory name"),
    ("unwritable run directory", lambda r: ["train", *_sets(r, "x", f"run.output_dir={_a_file(r) / 'runs'}")],
     "the run directory (run.output_dir / run.name)"),
    ("unwritable bank.path", lambda r: ["train", *_sets(r, "x", "head.kind=partial_fc", "bank.tier=nvme",
                                                        f"bank.path={_a_file(r) / 'bank'}")],
     "the bank directory (bank.path)"),
    ("eval.pairs typo", lambda r: ["train", *_sets(r, "x", "eval.at_end=true", f"eval.pairs=['{r / 'pairz.bin'}']")],
     "eval.pairs: verification pack"),
    ("truncated pack", _truncated_pack, "is not a readable pickle"),
    ("resume of a missing checkpoint", lambda r: ["train", "--resume", str(r / "nope"), *_sets(r, "x")],
     "does not exist"),
    ("resume of an incomplete checkpoint",
     lambda r: _broken_checkpoint(r, "no_config", lambda c: (c / "config.toml").unlink()),
     "is incomplete (no config.toml)"),
    ("resume of a truncated state.pt",
     lambda r: _broken_checkpoint(r, "cut_state", lambda c: os.truncate(c / "state.pt", 1000)), "is damaged"),
    ("invalid DeepSpeed JSON", _bad_ds_json, "is not valid JSON"),
    ("export to an unwritable path", lambda r: ["export", str(r / "runs" / "ok"), "--onnx",
                                                str(_a_file(r) / "model.onnx")], "--onnx"),
    ("synth to an unwritable path", lambda r: ["synth", "--out", str(_a_file(r) / "s")], "--out"),
    ("IJB meta file missing",
     lambda r: _ijb(r, "ijb_no_pairs", lambda d: (d / "meta" / "ijbc_template_pair_label.txt").unlink()),
     "ijbc_template_pair_label.txt does not exist"),
    ("IJB landmark row of 11 fields", lambda r: _ijb(r, "ijb_fields", _drop_field),
     "ijbc_name_5pts_score.txt, line 2: 11 fields; expected 12"),
    ("IJB image that does not decode",
     lambda r: _ijb(r, "ijb_corrupt", lambda d: (d / "loose_crop" / "2.jpg").write_bytes(b"\xff\xd8 cut")),
     "2.jpg (line 2 of ijbc_name_5pts_score.txt) cannot be decoded"),
    ("IJB option without --ijb", lambda r: ["eval", "--checkpoint", str(r / "runs" / "ok"), "--protocol", "IJBB"],
     "add --ijb ROOT"),
    ("pairs.txt line of 5 fields", lambda r: _pairs_txt(r, "pairs_fields.txt", "Ann 1 2\nAnn 1 Bob 2 3\n"),
     "pairs_fields.txt, line 2: 5 fields"),
    ("pairs.txt unknown name", lambda r: _pairs_txt(r, "pairs_name.txt", "Ann 1 2\nAnn 1 Nobody 1\n"),
     "pairs_name.txt, line 2: identity 'Nobody' is not a sub-folder"),
    ("pairs.txt index out of range", lambda r: _pairs_txt(r, "pairs_index.txt", "Bob 1 3\n"),
     "pairs_index.txt, line 1: Bob/Bob_0003.jpg (or .jpeg/.png) does not exist"),
]


@pytest.mark.parametrize(("name", "make_argv", "expected"), CASES, ids=[c[0] for c in CASES])
def test_bad_input_exits_2_with_one_line(data: Path, capsys: pytest.CaptureFixture[str], name: str,
                                         make_argv: Callable[[Path], list[str]], expected: str) -> None:
    argv = make_argv(data)
    capsys.readouterr()
    assert main(argv) == 2, name
    err = capsys.readouterr().err.strip().splitlines()
    assert err, f"{name}: nothing on stderr"
    last = err[-1]
    assert last.startswith("offloadfr: error: "), last
    assert expected in last, f"{name}: {last}"


def test_missing_face_detector_exits_2_with_the_install_hint(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Catches ``--align`` without the optional detector crashing with an ImportError traceback (or in a worker
    process, after the plan), instead of one line naming the extra to install."""
    import sys

    monkeypatch.setitem(sys.modules, "yuface", None)  # what an environment without the extra sees on import
    for argv in (["convert", "folder", str(_image_folder(tmp_path)), str(tmp_path / "out"), "--align"],
                 ["pairs", str(_image_folder(tmp_path)), str(tmp_path / "p.bin"), "--num-pairs", "20", "--align"]):
        capsys.readouterr()
        assert main(argv) == 2, argv
        last = capsys.readouterr().err.strip().splitlines()[-1]
        assert last.startswith("offloadfr: error: face alignment needs the yuface face detector"), last
        assert "pip install 'offloadfr[align]'" in last
    assert not (tmp_path / "out").exists()  # refused before anything was written

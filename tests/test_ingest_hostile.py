"""Hostile or unlucky datasets through jobs.ingest: manifest paths that leave the dataset's root, symlinks out of
it, a source file that cannot be read, names that differ only by case or end in a newline. Each is refused with
the row named and nothing read or replaced."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from jobs import ingest as ingest_job
from pipeline.sources import archive

SECRET = "AWS_SECRET_ACCESS_KEY=do-not-archive"


def _img(path, value=100):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((16, 16, 3), value, np.uint8)).save(path)


@pytest.fixture
def secret(tmp_path):
    p = tmp_path / "home" / ".aws" / "credentials"
    p.parent.mkdir(parents=True)
    p.write_text(SECRET)
    return p


def _visa(root, image, mask):
    _img(root / "candle/Data/Images/Normal/0000.JPG")
    (root / "split_csv").mkdir(parents=True)
    (root / "split_csv/1cls.csv").write_text("object,split,label,image,mask\n"
                                            "candle,train,normal,candle/Data/Images/Normal/0000.JPG,\n"
                                            f"candle,test,anomaly,{image},{mask}\n")


def _run(src, arch, *extra):
    return ingest_job.main([str(src), "--archive", str(arch), "--deployment", "d", "--date", "2026-01-03", *extra])


def _archived_bytes(arch) -> bytes:
    out = b""
    for dirpath, _, files in os.walk(arch):
        for f in files:
            with open(os.path.join(dirpath, f), "rb") as fh:
                out += fh.read()
    return out


@pytest.mark.parametrize("image,mask", [
    ("{secret}", ""),                              # an absolute image path
    ("candle/Data/Images/Normal/0000.JPG", "{secret}"),  # an absolute mask path
    ("../home/.aws/credentials", ""),             # '..' out of the root
    ("candle/../../home/.aws/credentials", ""),
    ("file://{secret}", ""),                      # another scheme
    ("s3://other-bucket/key.png", ""),
])
def test_a_visa_manifest_path_outside_the_root_is_refused_and_nothing_is_read(tmp_path, secret, capsys, image, mask):
    root = tmp_path / "visa"
    _visa(root, image.format(secret=secret), mask.format(secret=secret))
    arch = tmp_path / "archive"
    assert _run(root, arch) == 2
    err = capsys.readouterr().err
    assert "split_csv/1cls.csv line 3" in err and "leaves the dataset root" in err
    assert not arch.exists() or SECRET.encode() not in _archived_bytes(arch)


def test_a_realiad_mask_path_outside_the_root_is_refused(tmp_path, secret, capsys):
    root = tmp_path / "realiad"
    _img(root / "realiad_256/audiojack/S0002/NG/HS/b_C1.jpg")
    doc = {"meta": {"prefix": "audiojack", "normal_class": "OK"}, "train": [],
           "test": [{"category": "audiojack", "anomaly_class": "HS", "image_path": "S0002/NG/HS/b_C1.jpg",
                     "mask_path": "../../../../home/.aws/credentials"}]}
    (root / "realiad_jsons").mkdir(parents=True)
    (root / "realiad_jsons/audiojack.json").write_text(json.dumps(doc))
    assert _run(root, tmp_path / "archive") == 2
    err = capsys.readouterr().err
    assert "mask_path" in err and "leaves the dataset root" in err
    assert not (tmp_path / "archive").exists()


def test_a_symlink_out_of_a_local_root_is_refused(tmp_path, secret, capsys):
    src = tmp_path / "flat"
    _img(src / "a.png")
    os.symlink(secret, src / "b.png")  # looks like an image, is the credentials file
    assert _run(src, tmp_path / "archive", "--product", "cam") == 2
    err = capsys.readouterr().err
    assert "cam/b (image)" in err and "outside the dataset root" in err
    assert not (tmp_path / "archive").exists()


def test_an_unreadable_source_fails_the_ingest_and_replaces_nothing_unless_skips_are_allowed(tmp_path, capsys):
    arch = tmp_path / "archive"
    src = tmp_path / "flat"
    for i in range(3):
        _img(src / f"{i}.png", 10 * i)
    assert _run(src, arch, "--product", "cam") == 0
    assert "cam: 0 -> 3 rows" in capsys.readouterr().out
    os.symlink(src / "gone.png", src / "3.png")  # inside the root, but the read fails (as one failed S3 GET would)
    assert _run(src, arch, "--product", "cam") == 1
    err = capsys.readouterr().err
    assert "3.png: unreadable" in err and "nothing was replaced" in err
    assert sorted(archive.read_table(str(arch), "d", "2026-01-03")["image_id"].to_pylist()) == ["cam/0", "cam/1", "cam/2"]
    assert _run(src, arch, "--product", "cam", "--allow-skips", "--json") == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rows"] == 3 and out["rows_before"] == {"cam": 3} and any("3.png: unreadable" in s for s in out["skipped"])


def test_products_or_image_ids_that_differ_only_by_case_are_refused(tmp_path, capsys):
    src = tmp_path / "flat"
    _img(src / "A1.png")
    _img(src / "a1.png", 50)
    assert _run(src, tmp_path / "archive", "--product", "cam") == 2
    assert "differ only by case" in capsys.readouterr().err
    one = tmp_path / "one"
    _img(one / "x.png")
    assert _run(one, tmp_path / "archive", "--product", "tile") == 0
    assert _run(one, tmp_path / "archive", "--product", "Tile") == 2  # would overwrite tile's shards on macOS
    assert "differs only by case from 'tile'" in capsys.readouterr().err
    assert archive.read_table(str(tmp_path / "archive"), "d", "2026-01-03")["product"].to_pylist() == ["tile"]


@pytest.mark.parametrize("flag,value", [("--product", "tile\n"), ("--deployment", "d\n"), ("--date", "2026-01-03\n")])
def test_a_name_with_a_trailing_newline_is_refused(tmp_path, capsys, flag, value):
    src = tmp_path / "flat"
    _img(src / "a.png")
    args = {"--product": "tile", "--deployment": "d", "--date": "2026-01-03"} | {flag: value}
    assert ingest_job.main([str(src), "--archive", str(tmp_path / "archive")]
                           + [x for k, v in args.items() for x in (k, v)]) == 2
    assert not (tmp_path / "archive").exists()

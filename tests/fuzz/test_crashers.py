"""Every mutant the fuzzer kept (crashers/<format>-<hash>.bz2 and its JSON note) replayed: each of
info, check, map, convert and compare ends in success or a one-line ``vdisk:`` error, under the
fuzzer's memory, CPU and time limits, and leaves the files unchanged.

The two fuzzer-found images of ``../shared/samples`` (AFL's, from QEMU's iotests) are replayed the
same way, named without and with their format, so the replay runs even while no crasher of ours is kept.

A note may carry ``"xfail": "why"`` for a crasher in a driver whose fix is pending; the test is then
a strict xfail, so the fix shows up as an XPASS and the field must go.
"""
import bz2
import io
import json
import os
import tarfile

import pytest

import fuzz

NOTES = sorted(n[:-5] for n in os.listdir(fuzz.CRASHERS) if n.endswith(".json")) if os.path.isdir(
    fuzz.CRASHERS) else []


def unpack(name, directory):
    """Write crasher *name*'s files into *directory*: (note, main file name, every file name)."""
    with open(os.path.join(fuzz.CRASHERS, name + ".json")) as f:
        note = json.load(f)
    with bz2.open(os.path.join(fuzz.CRASHERS, name + ".bz2")) as f:
        payload = f.read()
    if note.get("tar"):
        with tarfile.open(fileobj=io.BytesIO(payload)) as tar:
            names = tar.getnames()
            assert all("/" not in n and not n.startswith(".") for n in names), names
            # the "data" filter where this Python has it (3.12+ warns without one)
            tar.extractall(directory, **({"filter": "data"} if hasattr(tarfile, "data_filter") else {}))
    else:
        names = [note["main"]]
        with open(os.path.join(directory, note["main"]), "wb") as f:
            f.write(payload)
    main = note["main"]
    return note, main, [main] + sorted(n for n in names if n != main)


def params():
    out = []
    for name in NOTES:
        with open(os.path.join(fuzz.CRASHERS, name + ".json")) as f:
            reason = json.load(f).get("xfail")
        marks = [pytest.mark.xfail(reason=reason, strict=True)] if reason else []
        out.append(pytest.param(name, marks=marks, id=name))
    return out


# the shared fuzzer-found samples: (file, format)
SHARED = (("afl5.img", "qcow2"), ("afl9.vmdk", "vmdk"))


@pytest.mark.parametrize("name,fmt", SHARED)
@pytest.mark.parametrize("probe", [True, False], ids=["probed", "declared"])
def test_shared_crasher(name, fmt, probe, tmp_path):
    import imgfmt_util
    image_dir = tmp_path / "image"
    scratch = tmp_path / "scratch"
    image_dir.mkdir()
    scratch.mkdir()
    path = imgfmt_util.sample(name, str(image_dir))
    fuzz.preload([])
    found = fuzz.run_mutant(fmt, str(image_dir), os.path.basename(path), [os.path.basename(path)], str(scratch),
                            probe=probe)
    assert not found, "\n".join("%s: %s\n%s" % (cmd, problem, stderr) for cmd, dummy, problem, stderr in found)


def test_crasher_store_is_whole():
    """Every kept crasher has its image and its note, and the note names what the replay needs."""
    if not os.path.isdir(fuzz.CRASHERS):
        return
    names = os.listdir(fuzz.CRASHERS)
    images = sorted(n[:-4] for n in names if n.endswith(".bz2"))
    assert images == NOTES, "crashers without a note or an image: %s" % sorted(set(images) ^ set(NOTES))
    for name in NOTES:
        with open(os.path.join(fuzz.CRASHERS, name + ".json")) as f:
            note = json.load(f)
        assert note.get("format") and note.get("main"), name


# collected only when crashers are kept (an empty parameter set would show up as a skip)
if NOTES:
    @pytest.mark.parametrize("name", params())
    def test_crasher(name, tmp_path):
        image_dir = tmp_path / "image"
        scratch = tmp_path / "scratch"
        image_dir.mkdir()
        scratch.mkdir()
        fuzz.preload([])
        note, main, names = unpack(name, str(image_dir))
        found = fuzz.run_mutant(note["format"], str(image_dir), main, names, str(scratch), probe=note.get("probe", False))
        assert not found, "\n".join("%s: %s\n%s" % (cmd, problem, stderr) for cmd, dummy, problem, stderr in found)

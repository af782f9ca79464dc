"""A mutation fuzzer for every image format vdisk reads (stdlib only).

For each format it builds small seed images (several option variants, with data written; made by
qemu-img/qemu-io, by vdisk, by the read-only formats' writers, or taken from the shared samples),
then repeatedly damages them -- bit flips, boundary values written over 2/4/8-byte fields, numbers
in text descriptors replaced, chunks copied, the file cut short -- with mutations biased to the
metadata: the first clusters, the last sectors, and the regions that offsets found in the header
point to. Each mutant goes through ``info``, ``check``, ``map``, ``convert -O raw`` and
``compare``, every command in a child process (forked from a parent that has imported the engine
once) with RLIMIT_AS, RLIMIT_CPU and a wall timeout.

Allowed outcomes: exit 0; or exit 1/2/3 with exactly one ``vdisk:`` line on stderr (``check``
may exit 2/3 and ``compare`` 1 with a silent stderr: those are findings about the image, reported
on stdout). Anything else -- a Traceback, a signal, a timeout, an exit code outside 0..3, two
lines -- and any change to the mutant's files is a failure: the mutant is kept, bz2-compressed, as
``crashers/<format>-<hash>.bz2`` with a JSON note (``.json``) that ``test_crashers.py`` replays.

    python tests/fuzz/fuzz.py --seconds 300 --formats qcow2,vpc --seed 1 --jobs 2
"""
import argparse
import bz2
import hashlib
import io
import json
import os
import random
import resource
import shutil
import signal
import struct
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS = os.path.dirname(HERE)
REPO = os.path.dirname(TESTS)
CRASHERS = os.path.join(HERE, "crashers")
SAMPLES = os.environ.get("VDISK_SAMPLES", "/work/shared/samples")
CLI_MODULE = "ansible_collections.vdisk.images.plugins.module_utils.vdisk"
MiB = 1 << 20
COMMANDS = ("info", "check", "map", "convert", "compare")
MEM_LIMIT = 1 << 30
CPU_LIMIT = 20
WALL_TIMEOUT = 30.0
SLOW = 2.0
MAX_SEED = 16 * MiB


def source_tree_on_path() -> str:
    """Make the engine importable as ``ansible_collections.vdisk.images`` from this checkout
    (the same link tree tests/conftest.py makes, so both agree)."""
    tag = hashlib.sha1(REPO.encode()).hexdigest()[:12]
    root = os.path.join(tempfile.gettempdir(), "vdisk-src-%d-%s" % (os.getuid(), tag))
    link = os.path.join(root, "ansible_collections", "vdisk", "images")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    if not (os.path.islink(link) and os.readlink(link) == REPO):
        tmp = "%s.%d" % (link, os.getpid())
        os.symlink(REPO, tmp)
        os.replace(tmp, link)
    if root not in sys.path:
        sys.path.insert(0, root)
    paths = [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]
    if root not in paths:
        os.environ["PYTHONPATH"] = os.pathsep.join([root] + paths)
    for extra in (TESTS, os.path.join(TESTS, "interop")):
        if extra not in sys.path:
            sys.path.append(extra)
    return root


source_tree_on_path()


# -- seeds --------------------------------------------------------------------------------------
def _run(*args):
    proc = subprocess.run([str(a) for a in args], capture_output=True)
    if proc.returncode != 0:
        raise RuntimeError("%s: %s" % (" ".join(map(str, args)), proc.stderr.decode(errors="replace")))


def _vdisk(*args):
    _run(sys.executable, "-m", CLI_MODULE, *args)


WRITES = ("write -P 0x11 0 64k", "write -P 0x22 1M 192k", "write -P 0x33 3M 4k")


def _qemu(fmt, path, size="4M", opts="", backing=None, writes=WRITES, tool="qemu-img", backing_fmt=None):
    args = ["create", "-q", "-f", fmt] + (["-o", opts] if opts else [])
    if backing:
        args += ["-b", os.path.basename(backing), "-F", backing_fmt or fmt]
    if tool == "qemu-img":
        _run("qemu-img", *args, path, size)
    else:
        _vdisk(*args, path, size)
    if writes:
        cmd = ["qemu-io", "-f", fmt]
        for w in writes:
            cmd += ["-c", w]
        _run(*cmd, path)


def _raw_data(path, size=4 * MiB):
    with open(path, "wb") as f:
        f.truncate(size)
        for off, byte, n in ((0, 0x11, 65536), (MiB, 0x22, 192 * 1024), (3 * MiB, 0x33, 4096)):
            f.seek(off)
            f.write(bytes([byte]) * n)


def _guest_bytes(size=1 * MiB):
    data = bytearray(size)
    for i in range(0, size, 4096):
        if (i // 4096) % 3:
            data[i:i + 4096] = bytes([(i // 4096) & 0xff]) * 4096
    return bytes(data)


def _blob(path, blob):
    with open(path, "wb") as f:
        f.write(blob)


def _sample(name, path):
    with bz2.open(os.path.join(SAMPLES, name + ".bz2")) as f, open(path, "wb") as out:
        shutil.copyfileobj(f, out)


def _convert(fmt, path, opts="", compress=False):
    src = path + ".src.raw"
    _raw_data(src)
    _run("qemu-img", "convert", "-f", "raw", "-O", fmt, *(["-c"] if compress else []),
         *(["-o", opts] if opts else []), src, path)
    os.unlink(src)


# variant name -> builder(dir) returning (main file name, [companion file names]); every variant
# lives in a directory of its own, so companions (backing files, extents) sit beside the image
def _seed_table():
    import readonly_util as ro

    def q(fmt, opts="", tool="qemu-img", writes=WRITES):
        def build(d):
            _qemu(fmt, os.path.join(d, "img"), opts=opts, tool=tool, writes=writes)
            return "img", []
        return build

    def backed(fmt, base_fmt):
        def build(d):
            _qemu(base_fmt, os.path.join(d, "base"), writes=("write -P 0x44 0 2M",))
            _qemu(fmt, os.path.join(d, "img"), backing=os.path.join(d, "base"), backing_fmt=base_fmt)
            return "img", ["base"]
        return build

    def conv(fmt, opts="", compress=False):
        def build(d):
            _convert(fmt, os.path.join(d, "img"), opts, compress)
            return "img", []
        return build

    def sample(name):
        def build(d):
            if not os.path.exists(os.path.join(SAMPLES, name + ".bz2")):
                return None
            _sample(name, os.path.join(d, "img"))
            return "img", []
        return build

    def blob(make):
        def build(d):
            _blob(os.path.join(d, "img"), make())
            return "img", []
        return build

    def qcow2_snap(d):
        p = os.path.join(d, "img")
        _qemu("qcow2", p, opts="compat=0.10")
        _run("qemu-img", "snapshot", "-c", "s1", p)
        _run("qemu-io", "-f", "qcow2", "-c", "write -P 0x55 0 8k", p)
        return "img", []

    def qcow2_bitmap(d):
        p = os.path.join(d, "img")
        _qemu("qcow2", p, opts="lazy_refcounts=on")
        _run("qemu-img", "bitmap", "--add", p, "b0")
        return "img", []

    def vmdk_multi(sub):
        def build(d):
            _qemu("vmdk", os.path.join(d, "img"), opts="subformat=" + sub)
            return "img", sorted(n for n in os.listdir(d) if n != "img")
        return build

    def iso(d):
        src = os.path.join(d, "tree")
        os.mkdir(src)
        _blob(os.path.join(src, "f.txt"), b"hello\n" * 1000)
        _run("genisoimage", "-quiet", "-o", os.path.join(d, "img"), src)
        shutil.rmtree(src)
        return "img", []

    def raw(d):
        _raw_data(os.path.join(d, "img"), MiB)
        return "img", []

    g = _guest_bytes()
    return {
        "qcow2": {"default": q("qcow2"), "small-clusters": q("qcow2", "cluster_size=4096,refcount_bits=1"),
                  "snapshot-v2": qcow2_snap, "bitmap-lazy": qcow2_bitmap, "compressed": conv("qcow2", compress=True),
                  "backing": backed("qcow2", "qcow2"), "vdisk-made": q("qcow2", tool="vdisk"),
                  "afl5": sample("afl5.img")},
        "qcow": {"default": q("qcow"), "backing": backed("qcow", "raw"), "small": q("qcow", tool="vdisk")},
        "qed": {"default": q("qed"), "small": q("qed", "cluster_size=16k"), "backing": backed("qed", "raw")},
        "vdi": {"dynamic": q("vdi"), "static": q("vdi", "static=on"), "vdisk-made": q("vdi", tool="vdisk")},
        "vpc": {"dynamic": q("vpc"), "fixed": q("vpc", "subformat=fixed"), "vdisk-made": q("vpc", tool="vdisk"),
                "virtualpc": sample("virtualpc-dynamic.vhd"), "d2v": sample("d2v-zerofilled.vhd"),
                "hyperv": sample("hyperv2012r2-dynamic.vhd")},
        "parallels": {"default": q("parallels"), "small": q("parallels", "cluster_size=64k"),
                      "vdisk-made": q("parallels", tool="vdisk"), "v1": sample("parallels-v1"),
                      "v2": sample("parallels-v2"), "bitmap": sample("parallels-with-bitmap"),
                      "fake": sample("fake.parallels")},
        "vhdx": {"dynamic": q("vhdx", "block_size=1M,log_size=1M"), "fixed": q("vhdx", "subformat=fixed,log_size=1M"),
                 "vdisk-made": q("vhdx", "block_size=1M,log_size=1M", tool="vdisk"),
                 "iotest": sample("iotest-dynamic-1G.vhdx"), "d2v": sample("test-disk2vhd.vhdx"),
                 "dirtylog": sample("iotest-dirtylog-10G-4M.vhdx")},
        "vmdk": {"sparse": q("vmdk"), "stream": conv("vmdk", "subformat=streamOptimized"),
                 "flat": vmdk_multi("monolithicFlat"), "split": vmdk_multi("twoGbMaxExtentSparse"),
                 "vdisk-made": q("vmdk", tool="vdisk"), "v3": sample("iotest-version3.vmdk"),
                 "afl9": sample("afl9.vmdk")},
        "cloop": {"made": blob(lambda: ro.make_cloop(g, 64 * 1024)), "sample": sample("simple-pattern.cloop")},
        "bochs": {"v2": blob(lambda: ro.make_bochs(g)), "v1": blob(lambda: ro.make_bochs(g, version=1)),
                  "sample": sample("empty.bochs")},
        "dmg": {"udzo": blob(lambda: ro.make_dmg(g, [(ro.UDZO, 512), (ro.UDRW, 512), (ro.UDZE, 512),
                                                     (ro.UDBZ, 512)])),
                "sample": sample("simple-dmg.dmg")},
        "iso": {"genisoimage": iso},
        "raw": {"data": raw, "mbr": sample("grub_mbr.raw")},
    }


def build_seeds(formats, workdir):
    """[(format, variant, directory, main name, companions)] for the formats asked for."""
    table = _seed_table()
    seeds = []
    for fmt in formats:
        for variant, build in table.get(fmt, {}).items():
            d = os.path.join(workdir, "seeds", fmt, variant)
            os.makedirs(d)
            try:
                made = build(d)
            except (RuntimeError, OSError) as exc:
                sys.stderr.write("fuzz: seed %s/%s not built: %s\n" % (fmt, variant, str(exc).strip()[:200]))
                continue
            # big seeds (a fixed VHD of 250 MiB) make slow mutants and sit in every child's memory
            if made and os.path.getsize(os.path.join(d, made[0])) <= MAX_SEED:
                seeds.append((fmt, variant, d, made[0], made[1]))
    return seeds


# -- mutations ----------------------------------------------------------------------------------
INTERESTING = (0, 1, 0x7f, 0x80, 0xff, 0x100, 0x200, 0x1000, 0x7fff, 0x8000, 0xffff, 0x10000, 0x7fffffff,
               0x80000000, 0xffffffff, 0x100000000, 1 << 40, 1 << 56, 0x7fffffffffffffff, 0xffffffffffffffff)


def hot_regions(data: bytes):
    """Where metadata lives: the first 64 KiB, the last 4 KiB, and 4 KiB after every 4- or 8-byte
    value in the first 4 KiB that reads as a 512-aligned offset inside the file (table offsets)."""
    n = len(data)
    regions = [(0, min(n, 65536)), (max(0, n - 4096), n), (0, min(n, 1024))]
    head = data[:4096]
    seen = set()
    for pos in range(0, len(head) - 7, 4):
        for fmt in (">Q", "<Q", ">I", "<I"):
            v = struct.unpack_from(fmt, head, pos)[0]
            if 4096 <= v < n and v % 512 == 0 and v not in seen:
                seen.add(v)
                regions.append((v, min(n, v + 4096)))
    return regions[:64]


def mutate(data: bytes, rng: random.Random) -> bytes:
    out = bytearray(data)
    regions = hot_regions(data)
    for dummy in range(rng.choice((1, 1, 2, 3, 4, 8))):
        if not out:
            break
        if rng.random() < 0.85:
            start, end = rng.choice(regions)
        else:
            start, end = 0, len(out)
        end = min(end, len(out))
        if end <= start:
            continue
        pos = rng.randrange(start, end)
        kind = rng.random()
        if kind < 0.25:
            out[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.35:
            out[pos] = rng.randrange(256)
        elif kind < 0.75:
            width = rng.choice((2, 4, 4, 8, 8))
            pos -= pos % width
            if pos + width > len(out):
                continue
            fmt = rng.choice("<>") + {2: "H", 4: "I", 8: "Q"}[width]
            old = struct.unpack_from(fmt, out, pos)[0]
            mask = (1 << (8 * width)) - 1
            value = rng.choice(INTERESTING + (old + 1, old - 1, old * 2, old + 512, old + 4096,
                                              old ^ (1 << rng.randrange(8 * width)), len(out), len(out) - 512))
            struct.pack_into(fmt, out, pos, value & mask)
        elif kind < 0.85:
            # numbers in text (VMDK descriptors, DMG plists): a run of digits replaced
            s = pos
            while s > start and chr(out[s - 1]).isdigit():
                s -= 1
            e = pos
            while e < end and chr(out[e]).isdigit():
                e += 1
            if e > s:
                out[s:e] = str(rng.choice(INTERESTING + (-1, 0, 1 << 63))).encode()
            else:
                out[pos] = rng.choice(b"0\"= \n#\x00")
        elif kind < 0.95:
            src = rng.randrange(len(out))
            n = rng.choice((8, 64, 512))
            chunk = bytes(out[src:src + n])
            out[pos:pos + len(chunk)] = chunk
        else:
            cut = rng.randrange(len(out))
            del out[cut:]
    return bytes(out)


def _vpc_sum(buf, at):
    return ~(sum(buf) - sum(buf[at:at + 4])) & 0xFFFFFFFF


def fix_checksums(data: bytes) -> bytes:
    """Recompute the VHD footer/dynamic-header and VHDX header/region-table checksums, so most
    mutants get past the checksum test to the parser behind it."""
    out = bytearray(data)
    n = len(out)
    for base in (0, n - 512):
        if base >= 0 and n - base >= 512 and out[base:base + 8] == b"conectix":
            struct.pack_into(">I", out, base + 64, _vpc_sum(out[base:base + 512], 64))
            dyn = struct.unpack_from(">Q", out, base + 16)[0]
            if dyn + 1024 <= n and out[dyn:dyn + 8] == b"cxsparse":
                struct.pack_into(">I", out, dyn + 36, _vpc_sum(out[dyn:dyn + 1024], 36))
    if out[:8] == b"vhdxfile":
        from ansible_collections.vdisk.images.plugins.module_utils.vdisk.formats.vhdx.crc32c import checksum
        for base, sig, length in ((65536, b"head", 4096), (131072, b"head", 4096), (196608, b"regi", 65536),
                                  (262144, b"regi", 65536)):
            if base + length <= n and out[base:base + 4] == sig:
                struct.pack_into("<I", out, base + 4, checksum(bytes(out[base:base + length])))
    return bytes(out)


# -- running commands ---------------------------------------------------------------------------
def _command(cmd, fmt, path, scratch, probe):
    f = [] if probe else ["-f", fmt]
    if cmd == "info":
        return ["info", "--output=json"] + f + [path]
    if cmd == "check":
        return ["check", "--output=json"] + f + [path]
    if cmd == "map":
        return ["map", "--output=json"] + f + [path]
    if cmd == "convert":
        return ["convert"] + f + ["-O", "raw", path, os.path.join(scratch, "out.raw")]
    blank = os.path.join(scratch, "blank.raw")
    if not os.path.exists(blank):
        with open(blank, "wb") as b:
            b.truncate(MiB)
    return ["compare"] + f + ["-F", "raw", path, blank]


def run_child(argv, scratch, mem=MEM_LIMIT, cpu=CPU_LIMIT, wall=WALL_TIMEOUT):
    """Run ``vdisk ARGV`` in a forked child under limits (*mem* bytes of address space beyond the
    interpreter's, *cpu* seconds, *wall* seconds): (status, stderr text, seconds), status an exit
    code, ``"signal N"`` or ``"timeout"``."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.cli.main import main
    err = os.path.join(scratch, "stderr")
    sys.stdout.flush()
    sys.stderr.flush()
    with open(err, "wb"):
        pass   # exists even when the child dies before it opens it
    t0 = time.monotonic()
    pid = os.fork()
    if pid == 0:   # the child: never returns
        rc = 1
        try:
            os.setpgid(0, 0)
            # *mem* on top of what the (forked) interpreter already maps, so the budget is the
            # command's own whatever the parent holds
            with open("/proc/self/statm") as statm:
                base = int(statm.read().split()[0]) * resource.getpagesize()
            resource.setrlimit(resource.RLIMIT_AS, (base + mem, base + mem))
            resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
            fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.dup2(fd, 2)
            os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
            # new streams on fds 1 and 2 (pytest replaces sys.stdout/sys.stderr with its own)
            sys.stdout = open(1, "w", closefd=False)
            sys.stderr = open(2, "w", closefd=False, errors="backslashreplace")
            rc = main(list(argv))
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 1
        except BaseException:   # what the interpreter would print for an uncaught exception
            try:
                traceback.print_exc()
            except BaseException:
                os.write(2, b"Traceback (unprintable)\n")
            rc = 1
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(rc & 0xff)
    status = None
    delay = 0.001
    while True:
        done, code = os.waitpid(pid, os.WNOHANG)
        if done:
            break
        if time.monotonic() - t0 > wall:
            os.killpg(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            status = "timeout"
            break
        time.sleep(delay)
        delay = min(delay * 2, 0.02)
    if status is None:
        status = os.WEXITSTATUS(code) if os.WIFEXITED(code) else "signal %d" % os.WTERMSIG(code)
    with open(err, "rb") as f:
        text = f.read(65536).decode("utf-8", "replace")
    return status, text, time.monotonic() - t0


def verdict(cmd, status, stderr):
    """None when the outcome is allowed, else what is wrong with it."""
    lines = stderr.splitlines()
    if "Traceback" in stderr:
        tail = [ln.strip() for ln in lines if ln.strip()]
        return "traceback: %s" % (tail[-1] if tail else "")
    if not isinstance(status, int):
        return status
    if cmd == "check":
        # qemu-img check's own contract: 0 clean, 1 not completed, 2 corrupt, 3 leaks, 63 not
        # supported; the findings go to stderr one per line (qemu-img prints them there too)
        if status in (0, 2, 3) or (status in (1, 63) and lines):
            return None
    if status not in (0, 1, 2, 3):
        return "exit %d" % status
    if status == 0:
        return None
    if not lines:
        if (cmd == "check" and status in (2, 3)) or (cmd == "compare" and status == 1):
            return None
        return "exit %d with nothing on stderr" % status
    if len(lines) != 1 or not lines[0].startswith("vdisk:"):
        return "exit %d with %d stderr lines: %r" % (status, len(lines), stderr[:300])
    return None


def tree_hash(directory, names):
    h = hashlib.sha256()
    for name in names:
        p = os.path.join(directory, name)
        h.update(name.encode() + b"\0")
        try:
            st = os.lstat(p)
            h.update(b"%d %d\0" % (st.st_mode, st.st_size))
            with open(p, "rb") as f:
                for block in iter(lambda: f.read(MiB), b""):
                    h.update(block)
        except OSError as exc:
            h.update(repr(exc).encode())
    return h.hexdigest()


def run_mutant(fmt, directory, main_name, names, scratch, probe=False, commands=COMMANDS, **limits):
    """Every command on the mutant ``directory/main_name``: [(command, argv, problem, stderr)]."""
    path = os.path.join(directory, main_name)
    before = tree_hash(directory, names)
    found = []
    for cmd in commands:
        argv = _command(cmd, fmt, path, scratch, probe)
        status, stderr, seconds = run_child(argv, scratch, **limits)
        if seconds > SLOW and os.environ.get("VDISK_FUZZ_VERBOSE"):
            sys.stderr.write("fuzz: slow (%.1f s, exit %s): %s\n" % (seconds, status, " ".join(argv)))
        out = os.path.join(scratch, "out.raw")
        if os.path.exists(out):
            os.unlink(out)
        problem = verdict(cmd, status, stderr)
        if tree_hash(directory, names) != before:
            problem = (problem + "; " if problem else "") + "the image changed"
            found.append((cmd, argv, problem, stderr))
            break
        if problem:
            found.append((cmd, argv, problem, stderr))
    return found


# -- crashers -----------------------------------------------------------------------------------
def signature(fmt, cmd, problem, stderr):
    """What makes two failures the same bug: format, command, kind and the innermost frame."""
    frames = [ln.strip() for ln in stderr.splitlines() if ln.strip().startswith("File ")]
    return "%s|%s|%s|%s" % (fmt, cmd, problem.split(":")[0], frames[-1] if frames else problem[:60])


def known_signatures():
    sigs = set()
    if os.path.isdir(CRASHERS):
        for name in os.listdir(CRASHERS):
            if name.endswith(".json"):
                with open(os.path.join(CRASHERS, name)) as f:
                    sigs.add(json.load(f).get("signature"))
    return sigs


def save_crasher(fmt, variant, directory, main_name, names, cmd, problem, stderr, probe, seed):
    os.makedirs(CRASHERS, exist_ok=True)
    if len(names) == 1:
        with open(os.path.join(directory, main_name), "rb") as f:
            payload = f.read()
        archive = False
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as tar:
            for name in names:
                tar.add(os.path.join(directory, name), arcname=name)
        payload = buf.getvalue()
        archive = True
    digest = hashlib.sha1(payload).hexdigest()[:16]
    base = os.path.join(CRASHERS, "%s-%s" % (fmt, digest))
    with open(base + ".bz2", "wb") as f:
        f.write(bz2.compress(payload, 9))
    note = {"format": fmt, "variant": variant, "command": cmd, "probe": probe, "problem": problem,
            "stderr": stderr[-2000:], "main": main_name, "tar": archive, "seed": seed,
            "signature": signature(fmt, cmd, problem, stderr)}
    with open(base + ".json", "w") as f:
        json.dump(note, f, indent=1, sort_keys=True)
        f.write("\n")
    return base + ".bz2"


# -- the loop -----------------------------------------------------------------------------------
def fuzz(seeds, seconds, seed, scratch, save=True, log=sys.stderr, **limits):
    """Mutate and run until *seconds* pass; returns (mutants run, [failures])."""
    rng = random.Random(seed)
    deadline = time.monotonic() + seconds
    known = known_signatures()
    failures = []
    count = 0
    mdir = os.path.join(scratch, "mutant")
    loaded = {}
    while time.monotonic() < deadline and seeds:
        fmt, variant, d, main_name, companions = seeds[count % len(seeds)]
        count += 1
        if d not in loaded:
            with open(os.path.join(d, main_name), "rb") as f:
                loaded[d] = f.read()
        shutil.rmtree(mdir, ignore_errors=True)
        os.makedirs(mdir)
        for name in companions:
            shutil.copyfile(os.path.join(d, name), os.path.join(mdir, name))
        mutant_seed = rng.randrange(1 << 62)
        data = mutate(loaded[d], random.Random(mutant_seed))
        if rng.random() < 0.7:
            data = fix_checksums(data)
        with open(os.path.join(mdir, main_name), "wb") as f:
            f.write(data)
        probe = rng.random() < 0.15
        names = [main_name] + list(companions)
        for cmd, dummy, problem, stderr in run_mutant(fmt, mdir, main_name, names, scratch, probe, **limits):
            sig = signature(fmt, cmd, problem, stderr)
            failures.append((fmt, variant, cmd, problem))
            log.write("fuzz: %s/%s %s: %s\n" % (fmt, variant, cmd, problem[:300]))
            if save and sig not in known:
                known.add(sig)
                log.write("fuzz:   saved %s\n" % save_crasher(fmt, variant, mdir, main_name, names, cmd, problem,
                                                             stderr, probe, mutant_seed))
    return count, failures


def preload(formats):
    """Import the drivers in the parent, so each forked child starts with them loaded."""
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk import registry
    for fmt in formats:
        registry.get_driver(fmt)
    import importlib
    for name in ("cli.main", "ops.compare", "ops.convert", "ops.readahead", "ops.map", "ops.check", "ops.info"):
        try:
            importlib.import_module("ansible_collections.vdisk.images.plugins.module_utils.vdisk." + name)
        except ImportError:
            pass


def all_formats():
    from ansible_collections.vdisk.images.plugins.module_utils.vdisk.registry import DRIVERS
    table = _seed_table()
    return [f for f in DRIVERS if f in table]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="total running time (default 60)")
    ap.add_argument("--formats", default="", help="comma-separated formats (default: every format)")
    ap.add_argument("--seed", type=int, default=None, help="random seed (default: from the clock)")
    ap.add_argument("--jobs", type=int, default=1, help="worker processes (default 1)")
    ap.add_argument("--no-save", action="store_true", help="do not write crashers")
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f] or all_formats()
    seed = args.seed if args.seed is not None else int(time.time())
    work = tempfile.mkdtemp(prefix="vdisk-fuzz-")
    try:
        seeds = build_seeds(formats, work)
        preload(formats)
        sys.stderr.write("fuzz: seed %d, %d seed images of %s, %d job(s), %.0f s\n"
                         % (seed, len(seeds), ",".join(formats), args.jobs, args.seconds))
        pids = []
        for job in range(args.jobs):
            scratch = os.path.join(work, "job%d" % job)
            os.makedirs(scratch)
            mine = seeds[job::args.jobs] if len(seeds) >= args.jobs else seeds
            if args.jobs == 1:
                count, failures = fuzz(mine, args.seconds, seed, scratch, save=not args.no_save)
                sys.stderr.write("fuzz: %d mutants, %d failures\n" % (count, len(failures)))
                return 1 if failures else 0
            pid = os.fork()
            if pid == 0:
                # a job never returns into main(): its finally would remove the other jobs' scratch
                status = 2
                try:
                    count, failures = fuzz(mine, args.seconds, seed + job, scratch, save=not args.no_save)
                    sys.stderr.write("fuzz: job %d: %d mutants, %d failures\n" % (job, count, len(failures)))
                    status = 1 if failures else 0
                except BaseException:
                    traceback.print_exc()
                finally:
                    sys.stderr.flush()
                    os._exit(status)
            pids.append(pid)
        bad = 0
        for pid in pids:
            bad |= os.waitpid(pid, 0)[1]
        return 1 if bad else 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

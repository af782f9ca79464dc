#!/usr/bin/env python3
"""Build (or reuse) the guest disks the benchmark runs on.  Python stdlib only.

All of it lives in a cache directory outside the git tree:
$VDISK_BENCH_CACHE, else $XDG_CACHE_HOME/vdisk-bench, else ~/.cache/vdisk-bench, in a
subdirectory named after the recipe version (change RECIPE when a recipe changes, and the
disks are built again).  Each file is built under a temporary name and renamed when complete,
so an interrupted build is redone and a finished one is reused.

  rootfs/          Debian bookworm from debootstrap (minbase plus a few packages, ~0.4 GB)
  small.raw        ext4 of rootfs/ on a 4 GiB sparse raw image               (mkfs.ext4 -d)
  modified.raw     small.raw after a guest's worth of changes: files added, replaced and
                   removed with debugfs (nothing is mounted)
  big.raw          ext4 of rootfs/ plus real files of this machine's /usr (taken in sorted
                   order until the file data reaches BIG_DATA_BYTES) on an 8 GiB sparse raw image
  small.qcow2, modified.qcow2, big.qcow2, big-4k.qcow2
                   made once by qemu-img convert (big-4k: -o cluster_size=4096)
  small-c.qcow2    small.raw compressed: qemu-img convert -c
  os-overlay.qcow2 a qcow2 overlay over big.qcow2 (backing name "big.qcow2") holding a guest's
                   changes: OVERLAY_CHANGE_BYTES written with qemu-io at spread offsets inside
                   big.qcow2's data, in pieces of 4 KiB to 1 MiB
  startup.qcow2    a small qcow2 (64 MiB, 1 MiB of data) for the start-up cell
  plan-1000/       manifest.yml declaring 1,000 qcow2 images of 1 MiB, and those images, as
                   declared (a plan of it has nothing to do)
  sparse-1t.raw    a 1 TiB sparse raw image holding 1 GiB of data in 1 MiB pieces, one in each
                   GiB of the range (pseudo-random bytes, fixed seeds)

Run alone to build everything:  python3 tests/bench/build_disks.py [--cache DIR]
"""
import argparse
import json
import os
import random
import shutil
import stat
import subprocess
import sys
import time

RECIPE = "v1"
SUITE = "bookworm"
MIRROR = os.environ.get("VDISK_BENCH_MIRROR", "http://deb.debian.org/debian")
PACKAGES = "python3,perl,systemd,udev,kmod,iproute2,openssh-client,less"
GIB = 1 << 30
SMALL_SIZE = 4 * GIB
BIG_SIZE = 8 * GIB
BIG_DATA_BYTES = 1700 * 1000 * 1000      # file data in big.raw: root fs + host files
HOST_SOURCE = "/usr"
MODIFY_ADD_BYTES = 48 << 20              # new files written into modified.raw
MODIFY_REPLACE = 40                      # existing files replaced by other content
MODIFY_REMOVE = 40                       # existing files removed
OVERLAY_CHANGE_BYTES = 48 << 20          # guest writes in os-overlay.qcow2
OVERLAY_WRITE_SIZES = (4 << 10, 64 << 10, 16 << 10, 1 << 20, 4 << 10, 256 << 10, 128 << 10, 512 << 10)
PLAN_IMAGES = 1000                       # images of plan-1000/manifest.yml
SPARSE_SIZE = 1 << 40                    # sparse-1t.raw: 1 TiB virtual ...
SPARSE_PIECE = 1 << 20                   # ... of which SPARSE_PIECES pieces of 1 MiB hold data
SPARSE_PIECES = 1024

# what each fixture is made from
DEPENDS = {
    "rootfs": (),
    "small.raw": ("rootfs",),
    "modified.raw": ("small.raw",),
    "big.raw": ("rootfs",),
    "small.qcow2": ("small.raw",),
    "modified.qcow2": ("modified.raw",),
    "big.qcow2": ("big.raw",),
    "big-4k.qcow2": ("big.raw",),
    "small-c.qcow2": ("small.raw",),
    "os-overlay.qcow2": ("big.qcow2",),
    "startup.qcow2": (),
    "plan-1000": (),
    "sparse-1t.raw": (),
}


def log(msg):
    sys.stderr.write("[build_disks %s] %s\n" % (time.strftime("%H:%M:%S"), msg))
    sys.stderr.flush()


def default_cache_root():
    if os.environ.get("VDISK_BENCH_CACHE"):
        return os.environ["VDISK_BENCH_CACHE"]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "vdisk-bench")


def run(cmd, **kw):
    log("$ " + " ".join(cmd))
    subprocess.run(cmd, check=True, **kw)


def need_tool(name, package):
    """The path of *name*; installs *package* with apt-get when it is missing."""
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if found:
        return found
    log("%s not found: installing %s with apt-get" % (name, package))
    sudo = [] if os.geteuid() == 0 else ["sudo"]
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    run(sudo + ["apt-get", "update", "-qq"], env=env)
    run(sudo + ["apt-get", "install", "-y", "-qq", package], env=env)
    found = shutil.which(name) or shutil.which(name, path="/usr/sbin:/sbin:/usr/bin:/bin")
    if not found:
        raise SystemExit("build_disks: %s still missing after installing %s" % (name, package))
    return found


def rmtree(path):
    if os.path.lexists(path):
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            os.unlink(path)


def allocated(path):
    """Bytes a file really occupies (a sparse image's data, not its size)."""
    return os.stat(path).st_blocks * 512


def tree_bytes(top):
    """Sum of the sizes of the regular files under *top*, each inode counted once."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(top):
        for name in filenames:
            st = os.lstat(os.path.join(dirpath, name))
            if stat.S_ISREG(st.st_mode) and (st.st_dev, st.st_ino) not in seen:
                seen.add((st.st_dev, st.st_ino))
                total += st.st_size
    return total


class Fixtures:
    def __init__(self, root=None, qemu_img="qemu-img"):
        self.root = os.path.join(root or default_cache_root(), RECIPE)
        self.qemu_img = qemu_img
        os.makedirs(self.root, exist_ok=True)
        self.manifest_path = os.path.join(self.root, "fixtures.json")
        try:
            with open(self.manifest_path) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError):
            self.manifest = {}
        self.built = []          # names built in this process (the rest were reused)

    def path(self, name):
        return os.path.join(self.root, name)

    def ensure(self, names):
        """Build whatever of *names* (and what they are made from) is not in the cache yet."""
        for name in names:
            for dep in DEPENDS[name]:
                self.ensure([dep])
            final = self.path(name)
            if os.path.exists(final):
                if "allocated" not in self.manifest.get(name, {}) and "data_bytes" not in self.manifest.get(name, {}):
                    self._record(name, None)
                continue
            tmp = final + ".tmp"
            rmtree(tmp)
            log("building %s" % name)
            t0 = time.monotonic()
            getattr(self, "_build_" + name.replace(".", "_").replace("-", "_"))(tmp)
            os.replace(tmp, final)
            seconds = self._record(name, time.monotonic() - t0)
            self.built.append(name)
            log("built %s in %.0f s" % (name, seconds))

    def _record(self, name, seconds):
        final = self.path(name)
        info = {} if seconds is None else {"seconds": round(seconds, 1)}
        if os.path.isfile(final):
            info.update(size=os.path.getsize(final), allocated=allocated(final))
        elif "data_bytes" not in self.manifest.get(name, {}):
            info.update(data_bytes=tree_bytes(final))
        self.manifest[name] = dict(self.manifest.get(name, {}), **info)
        self._save()
        return seconds or 0

    def _save(self):
        with open(self.manifest_path + ".tmp", "w") as f:
            json.dump(self.manifest, f, indent=2, sort_keys=True)
        os.replace(self.manifest_path + ".tmp", self.manifest_path)

    # -- recipes ------------------------------------------------------------------------------
    def _build_rootfs(self, tmp):
        debootstrap = need_tool("debootstrap", "debootstrap")
        run([debootstrap, "--variant=minbase", "--include=" + PACKAGES, SUITE, tmp, MIRROR],
            stdout=subprocess.DEVNULL)
        # what a booted guest would not keep: nothing here refers to the build host
        rmtree(os.path.join(tmp, "debootstrap"))

    def _mkfs(self, tmp, size, tree, label):
        mkfs = need_tool("mkfs.ext4", "e2fsprogs")
        with open(tmp, "wb") as f:
            f.truncate(size)
        # a fixed UUID and hash seed: the same tree makes the same image on every machine
        uuid = {"small": "7d8c6c1e-3f1a-4a8e-9a57-0c3b1b5e0001",
                "big": "7d8c6c1e-3f1a-4a8e-9a57-0c3b1b5e0002"}[label]
        run([mkfs, "-q", "-F", "-t", "ext4", "-L", label, "-U", uuid,
             "-E", "hash_seed=" + uuid + ",root_owner=0:0", "-d", tree, tmp])

    def _build_small_raw(self, tmp):
        self._mkfs(tmp, SMALL_SIZE, self.path("rootfs"), "small")

    def _build_big_raw(self, tmp):
        tree = self.path("big-tree.tmp")
        rmtree(tree)
        try:
            data = link_tree(self.path("rootfs"), tree)
            dest = os.path.join(tree, "srv", "host" + HOST_SOURCE.rstrip("/"))
            data += add_host_files(HOST_SOURCE, dest, BIG_DATA_BYTES - data, skip=self.root)
            log("big tree: %.2f GB of file data" % (data / 1e9))
            self.manifest["big.raw"] = {"data_bytes": data}
            self._mkfs(tmp, BIG_SIZE, tree, "big")
        finally:
            rmtree(tree)

    def _build_modified_raw(self, tmp):
        debugfs = need_tool("debugfs", "e2fsprogs")
        subprocess.run(["cp", "--sparse=always", self.path("small.raw"), tmp], check=True)
        rootfs = self.path("rootfs")
        cmds = []
        # new files: real binaries of this machine (a guest installing software)
        cmds += ["mkdir /opt/added", "cd /opt/added"]
        added = 0
        for i, src in enumerate(host_files(HOST_SOURCE + "/lib", self.root)):
            if added >= MODIFY_ADD_BYTES:
                break
            cmds.append('write "%s" f%05d' % (src, i))
            added += os.path.getsize(src)
        # replaced files: /usr/share/doc files of the guest rewritten (other content, same name)
        docs = sorted(os.path.join(d, n) for d, _, ns in os.walk(os.path.join(rootfs, "usr/share/doc"))
                      for n in ns if os.path.isfile(os.path.join(d, n)) and not os.path.islink(os.path.join(d, n)))
        stride = max(1, len(docs) // max(1, MODIFY_REPLACE + MODIFY_REMOVE))
        picked = docs[::stride][:MODIFY_REPLACE + MODIFY_REMOVE]
        donors = [p for p in host_files("/usr/share", self.root)][:MODIFY_REPLACE]
        for j, path in enumerate(picked):
            inside = "/" + os.path.relpath(path, rootfs)
            cmds += ["cd \"%s\"" % os.path.dirname(inside), "rm \"%s\"" % os.path.basename(inside)]
            if j < len(donors):
                cmds.append('write "%s" "%s"' % (donors[j], os.path.basename(inside)))
        script = tmp + ".debugfs"
        with open(script, "w") as f:
            f.write("\n".join(cmds) + "\n")
        try:
            run([debugfs, "-w", "-f", script, tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        finally:
            os.unlink(script)
        fsck = need_tool("e2fsck", "e2fsprogs")
        rc = subprocess.run([fsck, "-fn", tmp], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL).returncode
        if rc != 0:
            raise SystemExit("build_disks: e2fsck -fn %s says %d after the debugfs edits" % (tmp, rc))
        self.manifest["modified.raw"] = {"added_bytes": added, "replaced": min(len(donors), len(picked)),
                                         "removed": max(0, len(picked) - len(donors))}

    def _qcow2(self, src, tmp, *opts):
        run([self.qemu_img, "convert", "-f", "raw", "-O", "qcow2"] + list(opts) + [self.path(src), tmp])

    def _build_small_qcow2(self, tmp):
        self._qcow2("small.raw", tmp)

    def _build_modified_qcow2(self, tmp):
        self._qcow2("modified.raw", tmp)

    def _build_big_qcow2(self, tmp):
        self._qcow2("big.raw", tmp)

    def _build_big_4k_qcow2(self, tmp):
        self._qcow2("big.raw", tmp, "-o", "cluster_size=4096")

    def _build_small_c_qcow2(self, tmp):
        self._qcow2("small.raw", tmp, "-c")

    def _build_os_overlay_qcow2(self, tmp):
        qemu_io = need_tool("qemu-io", "qemu-utils")
        # the backing name as a guest's overlay stores it: relative, in the same directory
        run([self.qemu_img, "create", "-q", "-f", "qcow2", "-b", "big.qcow2", "-F", "qcow2", tmp])
        out = subprocess.run([self.qemu_img, "map", "--output=json", "-f", "qcow2", self.path("big.qcow2")],
                             check=True, capture_output=True, text=True).stdout
        extents = [(e["start"], e["length"]) for e in json.loads(out) if e.get("data")]
        writes = overlay_writes(extents, OVERLAY_CHANGE_BYTES)
        cmds = []
        for offset, length, pattern in writes:
            cmds += ["-c", "write -q -P %d %d %d" % (pattern, offset, length)]
        log("writing %d pieces (%.1f MB) into the overlay" % (len(writes), sum(w[1] for w in writes) / 1e6))
        subprocess.run([qemu_io, "-f", "qcow2"] + cmds + [tmp], check=True, stdout=subprocess.DEVNULL)
        self.manifest["os-overlay.qcow2"] = {"written_bytes": sum(w[1] for w in writes), "writes": len(writes)}

    def _build_startup_qcow2(self, tmp):
        qemu_io = need_tool("qemu-io", "qemu-utils")
        run([self.qemu_img, "create", "-q", "-f", "qcow2", tmp, "64M"])
        run([qemu_io, "-f", "qcow2", "-c", "write -q -P 90 0 1M", tmp], stdout=subprocess.DEVNULL)

    def _build_plan_1000(self, tmp):
        os.makedirs(tmp)
        first = os.path.join(tmp, plan_image_name(0))
        run([self.qemu_img, "create", "-q", "-f", "qcow2", first, "1M"])
        for i in range(1, PLAN_IMAGES):
            shutil.copyfile(first, os.path.join(tmp, plan_image_name(i)))
        with open(os.path.join(tmp, "manifest.yml"), "w") as f:
            f.write(plan_manifest(PLAN_IMAGES))

    def _build_sparse_1t_raw(self, tmp):
        pieces = sparse_pieces(SPARSE_SIZE, SPARSE_PIECE, SPARSE_PIECES)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SPARSE_SIZE)
            for i, offset in enumerate(pieces):
                os.pwrite(fd, random.Random(i).randbytes(SPARSE_PIECE), offset)
        finally:
            os.close(fd)
        # the cache must hold the data, not the terabyte: a file system without holes is refused
        data = len(pieces) * SPARSE_PIECE
        used = allocated(tmp)
        if used > 2 * data:
            rmtree(tmp)
            raise SystemExit("build_disks: sparse-1t.raw is not sparse on this file system (%d bytes "
                             "allocated for %d of data)" % (used, data))
        log("sparse-1t.raw: %d bytes allocated of %d" % (allocated(tmp), SPARSE_SIZE))
        self.manifest["sparse-1t.raw"] = {"data_bytes": data}


def overlay_writes(extents, total, sizes=OVERLAY_WRITE_SIZES, align=4096):
    """Guest writes of *total* bytes spread evenly over the data *extents* [(start, length)] of the
    base: [(offset, length, pattern byte)], in pieces of *sizes* (cycled), *align*-aligned, each
    inside one extent where the extent is long enough.  Deterministic."""
    lengths = []
    while sum(lengths) < total:
        lengths.append(sizes[len(lengths) % len(sizes)])
    data = sum(length for _, length in extents)
    if not data:
        raise ValueError("no data extents to write over")
    writes = []
    for k, length in enumerate(lengths):
        pos = data * k // len(lengths)           # position in the data, as if the extents were one
        for start, ext in extents:
            if pos < ext:
                break
            pos -= ext
        offset = (start + pos) // align * align
        if offset + length > start + ext and ext >= length:
            offset = (start + ext - length) // align * align
        writes.append((offset, length, 1 + k % 255))
    return writes


def plan_image_name(i):
    return "img-%04d.qcow2" % i


def plan_manifest(count):
    """A manifest of *count* qcow2 images of 1 MiB, as plan-1000 holds them."""
    lines = ["# vdisk bench: %d images, all in their declared state" % count, "version: 1", "images:"]
    lines += ["  - {path: %s, format: qcow2, size: 1M}" % plan_image_name(i) for i in range(count)]
    return "\n".join(lines) + "\n"


def sparse_pieces(size, piece, count):
    """Offsets of *count* pieces of *piece* bytes, one in each 1/count of *size*, at a 4 KiB-aligned
    place that moves from slice to slice (fixed: the same file on every machine)."""
    stride = size // count
    room = (stride - piece) // 4096
    return [i * stride + (i * 2654435761 % (room + 1)) * 4096 for i in range(count)]


def host_files(top, skip):
    """Regular, readable, non-empty files under *top* in sorted walk order, *skip* left out."""
    for dirpath, dirnames, filenames in os.walk(top):
        dirnames[:] = sorted(d for d in dirnames if not os.path.join(dirpath, d).startswith(skip))
        for name in sorted(filenames):
            path = os.path.join(dirpath, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if stat.S_ISREG(st.st_mode) and st.st_size > 0 and os.access(path, os.R_OK):
                yield path


def _place(src, dst, st):
    """Hard-link *src* to *dst* (same file system) or copy it with its owner and mode."""
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)
        os.chown(dst, st.st_uid, st.st_gid)


def link_tree(src, dst):
    """Mirror *src* at *dst* with hard links (copies across file systems). Returns its data bytes."""
    seen, total = set(), 0
    for dirpath, dirnames, filenames in os.walk(src):
        rel = os.path.relpath(dirpath, src)
        target = os.path.normpath(os.path.join(dst, rel))
        os.makedirs(target, exist_ok=True)
        st = os.lstat(dirpath)
        os.chmod(target, stat.S_IMODE(st.st_mode))
        os.chown(target, st.st_uid, st.st_gid)
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            st = os.lstat(path)
            out = os.path.join(target, name)
            if stat.S_ISLNK(st.st_mode):
                os.symlink(os.readlink(path), out)
                os.lchown(out, st.st_uid, st.st_gid)
            elif stat.S_ISREG(st.st_mode):
                _place(path, out, st)
                if (st.st_dev, st.st_ino) not in seen:
                    seen.add((st.st_dev, st.st_ino))
                    total += st.st_size
            elif not stat.S_ISDIR(st.st_mode):
                os.mknod(out, st.st_mode, st.st_rdev)        # device nodes, fifos of the rootfs
                os.chown(out, st.st_uid, st.st_gid)
    # directory times are not needed: mkfs.ext4 -d takes them from the tree as it is
    return total


def add_host_files(top, dst, budget, skip):
    """Link the files of *top* below *dst*, in sorted order, until *budget* bytes are placed."""
    seen, total = set(), 0
    for path in host_files(top, skip):
        if total >= budget:
            break
        st = os.lstat(path)
        out = os.path.join(dst, os.path.relpath(path, top))
        os.makedirs(os.path.dirname(out), exist_ok=True)
        _place(path, out, st)
        if (st.st_dev, st.st_ino) not in seen:
            seen.add((st.st_dev, st.st_ino))
            total += st.st_size
    return total


def main(argv=None):
    p = argparse.ArgumentParser(description="build or reuse the vdisk benchmark disks")
    p.add_argument("--cache", help="cache directory (default: %s)" % default_cache_root())
    p.add_argument("--qemu-img", default="qemu-img")
    p.add_argument("names", nargs="*", default=sorted(DEPENDS), help="fixtures (default: all)")
    args = p.parse_args(argv)
    fx = Fixtures(args.cache, args.qemu_img)
    fx.ensure(args.names)
    print(json.dumps(fx.manifest, indent=2, sort_keys=True))
    return 0


if __name__ == "__main__":
    sys.exit(main())

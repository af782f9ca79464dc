#!/usr/bin/env python3
"""vdisk against qemu-img on real guest disks, side by side.  Python stdlib only.

    make bench                                   # all cells, 3 rounds
    python3 tests/bench/bench.py --rounds 5 --only check,compare --json out.json

The disks (a Debian root file system from debootstrap, a bigger one with real files of this
machine) are built once by build_disks.py and kept in its cache directory.  For each cell both
tools run once untimed (warm-up: afterwards both read their input from the page cache; vdisk's
output of that run is verified with qemu-img), then in alternating rounds, ABBA: vdisk, qemu-img, qemu-img, vdisk, ...
for --rounds rounds.  The headline is best against best: the fastest vdisk run over the fastest
qemu-img run, with the target and PASS/MISS on that ratio (noise on this kind of machine only ever
adds time); beside it the median wall times, the median of the per-round ratios, the per-round
figures (all of them in --json) and the peak RSS of each (ru_maxrss of the child, from os.wait4).
Some cells have an absolute target instead: plan-1000 vdisk's best time (no qemu-img counterpart),
sparse-1t vdisk's peak RSS.  Outputs are written to a scratch directory in the cache directory that
is removed when the run ends.  Exit status: 0, or 1 when a cell failed or vdisk's result was
wrong (a slow cell, MISS, is not a failure).
"""
import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))


# what a cell's threshold bounds
RATIO = "ratio"          # best vdisk time / best qemu-img time
SECONDS = "seconds"      # vdisk's best wall time, absolute (a cell without a qemu-img counterpart)
RSS_MB = "rss"           # vdisk's peak RSS in MB (10**6 bytes), the times and ratio shown beside it


class Cell:
    """One benchmarked command: the same arguments for vdisk and qemu-img."""

    def __init__(self, name, title, args, inputs, threshold=None, output=None, verify=None, links=(),
                 target=RATIO, also=(), repeat=1, qemu=True, expect_rc=None, backing=None):
        self.name = name
        self.title = title
        self.args = args            # argv after the program, {in:NAME} / {out} placeholders
        self.inputs = inputs        # fixtures of build_disks.py this cell reads
        self.threshold = threshold  # target (see *target*), None: no target
        self.output = output        # file name of the output in the scratch directory
        self.verify = verify        # qemu-img argv checking vdisk's output
        self.links = links          # (fixture, name): fixtures hard-linked into the scratch dir
        self.target = target        # RATIO, SECONDS or RSS_MB: what threshold bounds
        self.also = list(also)      # further argvs run after args, in the same timed run
        self.repeat = repeat        # a timed run is args + also, this many times (start-up cells)
        self.qemu = qemu            # False: no qemu-img counterpart, vdisk alone is timed
        self.expect_rc = expect_rc  # vdisk's exit status that is right; another one is WRONG
        self.backing = backing      # the backing file name vdisk's output must record

    def argvs(self):
        """The commands of one run (before *repeat*)."""
        return [self.args] + self.also

    @property
    def invocations(self):
        return self.repeat * len(self.argvs())


STARTUP_REPEAT = 10      # start-up cell: a timed run is this many (info, check) pairs: 20 processes

CELLS = [
    Cell("raw-qcow2", "convert raw -> qcow2 (big disk)",
         ["convert", "-f", "raw", "-O", "qcow2", "{in:big.raw}", "{out}"], ["big.raw"], 1.0,
         output="out.qcow2",
         verify=[["compare", "-f", "raw", "-F", "qcow2", "{in:big.raw}", "{out}"],
                 ["check", "-f", "qcow2", "{out}"]]),
    Cell("compressed", "convert -c raw -> qcow2 (small disk)",
         ["convert", "-c", "-f", "raw", "-O", "qcow2", "{in:small.raw}", "{out}"], ["small.raw"], 0.3,
         output="out.qcow2",
         verify=[["compare", "-f", "raw", "-F", "qcow2", "{in:small.raw}", "{out}"],
                 ["check", "-f", "qcow2", "{out}"]]),
    Cell("qcow2-raw", "convert qcow2 -> raw (big disk)",
         ["convert", "-f", "qcow2", "-O", "raw", "{in:big.qcow2}", "{out}"], ["big.qcow2"], 1.0,
         output="out.raw",
         verify=[["compare", "-f", "qcow2", "-F", "raw", "{in:big.qcow2}", "{out}"]]),
    Cell("compressed-raw", "convert compressed qcow2 -> raw (small disk): inflating clusters",
         ["convert", "-f", "qcow2", "-O", "raw", "{in:small-c.qcow2}", "{out}"], ["small-c.qcow2"], 1.0,
         output="out.raw",
         verify=[["compare", "-f", "qcow2", "-F", "raw", "{in:small-c.qcow2}", "{out}"]]),
    Cell("backing", "convert qcow2 -> qcow2 -B base (modified small disk)",
         ["convert", "-f", "qcow2", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
          "{in:modified.qcow2}", "{out}"], ["modified.qcow2", "small.qcow2"], None,
         output="out.qcow2", links=[("small.qcow2", "base.qcow2")], backing="base.qcow2",
         verify=[["compare", "-f", "qcow2", "-F", "qcow2", "{in:modified.qcow2}", "{out}"],
                 ["check", "-f", "qcow2", "{out}"]]),
    Cell("raw-vdi", "convert raw -> vdi (big disk)",
         ["convert", "-f", "raw", "-O", "vdi", "{in:big.raw}", "{out}"], ["big.raw"], 1.0,
         output="out.vdi",
         verify=[["compare", "-f", "raw", "-F", "vdi", "{in:big.raw}", "{out}"],
                 ["check", "-f", "vdi", "{out}"]]),
    Cell("raw-vpc", "convert raw -> vpc (big disk)",
         ["convert", "-f", "raw", "-O", "vpc", "{in:big.raw}", "{out}"], ["big.raw"], 1.0,
         output="out.vhd",
         verify=[["compare", "-f", "raw", "-F", "vpc", "{in:big.raw}", "{out}"]]),
    Cell("raw-vhdx", "convert raw -> vhdx (big disk)",
         ["convert", "-f", "raw", "-O", "vhdx", "{in:big.raw}", "{out}"], ["big.raw"], 1.0,
         output="out.vhdx",
         verify=[["compare", "-f", "raw", "-F", "vhdx", "{in:big.raw}", "{out}"],
                 ["check", "-f", "vhdx", "{out}"]]),
    Cell("vmdk-stream", "convert raw -> vmdk streamOptimized (small disk)",
         ["convert", "-f", "raw", "-O", "vmdk", "-o", "subformat=streamOptimized", "{in:small.raw}", "{out}"],
         ["small.raw"], 0.3, output="out.vmdk",
         verify=[["compare", "-f", "raw", "-F", "vmdk", "{in:small.raw}", "{out}"],
                 ["check", "-f", "vmdk", "{out}"]]),
    Cell("compare", "compare raw vs qcow2, equal (big disk)",
         ["compare", "-f", "raw", "-F", "qcow2", "{in:big.raw}", "{in:big.qcow2}"],
         ["big.raw", "big.qcow2"], 1.0),
    Cell("check", "check qcow2, 4 KiB clusters (big disk)",
         ["check", "-f", "qcow2", "{in:big-4k.qcow2}"], ["big-4k.qcow2"], 0.8),
    Cell("backing-os", "convert qcow2 -> qcow2 -B base (48 MB of guest changes over the big disk)",
         ["convert", "-f", "qcow2", "-O", "qcow2", "-B", "base.qcow2", "-F", "qcow2",
          "{in:os-overlay.qcow2}", "{out}"], ["os-overlay.qcow2", "big.qcow2"], 1.0,
         output="out.qcow2", links=[("big.qcow2", "base.qcow2")], backing="base.qcow2",
         verify=[["compare", "-f", "qcow2", "-F", "qcow2", "{in:os-overlay.qcow2}", "{out}"],
                 ["check", "-f", "qcow2", "{out}"]]),
    Cell("startup", "start-up: %d x (info, check) of a small qcow2, whole processes" % STARTUP_REPEAT,
         ["info", "-f", "qcow2", "{in:startup.qcow2}"], ["startup.qcow2"], 2.0,
         also=[["check", "-f", "qcow2", "{in:startup.qcow2}"]], repeat=STARTUP_REPEAT),
    Cell("plan-1000", "plan of a 1,000-image manifest, no changes (vdisk only)",
         ["plan", "{in:plan-1000}/manifest.yml"], ["plan-1000"], 2.0, target=SECONDS, qemu=False,
         expect_rc=0),
    Cell("sparse-1t", "convert raw -> qcow2 of a 1 TiB sparse image, 1 GiB of data: peak RSS",
         ["convert", "-f", "raw", "-O", "qcow2", "{in:sparse-1t.raw}", "{out}"], ["sparse-1t.raw"], 100,
         target=RSS_MB, output="out.qcow2",
         verify=[["compare", "-f", "raw", "-F", "qcow2", "{in:sparse-1t.raw}", "{out}"],
                 ["check", "-f", "qcow2", "{out}"]]),
]
# encrypted outputs: the same secret for both tools, and PBKDF2 kept short (iter-time 10 ms) so that
# the cell times the encryption of the data, not the key derivation both tools calibrate to a time
SECRET = ["--object", "secret,id=sec0,data=vdisk-bench-secret"]
CELLS += [
    Cell("raw-luks", "convert raw -> luks (big disk)",
         ["convert"] + SECRET + ["-f", "raw", "-O", "luks", "-o", "key-secret=sec0,iter-time=10", "{in:big.raw}", "{out}"],
         ["big.raw"], 1.2, output="out.luks",
         verify=[["compare"] + SECRET + ["--image-opts", "driver=raw,file.filename={in:big.raw}",
                                         "driver=luks,key-secret=sec0,file.filename={out}"]]),
    Cell("raw-qcow2-luks", "convert raw -> qcow2 with LUKS encryption (big disk)",
         ["convert"] + SECRET + ["-f", "raw", "-O", "qcow2", "-o",
                                 "encrypt.format=luks,encrypt.key-secret=sec0,encrypt.iter-time=10", "{in:big.raw}", "{out}"],
         ["big.raw"], 1.2, output="out.qcow2",
         verify=[["compare"] + SECRET + ["--image-opts", "driver=raw,file.filename={in:big.raw}",
                                         "driver=qcow2,encrypt.key-secret=sec0,file.filename={out}"],
                 ["check"] + SECRET + ["--image-opts", "driver=qcow2,encrypt.key-secret=sec0,file.filename={out}"]]),
]
CELL_NAMES = [c.name for c in CELLS]
# qemu-img's PBKDF2 calibration gives up now and then ("Unable to get accurate CPU usage"): run again
CALIBRATION_FAILED = "Unable to get accurate CPU usage"
CALIBRATION_ATTEMPTS = 5


# -- pure helpers (tests/unit/test_bench_script.py) ---------------------------------------
def median(values):
    vals = sorted(values)
    if not vals:
        raise ValueError("median of nothing")
    mid = len(vals) // 2
    return vals[mid] if len(vals) % 2 else (vals[mid - 1] + vals[mid]) / 2.0


def ratios(a_times, b_times):
    """Per-round a/b ratios (a round whose b time is 0 is left out)."""
    return [a / b for a, b in zip(a_times, b_times) if b > 0]


def verdict(value, threshold):
    """PASS when *value* (a ratio, seconds or MB, as the threshold) is within *threshold*."""
    if value is None or threshold is None:
        return "-"
    return "PASS" if value <= threshold else "MISS"


def best_ratio(a_times, b_times):
    """Fastest a run over fastest b run (None without both)."""
    if not a_times or not b_times or min(b_times) <= 0:
        return None
    return min(a_times) / min(b_times)


def rss_mb(kib):
    return None if kib is None else kib * 1024 / 1e6


def judged(result):
    """The value a cell's verdict is on: best/best for a ratio target, vdisk's best time for a
    SECONDS target, vdisk's peak RSS in MB for an RSS_MB target."""
    kind = result.get("target") or RATIO
    v = result.get("vdisk") or {}
    if kind == SECONDS:
        return v.get("best")
    if kind == RSS_MB:
        return rss_mb(v.get("peak_rss_kib"))
    return result.get("best_ratio")


def fmt_seconds(s):
    if s is None:
        return "-"
    return "%.2f" % s if s < 100 else "%.0f" % s


def fmt_ratio(r):
    return "-" if r is None else "%.2fx" % r


def fmt_threshold(t, kind=RATIO):
    if t is None:
        return "-"
    if kind == SECONDS:
        return "<= %g s" % t
    if kind == RSS_MB:
        return "RSS <= %g MB" % t
    return "<= %sx" % ("%.1f" % t if round(t, 1) == t else "%g" % t)


def fmt_rss(kib):
    return "-" if kib is None else "%d MiB" % round(kib / 1024.0)


def parse_only(values, known=CELL_NAMES):
    """--only a,b --only c -> [a, b, c] in the order of *known*; unknown names raise ValueError."""
    if not values:
        return list(known)
    wanted = set()
    for v in values:
        wanted.update(x.strip() for x in v.split(",") if x.strip())
    unknown = sorted(wanted - set(known))
    if unknown:
        raise ValueError("unknown cell(s) %s; cells: %s" % (", ".join(unknown), ", ".join(known)))
    return [k for k in known if k in wanted]


def first_line(text, limit=160):
    for line in (text or "").splitlines():
        if line.strip():
            line = line.strip()
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return ""


PLACEHOLDER = re.compile(r"\{out\}|\{in:([^}]+)\}")


def expand(args, inputs, out):
    """Fill the {in:NAME} and {out} placeholders of an argv (whole arguments or parts of one, as in
    QEMU's image options ``file.filename={out}``)."""
    return [PLACEHOLDER.sub(lambda m: out if m.group(1) is None else inputs[m.group(1)], a) for a in args]


def summarize(result):
    """Add best and median times, ratios and the verdict to a cell result
    {vdisk: {times, rss_kib}, qemu: {...}, threshold, target}.

    The noise here only ever adds time (freed memory handed back to the host, see
    docs/performance.md), so the fastest runs are the steady estimate: the headline ratio
    ("ratio", also "best_ratio") and the verdict are best/best; the median of the per-round ratios
    is kept as "median_ratio", the per-round ones as "ratios"."""
    for side in ("vdisk", "qemu"):
        r = result.get(side) or {}
        r["best"] = min(r["times"]) if r.get("times") else None
        r["median"] = median(r["times"]) if r.get("times") else None
        r["peak_rss_kib"] = max(r["rss_kib"]) if r.get("rss_kib") else None
    v, q = result.get("vdisk") or {}, result.get("qemu") or {}
    vt, qt = v.get("times") or [], q.get("times") or []
    rs = ratios(vt, qt)
    result["ratios"] = rs
    result["median_ratio"] = median(rs) if rs else None
    result["best_ratio"] = best_ratio(vt, qt)
    result["ratio"] = result["best_ratio"]
    result.setdefault("target", RATIO)
    result["judged"] = judged(result)
    result["verdict"] = verdict(result["judged"], result.get("threshold"))
    return result


HEADER = ("cell", "vdisk s", "qemu-img s", "best/best", "target", "result",
          "vdisk med s", "qemu med s", "med ratio", "vdisk RSS", "qemu RSS")
RIGHT = {1, 2, 3, 6, 7, 8, 9, 10}      # right-aligned columns


def format_table(results, markdown=False):
    """The results table, plain text (aligned columns) or markdown."""
    rows = []
    for r in results:
        if r.get("error"):
            rows.append((r["name"], "error: " + r["error"]))
            continue
        v, q = r.get("vdisk") or {}, r.get("qemu") or {}
        result = r.get("verdict", "-")
        if r.get("mismatch"):
            result = "WRONG"
        rows.append((r["name"], fmt_seconds(v.get("best")), fmt_seconds(q.get("best")),
                     fmt_ratio(r.get("best_ratio")), fmt_threshold(r.get("threshold"), r.get("target") or RATIO),
                     result, fmt_seconds(v.get("median")), fmt_seconds(q.get("median")),
                     fmt_ratio(r.get("median_ratio")), fmt_rss(v.get("peak_rss_kib")),
                     fmt_rss(q.get("peak_rss_kib"))))
    if markdown:
        lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
        for row in rows:
            if len(row) == 2:
                row = row + ("",) * (len(HEADER) - 2)
            lines.append("| " + " | ".join(row) + " |")
        return "\n".join(lines)
    widths = [max([len(HEADER[0])] + [len(row[0]) for row in rows])] + [len(h) for h in HEADER[1:]]
    for row in rows:
        if len(row) == len(HEADER):
            widths = [max(w, len(c)) for w, c in zip(widths, row)]
    def line(cells):
        out = []
        for i, c in enumerate(cells):
            out.append(c.rjust(widths[i]) if i in RIGHT else c.ljust(widths[i]))
        return "  ".join(out).rstrip()
    lines = [line(HEADER)]
    for row in rows:
        lines.append(line(row) if len(row) == len(HEADER) else row[0].ljust(widths[0]) + "  " + row[1])
    return "\n".join(lines)


def round_lines(result):
    """The per-round figures of a cell, for the lines under the table."""
    v, q = result.get("vdisk") or {}, result.get("qemu") or {}
    lines = []
    if v.get("times"):
        text = "rounds: vdisk " + " ".join(fmt_seconds(t) for t in v["times"]) + " s"
        if q.get("times"):
            text += "; qemu-img " + " ".join(fmt_seconds(t) for t in q["times"]) + " s"
        if result.get("ratios"):
            text += "; vdisk/qemu " + " ".join(fmt_ratio(x) for x in result["ratios"])
        lines.append(text)
    n = result.get("invocations") or 1
    if n > 1 and v.get("best") is not None:
        text = "per process (best run / %d): vdisk %.0f ms" % (n, v["best"] * 1000.0 / n)
        if q.get("best") is not None:
            text += ", qemu-img %.0f ms" % (q["best"] * 1000.0 / n)
        lines.append(text)
    return lines


# -- running --------------------------------------------------------------------------------
class Run:
    __slots__ = ("rc", "wall", "cpu", "rss_kib", "stdout", "stderr", "timed_out")


def combine(runs):
    """One Run for several processes timed together: wall and CPU times summed, the largest RSS,
    the first failing run's status and output (else the last run's)."""
    if not runs:
        raise ValueError("no runs")
    failed = [r for r in runs if r.rc != 0 or r.timed_out]
    last = failed[0] if failed else runs[-1]
    c = Run()
    c.rc, c.timed_out = last.rc, any(r.timed_out for r in runs)
    c.wall = sum(r.wall for r in runs)
    c.cpu = sum(r.cpu for r in runs)
    c.rss_kib = max(r.rss_kib for r in runs)
    c.stdout, c.stderr = last.stdout, last.stderr
    return c


def run_once(argv, cwd, timeout):
    """Run *argv*; wall time, CPU time and peak RSS of that child alone (os.wait4)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, cwd=cwd, stdin=subprocess.DEVNULL, stdout=out, stderr=err)
        expired = []

        def kill():
            expired.append(True)
            proc.kill()
        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, ru = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)   # keeps Popen from waiting again
        r = Run()
        r.rc, r.wall, r.timed_out = proc.returncode, wall, bool(expired)
        r.cpu = ru.ru_utime + ru.ru_stime
        r.rss_kib = ru.ru_maxrss          # KiB on Linux
        out.seek(0)
        err.seek(0)
        r.stdout = out.read().decode("utf-8", "replace")
        r.stderr = err.read().decode("utf-8", "replace")
        return r


def remove(path):
    """Delete a file or a directory tree, as build_disks does."""
    if HERE not in sys.path:
        sys.path.insert(0, HERE)
    import build_disks
    build_disks.rmtree(path)


def allocated(path):
    try:
        return os.stat(path).st_blocks * 512
    except OSError:
        return None


def failure(tool, r, timeout):
    if r.timed_out:
        return "%s: timed out after %d s" % (tool, timeout)
    # the tool's own first line of stderr (it names the tool: "vdisk: convert: ...", "qemu-img: ...")
    line = first_line(r.stderr) or first_line(r.stdout)
    if line and not line.startswith(tool):
        line = "%s: %s" % (tool, line)
    return line or "%s: exit status %d" % (tool, r.rc)


class Bench:
    def __init__(self, vdisk, qemu_img, fixtures, scratch, rounds, timeout, log=None, settle=0.0):
        self.vdisk = vdisk                # argv prefix
        self.qemu_img = qemu_img          # argv prefix
        self.fixtures = fixtures
        self.scratch = scratch
        self.rounds = rounds
        self.timeout = timeout
        self.settle = settle
        self.log = log or (lambda msg: sys.stderr.write(msg + "\n"))

    def inputs(self):
        if HERE not in sys.path:
            sys.path.insert(0, HERE)
        import build_disks
        return {name: self.fixtures.path(name) for name in build_disks.DEPENDS}

    def run_cell(self, cell):
        result = {"name": cell.name, "title": cell.title, "threshold": cell.threshold, "target": cell.target,
                  "command": " ; ".join(" ".join(a) for a in cell.argvs()), "invocations": cell.invocations,
                  "error": None, "mismatch": None}
        work = os.path.join(self.scratch, cell.name)
        os.makedirs(work)
        try:
            for fixture, name in cell.links:
                try:
                    os.link(self.fixtures.path(fixture), os.path.join(work, name))
                except OSError:
                    shutil.copy2(self.fixtures.path(fixture), os.path.join(work, name))
            self._run_cell(cell, work, result)
        finally:
            remove(work)
        return summarize(result)

    def _one(self, tool_name, tool, cell, work, repeat=None):
        """One timed run of *cell* by *tool*: its commands, *repeat* times (default the cell's),
        each a process of its own.  Returns (output path or None, [Run per process])."""
        out = os.path.join(work, cell.output) if cell.output else None
        if out:
            remove(out)
        subprocess.run(["sync"])          # no write-back of the previous output during this run
        if self.settle:
            time.sleep(self.settle)       # every run starts in the same state: freed memory handed back
        runs = []
        for dummy in range(cell.repeat if repeat is None else repeat):
            for args in cell.argvs():
                argv = tool + expand(args, self.inputs(), out)
                for attempt in range(CALIBRATION_ATTEMPTS):
                    r = run_once(argv, work, self.timeout)
                    if r.rc == 0 or CALIBRATION_FAILED not in r.stderr:
                        break
                    if out:
                        remove(out)
                runs.append(r)
                if r.rc != 0 and cell.expect_rc is None and args[0] != "compare":
                    return out, runs          # a failing command: no point in the rest of the run
        return out, runs

    def _run_cell(self, cell, work, result):
        v_stats = {"times": [], "cpu": [], "rss_kib": []}
        q_stats = {"times": [], "cpu": [], "rss_kib": []}
        result["vdisk"], result["qemu"] = v_stats, q_stats
        # warm-up, untimed, each command once: qemu-img first (its result is the reference), then vdisk
        q_runs, q = None, None
        if cell.qemu:
            self.log("[%s] warm-up qemu-img" % cell.name)
            q_out, q_runs = self._one("qemu-img", self.qemu_img, cell, work, repeat=1)
            q = combine(q_runs)
            if q.rc != 0 and not (cell.args[0] == "compare" and q.rc == 1):
                result["error"] = failure("qemu-img", q, self.timeout)
                return
            result["qemu_output_bytes"] = allocated(q_out) if q_out else None
        self.log("[%s] warm-up vdisk" % cell.name)
        v_out, v_runs = self._one("vdisk", self.vdisk, cell, work, repeat=1)
        v = combine(v_runs)
        if v.rc != 0 and cell.expect_rc is None and not (cell.args[0] == "compare" and v.rc == 1):
            result["error"] = failure("vdisk", v, self.timeout)
            return
        result["vdisk_output_bytes"] = allocated(v_out) if v_out else None
        result["mismatch"] = self.verify(cell, work, v_out, v_runs, q_runs)
        if result["mismatch"]:
            self.log("!!! %s: vdisk's result is WRONG: %s" % (cell.name, result["mismatch"]))
        pair = (("vdisk", self.vdisk, v_stats), ("qemu-img", self.qemu_img, q_stats))
        if not cell.qemu:
            pair = pair[:1]
        for i in range(self.rounds):
            # ABBA order: neither tool always runs right after the other's output was removed (freed
            # page cache is handed back to the host in the background, and a run that meets it pays)
            for name, tool, stats in (pair if i % 2 == 0 else pair[::-1]):
                _, runs = self._one(name, tool, cell, work)
                r = combine(runs)
                if r.rc != (v.rc if name == "vdisk" else q.rc):
                    result["error"] = failure(name, r, self.timeout) + " (round %d)" % (i + 1)
                    return
                stats["times"].append(r.wall)
                stats["cpu"].append(r.cpu)
                stats["rss_kib"].append(r.rss_kib)
                self.log("[%s] round %d %-8s %7.2f s  cpu %7.2f s  rss %s"
                         % (cell.name, i + 1, name, r.wall, r.cpu, fmt_rss(r.rss_kib)))

    def verify(self, cell, work, v_out, v_runs, q_runs):
        """None when vdisk did what qemu-img does, else what is wrong (*v_runs*, *q_runs*: the
        warm-up's Runs, one per command of the cell; *q_runs* None for a vdisk-only cell)."""
        if cell.expect_rc is not None:
            return expected_status(cell, v_runs)
        if v_out is None:
            # commands that read only (compare, check, info): the same status and output as qemu-img
            for args, v, q in zip(cell.argvs(), v_runs, q_runs):
                what = args[0] + ": " if len(v_runs) > 1 else ""
                if v.rc != q.rc:
                    return "%sexit status %d, qemu-img's %d" % (what, v.rc, q.rc)
                if v.stdout.strip() != q.stdout.strip():
                    return "%soutput %r, qemu-img's %r" % (what, first_line(v.stdout), first_line(q.stdout))
                if args[0] == "compare" and v.rc != 0:
                    return "equal images reported different"
            return None
        # convert: vdisk's output of the warm-up run, checked by qemu-img
        problems = []
        for argv in cell.verify or ():
            c = run_once(self.qemu_img + expand(argv, self.inputs(), v_out), work, self.timeout)
            if c.rc != 0:
                problems.append("qemu-img %s: %s" % (argv[0], first_line(c.stdout) or first_line(c.stderr)
                                                     or "exit status %d" % c.rc))
        if cell.backing:
            info = run_once(self.qemu_img + ["info", "--output=json", v_out], work, self.timeout)
            try:
                backing = json.loads(info.stdout).get("backing-filename")
            except ValueError:
                backing = None
            if backing != cell.backing:
                problems.append("backing file %r, not %r" % (backing, cell.backing))
        remove(v_out)
        return "; ".join(problems) or None


def expected_status(cell, runs):
    """None when every run of a vdisk-only cell exited with the cell's expected status."""
    for args, r in zip(cell.argvs(), runs):
        if r.rc != cell.expect_rc:
            said = first_line(r.stderr) or first_line(r.stdout)
            return "%s: exit status %d, expected %d%s" % (args[0], r.rc, cell.expect_rc,
                                                          " (%s)" % said if said else "")
    return None


def tool_argv(value, default):
    return shlex.split(value) if value else default


def default_vdisk():
    if os.environ.get("VDISK"):
        return shlex.split(os.environ["VDISK"])
    venv = os.path.join(REPO, ".venv", "bin", "vdisk")
    if os.access(venv, os.X_OK):
        return [venv]
    if shutil.which("vdisk"):
        return ["vdisk"]
    return [sys.executable, "-m", "ansible_collections.vdisk.images.plugins.module_utils.vdisk"]


def host_info(qemu_img):
    try:
        qv = subprocess.run(qemu_img + ["--version"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        qv = "?"
    return {"date": time.strftime("%Y-%m-%d"), "cpus": os.cpu_count(), "machine": platform.machine(),
            "kernel": platform.release(), "python": platform.python_version(), "qemu_img": qv,
            "loadavg": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None):
    p = argparse.ArgumentParser(description="vdisk against qemu-img on real guest disks",
                                epilog="cells: " + ", ".join(CELL_NAMES))
    p.add_argument("--rounds", type=int, default=3, help="timed runs of each tool per cell (default 3)")
    p.add_argument("--only", action="append", metavar="CELL[,CELL]", help="run these cells only")
    p.add_argument("--json", metavar="FILE", help="also write the results to FILE")
    p.add_argument("--cache", help="fixture cache directory (default: build_disks.py's)")
    p.add_argument("--vdisk", help="vdisk command (default: $VDISK, .venv/bin/vdisk, vdisk)")
    p.add_argument("--qemu-img", help="qemu-img command (default: qemu-img)")
    p.add_argument("--timeout", type=float, default=3600, help="seconds one command may take (default 3600)")
    p.add_argument("--markdown", action="store_true", help="print the table as markdown")
    p.add_argument("--settle", type=float, default=0.0, metavar="SECONDS",
                   help="wait this long before each run, after the previous output is removed (default 0)")
    args = p.parse_args(argv)
    if args.rounds < 1:
        p.error("--rounds must be at least 1")
    try:
        names = parse_only(args.only)
    except ValueError as exc:
        p.error(str(exc))
    cells = [c for c in CELLS if c.name in names]

    sys.path.insert(0, HERE)
    import build_disks

    qemu_img = tool_argv(args.qemu_img, ["qemu-img"])
    vdisk = tool_argv(args.vdisk, None) or default_vdisk()
    load_before = [round(x, 2) for x in os.getloadavg()]
    fixtures = build_disks.Fixtures(args.cache, qemu_img[0])
    t_start = time.monotonic()
    fixtures.ensure(sorted({i for c in cells for i in c.inputs}))
    t_fixtures = time.monotonic() - t_start

    scratch = tempfile.mkdtemp(prefix="scratch-", dir=fixtures.root)
    bench = Bench(vdisk, qemu_img, fixtures, scratch, args.rounds, args.timeout, settle=args.settle)
    results = []
    try:
        for cell in cells:
            try:
                results.append(bench.run_cell(cell))
            except OSError as exc:               # e.g. a tool that cannot be started
                results.append(summarize({"name": cell.name, "title": cell.title, "threshold": cell.threshold,
                                          "target": cell.target, "error": "cannot run: %s" % exc,
                                          "mismatch": None}))
    finally:
        remove(scratch)
    total = time.monotonic() - t_start

    info = host_info(qemu_img)
    info["loadavg_before"] = load_before
    print("vdisk bench %s: %d cpus, %s, python %s, %d round(s); vdisk = %s"
          % (info["date"], info["cpus"], info["qemu_img"], info["python"], args.rounds, " ".join(vdisk)))
    print("load average (1 min) before %.2f, after %.2f: other work on the machine makes wall times noisy,"
          " see the CPU times below" % (load_before[0], info["loadavg"][0]))
    print()
    print(format_table(results, markdown=args.markdown))
    print()
    for r in results:
        print("%-11s %s" % (r["name"], r["title"]))
        for text in round_lines(r):
            print("%-11s %s" % ("", text))
        if r.get("mismatch"):
            print("%-11s !!! WRONG RESULT: %s" % ("", r["mismatch"]))
        if r.get("vdisk_output_bytes") is not None and r.get("qemu_output_bytes") is not None:
            print("%-11s output: vdisk %.1f MB, qemu-img %.1f MB allocated"
                  % ("", r["vdisk_output_bytes"] / 1e6, r["qemu_output_bytes"] / 1e6))
        v, q = r.get("vdisk") or {}, r.get("qemu") or {}
        if v.get("cpu") and q.get("cpu"):
            print("%-11s cpu (user+sys, median): vdisk %.2f s, qemu-img %.2f s"
                  % ("", median(v["cpu"]), median(q["cpu"])))
        elif v.get("cpu"):
            print("%-11s cpu (user+sys, median): vdisk %.2f s" % ("", median(v["cpu"])))
    print()
    print("fixtures %s (%s); bench took %.0f s, of which %.0f s building fixtures"
          % (fixtures.root, "built: " + ", ".join(fixtures.built) if fixtures.built else "all reused",
             total, t_fixtures))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"host": info, "rounds": args.rounds, "vdisk": vdisk, "fixtures": fixtures.manifest,
                       "seconds": round(total, 1), "fixture_seconds": round(t_fixtures, 1),
                       "cells": results}, f, indent=2)
    failed = [r["name"] for r in results if r.get("error") or r.get("mismatch")]
    if failed:
        sys.stderr.write("bench: failed or wrong: %s\n" % ", ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

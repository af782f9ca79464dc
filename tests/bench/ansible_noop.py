"""How long a playbook that changes nothing takes: 60 images under vdisk.images vs a stat loop.

Issue 15's target: the images role (one vdisk.images.manifest task) completes a no-change run over 60
images in at most 0.5x the time of an ``ansible.builtin.stat`` loop over the same files (issue 5 asked
for under 2x with the old seven-task role). This script makes the images
(first run, not timed), then times, in alternating rounds on localhost:

- ``role``: the ``vdisk.images.images`` role applying the specs (what users run);
- ``module``: ``vdisk.images.image`` in a loop over the specs (the module alone);
- ``stat``: ``ansible.builtin.stat`` in a loop over the files;

each a whole ``ansible-playbook`` run (start-up included, as a user sees it), and prints the median
of each and the ratios to ``stat``. Every timed vdisk run must report ``changed=0``.

Usage: python tests/bench/ansible_noop.py [--images 60] [--rounds 5] [--collections-path DIR]
(``make bench-ansible`` runs it on the working tree's collection.) Exit 1 when the role's ratio is
above 0.5, or a timed run changed something.
"""
import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

TARGET = 0.5      # issue 15: role / stat for a no-change run

PLAYBOOKS = {
    "role": """
- hosts: localhost
  connection: local
  gather_facts: false
  vars:
    images_dir: {dir}
    images_list: {specs}
  roles:
    - role: vdisk.images.images
""",
    "module": """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: The images
      vdisk.images.image:
        path: "{dir}/{{{{ item.path }}}}"
        size: "{{{{ item.size }}}}"
      loop: {specs}
""",
    "stat": """
- hosts: localhost
  connection: local
  gather_facts: false
  tasks:
    - name: The image files
      ansible.builtin.stat:
        path: "{dir}/{{{{ item.path }}}}"
      loop: {specs}
""",
}


def run(playbook, env):
    """Seconds one ansible-playbook run takes, and its output."""
    start = time.perf_counter()
    proc = subprocess.run(["ansible-playbook", "-i", "localhost,", playbook], env=env, check=False,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    elapsed = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stdout)
        raise SystemExit("ansible_noop: %s failed (exit %d)" % (playbook, proc.returncode))
    return elapsed, proc.stdout


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--images", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--collections-path", help="ANSIBLE_COLLECTIONS_PATH (default: as configured)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary directory")
    args = parser.parse_args()

    env = dict(os.environ, ANSIBLE_NOCOLOR="1", ANSIBLE_LOCALHOST_WARNING="0",
               ANSIBLE_INVENTORY_UNPARSED_WARNING="0", ANSIBLE_PYTHON_INTERPRETER=sys.executable)
    if args.collections_path:
        env["ANSIBLE_COLLECTIONS_PATH"] = args.collections_path
    work = tempfile.mkdtemp(prefix="vdisk-ansible-noop-")
    try:
        images = os.path.join(work, "images")
        os.mkdir(images)
        specs = "[%s]" % ", ".join("{path: disk%02d.qcow2, size: %dM}" % (i, 16 + i) for i in range(args.images))
        books = {}
        for name, text in PLAYBOOKS.items():
            books[name] = os.path.join(work, name + ".yml")
            with open(books[name], "w") as f:
                f.write(text.format(dir=images, specs=specs))

        first, out = run(books["role"], env)
        made = sorted(os.listdir(images))
        if len(made) != args.images:
            raise SystemExit("ansible_noop: the first run made %d images, not %d" % (len(made), args.images))
        print("first run (creates %d qcow2 images): %.2f s" % (args.images, first))

        times = {name: [] for name in PLAYBOOKS}
        for _round in range(args.rounds):
            for name in PLAYBOOKS:
                elapsed, out = run(books[name], env)
                if name != "stat" and "changed=0 " not in out:
                    sys.stderr.write(out)
                    raise SystemExit("ansible_noop: the %s run changed something" % name)
                times[name].append(elapsed)

        median = {name: statistics.median(t) for name, t in times.items()}
        print("no-change runs over %d images, median of %d rounds (whole ansible-playbook runs):"
              % (args.images, args.rounds))
        for name in PLAYBOOKS:
            print("  %-6s %6.2f s  (%s)%s" % (name, median[name], " ".join("%.2f" % t for t in times[name]),
                                           "" if name == "stat" else
                                           "  ratio to stat: %.2f" % (median[name] / median["stat"])))
        ratio = median["role"] / median["stat"]
        verdict = "PASS" if ratio <= TARGET else "FAIL"
        print("%s: role / stat = %.2f (target <= %s)" % (verdict, ratio, TARGET))
        return 0 if ratio <= TARGET else 1
    finally:
        if args.keep:
            print("kept", work)
        else:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

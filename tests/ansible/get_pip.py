"""A stand-in for pip's get-pip.py, placed where ansible-test looks for its cached copy.

ansible-test bootstraps pip into each virtual environment it creates (sanity tests, --venv) by
running ``get-pip.py``, which it downloads from a host these machines cannot reach unless a copy
is cached at ``$HOME/.ansible/test/cache/get_pip_<version>.py`` (``make`` gives the Ansible tools
``HOME=tests/output/home``). ``make test`` copies this file there
(see the Makefile's ``ansible-env`` target). It bootstraps pip with ``ensurepip`` and then runs
``pip install`` with the arguments ansible-test gave (``pip==<version>`` and pip options), so the
virtual environment ends up with the pip version ansible-test asked for when the package index
has it, and with the Python's bundled pip otherwise.

The environment is captured before ensurepip runs: ensurepip sets ``PIP_CONFIG_FILE=/dev/null``,
which would hide this machine's package-index settings from the second step.
"""
from __future__ import annotations

import os
import subprocess
import sys

MARKER = 'vdisk get-pip stand-in'
GET_PIP_ONLY = ('--no-setuptools', '--no-wheel', '--no-pip')


def main():
    env = dict(os.environ)
    args = [arg for arg in sys.argv[1:] if arg not in GET_PIP_ONLY]
    subprocess.check_call([sys.executable, '-m', 'ensurepip', '--upgrade', '--default-pip'],
                          env=dict(env), stdout=subprocess.DEVNULL)
    wanted = [arg for arg in args if not arg.startswith('-')]
    if not wanted:
        return 0
    status = subprocess.call([sys.executable, '-m', 'pip', 'install', '--quiet'] + args, env=env)
    if status:
        sys.stderr.write('%s: pip install %s failed (exit %d); keeping the pip that ensurepip '
                         'installed\n' % (MARKER, ' '.join(args), status))
    return 0


if __name__ == '__main__':
    sys.exit(main())

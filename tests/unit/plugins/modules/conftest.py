"""Run a module's main() in-process: arguments through ansible's patch_module_args, results through
exit_json/fail_json patched to raise (the usual AnsibleExitJson/AnsibleFailJson pattern)."""
import pytest

try:
    from ansible.module_utils import basic
    from ansible.module_utils.testing import patch_module_args
except ImportError:     # plain `python3 -m pytest` without ansible-core: the tests skip themselves
    basic = patch_module_args = None


class AnsibleExitJson(Exception):
    """exit_json was called."""


class AnsibleFailJson(Exception):
    """fail_json was called."""


def _exit_json(self, **kwargs):
    kwargs.setdefault("changed", False)
    raise AnsibleExitJson(kwargs)


def _fail_json(self, **kwargs):
    kwargs["failed"] = True
    raise AnsibleFailJson(kwargs)


@pytest.fixture
def run_module(monkeypatch):
    """``run_module(module, args, check_mode=False, diff=False) -> (failed, result)``."""
    monkeypatch.setattr(basic.AnsibleModule, "exit_json", _exit_json)
    monkeypatch.setattr(basic.AnsibleModule, "fail_json", _fail_json)

    def run(module, args, check_mode=False, diff=False):
        args = dict(args, _ansible_check_mode=check_mode, _ansible_diff=diff)
        with patch_module_args(args):
            try:
                module.main()
            except AnsibleExitJson as exc:
                return False, exc.args[0]
            except AnsibleFailJson as exc:
                return True, exc.args[0]
        raise AssertionError("the module returned without exit_json or fail_json")
    return run

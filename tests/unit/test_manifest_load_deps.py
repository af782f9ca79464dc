"""PyYAML and jsonschema: declared dependencies, imported only when a manifest file is read.

The Ansible module imports the manifest code on managed hosts that may have only the standard
library: ``load_data`` (its ``images`` data) needs neither package, and a missing package makes
``load_manifests`` report one short problem per manifest, never an ImportError.
"""
import ast
import os
import re
import subprocess
import sys
import textwrap

import pytest

from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest.load import load_data, load_manifests

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
ENGINE = os.path.join(REPO, "plugins", "module_utils", "vdisk")
MANIFEST = "version: 1\nimages:\n  - {path: a.qcow2, size: 1M}\n"


@pytest.fixture
def without(monkeypatch):
    """Make the named packages unimportable (a None entry in sys.modules makes ``import`` fail)."""
    def hide(*names):
        for name in names:
            for loaded in [m for m in sys.modules if m == name or m.startswith(name + ".")]:
                monkeypatch.delitem(sys.modules, loaded)
            monkeypatch.setitem(sys.modules, name, None)
    return hide


def test_load_data_needs_neither_package(tmp_path, without):
    without("yaml", "jsonschema")
    loaded = load_data([{"path": "a.qcow2", "size": "1M", "mode": "0640"}, {"path": "b.qcow2", "size": "lots"}],
                       {"format": "qcow2"}, str(tmp_path))
    assert [e.name for e in loaded.entries] == ["a.qcow2"]
    assert [(p.index, p.field) for p in loaded.problems] == [(1, "size")]


@pytest.mark.parametrize("package, message", [
    ("yaml", "reading a manifest file needs the Python package PyYAML (pip install PyYAML)"),
    ("jsonschema", "validating a manifest file needs the Python package jsonschema (pip install jsonschema)"),
])
def test_a_missing_package_is_one_problem_per_manifest(tmp_path, without, package, message):
    first, second = tmp_path / "a.yml", tmp_path / "b.yml"
    first.write_text(MANIFEST)
    second.write_text(MANIFEST.replace("a.qcow2", "b.qcow2"))
    without(package)
    loaded = load_manifests([str(first), str(second)])
    assert [str(p) for p in loaded.problems] == ["%s: %s" % (first, message), "%s: %s" % (second, message)]
    assert loaded.entries == []


def test_the_engine_imports_without_either_package(tmp_path):
    """In a fresh interpreter where importing yaml or jsonschema fails: the manifest code imports,
    load_data works, load_manifests reports the missing package."""
    (tmp_path / "m.yml").write_text(MANIFEST)
    script = textwrap.dedent("""
        import builtins, sys
        real_import = builtins.__import__
        def refuse(name, *args, **kwargs):
            if name.split(".")[0] in ("yaml", "jsonschema"):
                raise ImportError("No module named %r" % name)
            return real_import(name, *args, **kwargs)
        builtins.__import__ = refuse
        from ansible_collections.vdisk.images.plugins.module_utils.vdisk.manifest import load
        data = load.load_data([{"path": "a.qcow2", "size": "1M"}], base_dir=sys.argv[1])
        files = load.load_manifests([sys.argv[1] + "/m.yml"])
        assert "yaml" not in sys.modules and "jsonschema" not in sys.modules
        print(len(data.entries), len(data.problems))
        print(*[p.message for p in files.problems], sep="\\n")
    """)
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path)))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [
        "1 0", "reading a manifest file needs the Python package PyYAML (pip install PyYAML)"]


def dependencies():
    """[project].dependencies of pyproject.toml (tomllib on Python 3.11+, else read with a regex)."""
    path = os.path.join(REPO, "pyproject.toml")
    try:
        import tomllib
    except ImportError:
        with open(path) as f:
            text = f.read()
        project = re.search(r"^\[project\]\s*$(.*?)(?=^\[|\Z)", text, re.M | re.S).group(1)
        listed = re.search(r"^dependencies\s*=\s*\[(.*?)\]", project, re.M | re.S).group(1)
        return re.findall(r"[\"']([^\"']+)[\"']", listed)
    with open(path, "rb") as f:
        return tomllib.load(f)["project"]["dependencies"]


def test_pyproject_declares_pyyaml_and_jsonschema():
    names = [re.match(r"[A-Za-z0-9_.-]+", d).group(0).lower() for d in dependencies()]
    assert "pyyaml" in names and "jsonschema" in names


def test_no_yaml_parser_or_schema_validator_of_our_own():
    assert not os.path.exists(os.path.join(ENGINE, "manifest", "yamlload.py"))
    assert not os.path.exists(os.path.join(ENGINE, "schema", "validator.py"))


def test_yaml_and_jsonschema_are_never_imported_at_module_level():
    """Only inside functions: the engine is imported by Ansible modules on stdlib-only hosts."""
    offenders = []
    for root, _dirs, files in os.walk(ENGINE):
        for name in files:
            if not name.endswith(".py"):
                continue
            path = os.path.join(root, name)
            with open(path) as f:
                tree = ast.parse(f.read(), path)
            for node in tree.body:
                if isinstance(node, ast.Import):
                    modules = [alias.name for alias in node.names]
                elif isinstance(node, ast.ImportFrom):
                    modules = [node.module or ""] if node.level == 0 else []
                else:
                    continue
                if any(m.split(".")[0] in ("yaml", "jsonschema") for m in modules):
                    offenders.append(os.path.relpath(path, REPO))
    assert offenders == []

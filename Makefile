# vdisk: make demo | make test | make test-slow
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
PYTEST_ARGS ?=

# The Ansible tooling (docs/testing-ansible.md): ansible-core 2.19 (runs on the controller's Python 3.11)
# and molecule 26 in the same venv; ansible-test runs in a copy of the collection laid out as
# tests/output/run-XXXXXX/ansible_collections/vdisk/images (tests/ansible/collection_tree.py)
ANSIBLE_PINS := "ansible-core>=2.19,<2.20" "molecule>=26,<27"
ASTAMP   := $(VENV)/.ansible-2.19-molecule-26
PYTHONS   = $(CURDIR)/$(VENV)/pythons
# python3.9 ... python3.13 (pyenv's, where there is one) on PATH, so sanity compiles and imports the
# engine and the modules on every Python they support. The Ansible tools get a home of their own in the
# working tree (tests/output/home): ansible-test's venvs and caches, molecule's collection install and
# ansible's tmp go there, so ~/.ansible is left as it was and no installed copy shadows this tree
AHOME     = $(CURDIR)/tests/output/home
AENV      = HOME="$(AHOME)" ANSIBLE_HOME="$(AHOME)/.ansible" PATH="$(PYTHONS):$(CURDIR)/$(VENV)/bin:$$PATH" \
            ANSIBLE_NOCOLOR=1 NO_COLOR=1 ANSIBLE_REMOTE_TMP="$(AHOME)/.ansible/tmp"
SANITY_ARGS ?=
INTEGRATION_ARGS ?=

.PHONY: all venv demo test test-slow qemu clean bench fuzz ansible-env sanity units integration molecule \
        test-ansible bench-ansible docs collection-test lint

all: test

# Debian's python3 lacks ensurepip until python3-venv is installed: install it with apt-get then
$(STAMP): pyproject.toml setup.py
	$(PYTHON) -m venv $(VENV) || { rm -rf $(VENV); \
	  echo "$(PYTHON) -m venv failed: installing python3-venv"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq python3-venv && \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet setuptools wheel "PyYAML>=5.1" "jsonschema>=3.2" "pytest>=7" "hypothesis>=6" \
		"backports.zstd; python_version < '3.14'" "cryptography>=3.4" "numpy>=1.21" "zlib-ng>=0.4" "deflate>=0.7"
	touch $(STAMP)

# the venv sees the working tree: the package is installed from it on every run (cheap, no network)
venv: $(STAMP)
	$(PY) -m pip install --quiet --no-deps --no-build-isolation --force-reinstall . >/dev/null
	rm -rf build *.egg-info

# the oracle (qemu-utils) and the tools that make the read-only formats' test images
ORACLE_TOOLS := qemu-img:qemu-utils qemu-io:qemu-utils qemu-nbd:qemu-utils create_compressed_fs:cloop-utils bximage:bximage \
                genisoimage:genisoimage xorriso:xorriso
qemu:
	@missing=$$(for t in $(ORACLE_TOOLS); do command -v $${t%%:*} >/dev/null || echo $${t#*:}; done | sort -u); \
	[ -z "$$missing" ] || { \
	  echo "installing" $$missing "(the test oracle and image-making tools)"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq $$missing; }

$(ASTAMP): $(STAMP)
	$(PY) -m pip install --quiet $(ANSIBLE_PINS)
	touch $(ASTAMP)

# the docs site's tools (make docs): antsibull-docs 2 (Sphinx comes with it) and the theme its sites use
DOCS_PINS := "antsibull-docs>=2.28,<3" "sphinx-ansible-theme>=0.9"
DSTAMP    := $(VENV)/.antsibull-docs-2
$(DSTAMP): $(ASTAMP)
	$(PY) -m pip install --quiet $(DOCS_PINS)
	touch $(DSTAMP)

# the release checks' tools (make lint): antsibull-changelog, ansible-lint 26, ansible-builder 3 (for
# meta/execution-environment.yml), installed with the Ansible pins so ansible-core stays 2.19
LINT_PINS := "antsibull-changelog>=0.36" "ansible-lint>=26,<27" "ansible-builder>=3.2,<4"
LSTAMP    := $(VENV)/.ansible-lint-26
$(LSTAMP): $(ASTAMP)
	$(PY) -m pip install --quiet $(ANSIBLE_PINS) $(LINT_PINS)
	touch $(LSTAMP)

# ansible-test needs: the Pythons, and pip's bootstrap script, which it downloads from a host these machines
# cannot reach unless a copy is cached: tests/ansible/get_pip.py stands in for it (ensurepip, then pip
# install); a real cached copy is kept
ansible-env: venv $(ASTAMP)
	@mkdir -p $(PYTHONS) $(CURDIR)/tests/output $(AHOME)
	@for p in $${PYENV_ROOT:-$$HOME/.pyenv}/versions/3.*/bin/python3.*; do \
	  case "$${p##*/}" in python3.9|python3.1[0-9]) [ -x "$$p" ] && ln -sfn "$$p" $(PYTHONS)/ ;; esac; done; true
	@v=$$($(PY) -c 'import ansible_test, os, re; \
	  s = open(os.path.join(os.path.dirname(ansible_test.__file__), "_internal", "python_requirements.py")).read(); \
	  print(re.search(r"pip=.([0-9.]+).", s).group(1).replace(".", "_"))'); \
	  f=$(AHOME)/.ansible/test/cache/get_pip_$$v.py; mkdir -p $${f%/*}; \
	  if [ ! -e $$f ] || grep -q 'vdisk get-pip stand-in' $$f; then cp tests/ansible/get_pip.py $$f.$$$$ && mv $$f.$$$$ $$f; fi

# ... and the collection at .../ansible_collections/vdisk/images: each run works in a fresh copy of its
# own, tests/output/run-XXXXXX/ansible_collections/vdisk/images (two runs in one working tree do not
# collide), removed after success and kept after a failure (ansible-test's results are in it)
IN_COLL = root=$$(mktemp -d $(CURDIR)/tests/output/run-XXXXXX) && \
	  coll=$$($(PY) tests/ansible/collection_tree.py $$root) && cd $$coll && $(AENV)
END_COLL = ; rc=$$?; cd $(CURDIR); if [ $$rc = 0 ]; then rm -rf $$root; else echo "kept $$root"; fi; exit $$rc

# every sanity test, on every Python found from 3.9 up (--venv: ansible-test's own venvs, no containers)
sanity: ansible-env
	@$(IN_COLL) ansible-test sanity --venv $(SANITY_ARGS) $(END_COLL)

# the modules' unit tests (tests/unit/plugins/**), on the controller's Python
units: ansible-env
	@if [ -d tests/unit/plugins ]; then \
	  $(IN_COLL) ansible-test units --venv --python 3.11 tests/unit/plugins/ $(END_COLL); \
	else echo "units: no tests/unit/plugins yet: skipped"; fi

# integration targets against localhost, each only once its module exists (plugins/modules/<target>.py)
integration: ansible-env qemu
	@targets=$$(for t in tests/integration/targets/*/; do t=$${t%/}; t=$${t##*/}; \
	  [ -f plugins/modules/$$t.py ] && echo $$t; done); \
	if [ -n "$$targets" ]; then \
	  $(IN_COLL) ansible-test integration --local --python 3.11 $(INTEGRATION_ARGS) $$targets $(END_COLL); \
	else echo "integration: no target's module exists yet: skipped"; fi

# the role's scenario (default driver, localhost): converge, idempotence, verify with qemu-img check
molecule: ansible-env qemu
	@if [ -f plugins/modules/image.py ]; then \
	  $(IN_COLL) molecule test -s default $(END_COLL); \
	else echo "molecule: plugins/modules/image.py does not exist yet: skipped"; fi

test-ansible: sanity units integration molecule

# the collection as a user gets it: the tarball (ansible-galaxy collection build: this tree less build_ignore)
# installed into an empty collections path, tests/output/collection-test/collections; the integration targets
# run there (ansible-test in the installed copy; what it writes into the copy, its results in tests/output and
# tests/integration/inventory, is moved to tests/output/collection-test/integration-output), then the shipped
# demo playbook twice by its name (vdisk.images.demo; its images in its default directory, under TMPDIR).
# `ansible-galaxy collection verify --offline` after the install, after the targets and after the demo: nothing
# may be written into the installed collection. The git repository made at the collections path keeps
# ansible-test from taking this repository (where tests/output is ignored) for the collection's
CTEST = $(CURDIR)/tests/output/collection-test
CTEST_ENV = $(AENV) ANSIBLE_COLLECTIONS_PATH=$(CTEST)/collections ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=0
collection-test: ansible-env qemu $(LSTAMP)
	@rm -rf $(CTEST) && mkdir -p $(CTEST)/dist $(CTEST)/collections $(CTEST)/tmp && \
	$(AENV) ansible-galaxy collection build --output-path $(CTEST)/dist . && \
	tarball=$$(ls $(CTEST)/dist/vdisk-images-*.tar.gz) && \
	$(CTEST_ENV) ansible-galaxy collection install -p $(CTEST)/collections $$tarball && \
	coll=$(CTEST)/collections/ansible_collections/vdisk/images && \
	verify() { printf '\n\033[1m$$ ansible-galaxy collection verify --offline (%s)\033[0m\n' "$$1"; \
	  $(CTEST_ENV) ansible-galaxy collection verify --offline -p $(CTEST)/collections vdisk.images; } && \
	verify "installed" && \
	printf '\n\033[1m$$ ansible-builder introspect; ansible-builder create   (meta/execution-environment.yml)\033[0m\n' && \
	$(CTEST_ENV) ansible-builder introspect --sanitize $(CTEST)/collections | tee $(CTEST)/introspect.txt && \
	grep -q "cryptography.*from collection vdisk.images" $(CTEST)/introspect.txt && \
	mkdir -p $(CTEST)/ee && sed "s|TARBALL|$$tarball|" tests/ansible/ee-definition.yml >$(CTEST)/ee/execution-environment.yml && \
	( cd $(CTEST)/ee && $(AENV) ansible-builder create -f execution-environment.yml --context $(CTEST)/ee/context ) && \
	git init -q $(CTEST)/collections && \
	targets=$$(for t in $$coll/tests/integration/targets/*/; do t=$${t%/}; t=$${t##*/}; \
	  [ -f $$coll/plugins/modules/$$t.py ] && echo $$t; done; true) && \
	( cd $$coll && $(AENV) ansible-test integration --local --python 3.11 $(INTEGRATION_ARGS) $$targets ) && \
	mv $$coll/tests/output $(CTEST)/integration-output && \
	mv $$coll/tests/integration/inventory $(CTEST)/integration-output/ && verify "after the integration targets" && \
	for run in first second; do \
	  printf '\n\033[1m$$ ansible-playbook vdisk.images.demo   (the installed copy, %s run)\033[0m\n' $$run; \
	  $(CTEST_ENV) TMPDIR=$(CTEST)/tmp ansible-playbook vdisk.images.demo >$(CTEST)/demo-$$run.log 2>&1 || { cat $(CTEST)/demo-$$run.log; exit 1; }; \
	  sed -n '/^PLAY RECAP/,$$p' $(CTEST)/demo-$$run.log; done && \
	{ grep -q 'changed=0 ' $(CTEST)/demo-second.log || { echo "collection-test: the second demo run changed something" >&2; exit 1; }; } && \
	{ [ -f $(CTEST)/tmp/vdisk-demo/db.qcow2 ] || { echo "collection-test: the demo made no images in TMPDIR/vdisk-demo" >&2; exit 1; }; } && \
	verify "after the demo playbook"

# a no-change playbook run over 60 images (the images role) against a stat loop over the same files (docs/performance.md)
bench-ansible: ansible-env
	@$(IN_COLL) $(CURDIR)/$(PY) $(CURDIR)/tests/bench/ansible_noop.py --collections-path $$root $(BENCH_ARGS) $(END_COLL)

# the docs site: antsibull-docs makes a Sphinx site of the collection's module and role docs (what ansible-doc
# shows), from a copy of this tree laid out as a collection (tests/ansible/collection_tree.py), and Sphinx
# builds it into tests/output/docs/html (index.html); the Ansible tools' home is tests/output/home (AENV).
# DOCS_ARGS=--fail-on-error (the default) fails on a doc that does not parse; DOCS_ARGS= makes an error page
# for it instead. Offline, Sphinx warns that it cannot fetch the intersphinx inventories (Python's and
# Ansible's docs) and leaves the links into them unresolved
DOCS_OUT  = $(CURDIR)/tests/output/docs
DOCS_ARGS ?= --fail-on-error
docs: venv $(DSTAMP)
	@rm -rf $(DOCS_OUT) && mkdir -p $(DOCS_OUT)/site/rst $(AHOME) && chmod 755 $(DOCS_OUT)/site $(DOCS_OUT)/site/rst && \
	$(PY) tests/ansible/collection_tree.py $(DOCS_OUT)/collections >/dev/null && cd $(DOCS_OUT)/site && \
	export $(AENV) ANSIBLE_COLLECTIONS_PATH=$(DOCS_OUT)/collections ANSIBLE_COLLECTIONS_SCAN_SYS_PATH=0 && \
	antsibull-docs sphinx-init --use-current --dest-dir . --index-rst-source $(CURDIR)/tests/ansible/docs_index.rst \
	  --project vdisk.images --copyright "vdisk developers" --title "vdisk.images" --html-short-title "vdisk.images" \
	  vdisk.images >/dev/null && \
	antsibull-docs --config-file antsibull-docs.cfg collection --cleanup everything --use-current --dest-dir rst \
	  $(DOCS_ARGS) vdisk.images && \
	sphinx-build -q -b html -c . -d $(DOCS_OUT)/site/doctrees rst $(DOCS_OUT)/html && \
	rm -rf $(DOCS_OUT)/collections && echo "docs: $(DOCS_OUT)/html/index.html"

# today's demo, then playbooks/demo.yml with --check --diff on an empty directory (writes nothing), then twice
# (the images role on localhost; the second run changes nothing) with its images in demo/ansible (the playbook's
# own default is $TMPDIR/vdisk-demo, outside the collection); the collection from this tree
demo: venv $(ASTAMP)
	VDISK="$(CURDIR)/$(VENV)/bin/vdisk" PYTHON="$(CURDIR)/$(PY)" bash scripts/demo.sh
	@rm -rf demo/manifest && mkdir -p demo/manifest && cp docs/examples/manifest.yml demo/manifest/
	@printf '\n\033[1m$$ vdisk apply demo/manifest/manifest.yml\033[0m\n'; $(VENV)/bin/vdisk apply demo/manifest/manifest.yml
	@printf '\n\033[1m$$ vdisk plan demo/manifest/manifest.yml   (again: nothing to do)\033[0m\n'; $(VENV)/bin/vdisk plan demo/manifest/manifest.yml
	@if [ -f plugins/modules/image.py ]; then \
	  root=$$(mktemp -d $(CURDIR)/tests/output/demo-XXXXXX) && $(PY) tests/ansible/collection_tree.py $$root >/dev/null && \
	  export ANSIBLE_COLLECTIONS_PATH=$$root && \
	  printf '\n\033[1m$$ ansible-playbook playbooks/demo.yml --check --diff   (an empty directory: nothing written)\033[0m\n'; \
	  rm -rf demo/ansible-check && mkdir demo/ansible-check && \
	  $(AENV) ansible-playbook playbooks/demo.yml --check --diff -e vdisk_demo_dir=$(CURDIR)/demo/ansible-check \
	    >demo/ansible-check.log 2>&1; rc=$$?; cat demo/ansible-check.log; [ $$rc = 0 ] || exit $$rc; \
	  [ -z "$$(ls -A demo/ansible-check)" ] || { echo "demo: --check wrote into demo/ansible-check" >&2; exit 1; }; \
	  for run in first second; do printf '\n\033[1m$$ ansible-playbook playbooks/demo.yml -e vdisk_demo_dir=demo/ansible   (%s run)\033[0m\n' $$run; \
	    $(AENV) ansible-playbook playbooks/demo.yml -e vdisk_demo_dir=$(CURDIR)/demo/ansible \
	      >demo/ansible-$$run.log 2>&1; rc=$$?; \
	    cat demo/ansible-$$run.log; [ $$rc = 0 ] || exit $$rc; done; \
	  rm -rf $$root; \
	  grep -q 'changed=0 ' demo/ansible-second.log || { echo "demo: the second run changed something" >&2; exit 1; }; \
	else echo "demo: plugins/modules/image.py does not exist yet: playbooks/demo.yml skipped"; fi

test: venv qemu
	$(MAKE) --no-print-directory lint
	$(PY) -m pytest -m "not slow" $(PYTEST_ARGS)
	$(MAKE) --no-print-directory test-ansible
	$(MAKE) --no-print-directory collection-test

# the changelog fragments (antsibull-changelog lint) and ansible-lint's production profile on the repository
# (.ansible-lint excludes only what is not Ansible content); the Ansible tools' home is tests/output/home
lint: venv $(LSTAMP)
	@mkdir -p $(AHOME)
	$(AENV) antsibull-changelog lint
	$(AENV) ansible-lint --profile production

test-slow: venv qemu
	$(PY) -m pytest $(PYTEST_ARGS)

# vdisk against qemu-img on real guest disks (built once, cached outside the tree): docs/performance.md
bench: venv qemu
	$(PY) tests/bench/bench.py --vdisk "$(CURDIR)/$(VENV)/bin/vdisk" $(BENCH_ARGS)

# the mutation fuzzer over every format (tests/fuzz/fuzz.py); a crasher is kept in tests/fuzz/crashers
# and replayed by tests/fuzz/test_crashers.py. FUZZ_ARGS="--seconds 3600 --jobs 2 --formats vmdk,vhdx"
FUZZ_ARGS ?= --seconds 600
fuzz: venv qemu
	$(PY) tests/fuzz/fuzz.py $(FUZZ_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info demo .pytest_cache .hypothesis tests/output

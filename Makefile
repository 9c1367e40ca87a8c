# kvmshell: `make demo` sets up and runs, `make test` sets up and tests.
# Both install what is missing on a fresh Debian machine (as root): QEMU through apt, the venv.
PYTHON ?= python3
VENV   := .venv
STAMP  := $(VENV)/.installed-stamp
PYTEST_ARGS ?=

.PHONY: test demo deps system-deps bench screenshots clean

test: deps
	$(VENV)/bin/python -m pytest -n 3 --dist worksteal $(PYTEST_ARGS)

demo: deps
	$(VENV)/bin/kvmshell demo

# real captures of the dashboard on the demo guests (SVG, and PNG through rsvg-convert)
screenshots: deps
	@command -v rsvg-convert >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends librsvg2-bin; } || { echo "screenshots need rsvg-convert: sudo apt-get install librsvg2-bin" >&2; exit 1; }
	$(VENV)/bin/python screenshots/make_screenshots.py

bench: deps
	$(VENV)/bin/python bench/bench_core.py

deps: system-deps $(STAMP)

# QEMU and the venv module come from Debian; as root we install them, otherwise we say what to run.
# gcc and libc6-dev (libc.a) link the Linux lab guest's workload static; its kernel and busybox are
# fetched by the lab itself (apt-get download, cached), not installed. zsh: the tests complete
# kvmshell's command line in it. gnutls-bin: the tests check tls-init's certificates with certtool.
# libvirt: the daemon and its QEMU driver (the tests start their own,
# never the system's), virsh, and libvirt-dev + pkg-config to build the Python binding (the extra
# kvmshell[libvirt]: PyPI has no wheels of it, pip compiles it against these headers).
system-deps:
	@missing=""; \
	command -v qemu-system-x86_64 >/dev/null 2>&1 || missing="$$missing qemu-system-x86"; \
	command -v qemu-img >/dev/null 2>&1 || missing="$$missing qemu-utils"; \
	command -v ip >/dev/null 2>&1 && command -v tc >/dev/null 2>&1 || missing="$$missing iproute2"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	command -v ssh >/dev/null 2>&1 && command -v scp >/dev/null 2>&1 || missing="$$missing openssh-client"; \
	$(PYTHON) -c 'import ensurepip, venv' >/dev/null 2>&1 || missing="$$missing python3-venv"; \
	command -v gcc >/dev/null 2>&1 || missing="$$missing gcc"; \
	test -f /usr/lib/x86_64-linux-gnu/libc.a || missing="$$missing libc6-dev"; \
	command -v zsh >/dev/null 2>&1 || missing="$$missing zsh"; \
	command -v certtool >/dev/null 2>&1 || missing="$$missing gnutls-bin"; \
	test -x /usr/sbin/libvirtd && test -f /usr/lib/x86_64-linux-gnu/libvirt/connection-driver/libvirt_driver_qemu.so \
	  || missing="$$missing libvirt-daemon libvirt-daemon-driver-qemu"; \
	command -v virsh >/dev/null 2>&1 || missing="$$missing libvirt-clients"; \
	command -v pkg-config >/dev/null 2>&1 && pkg-config --exists libvirt || missing="$$missing libvirt-dev pkg-config"; \
	if [ -n "$$missing" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing:$$missing"; \
	    DEBIAN_FRONTEND=noninteractive apt-get update -q && \
	    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends $$missing || exit 1; \
	  else \
	    echo "kvmshell needs:$$missing - run: sudo apt-get install$$missing" >&2; exit 1; \
	  fi; \
	fi

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e '.[test,libvirt]'
	touch $(STAMP)

clean:
	rm -rf $(VENV) .pytest_cache

# ocicache: the module is ocicache.py; nothing here is needed to use it.
PYTHON ?= python3
# Debian packages the integration tests use as real peers (each installs a command of
# the same name).
TEST_TOOLS := skopeo umoci podman docker-registry

.PHONY: test deps help

help:
	@echo "make test   run the whole test suite (installs the test tools when it can)"
	@echo "make deps   install the Debian packages the integration tests use"

# Install the test tools with apt-get when we are root and they are missing.
deps:
	@missing=""; for t in $(TEST_TOOLS); do command -v $$t >/dev/null 2>&1 || [ -x /usr/bin/$$t ] || missing="$$missing $$t"; done; \
	if [ -z "$$missing" ]; then echo "test tools present: $(TEST_TOOLS)"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $(TEST_TOOLS) >/dev/null; \
	else \
		echo "missing test tools:$$missing; their tests will be skipped. Install them with:"; \
		echo "  sudo apt-get install -y --no-install-recommends $(TEST_TOOLS)"; \
	fi

test: deps
	$(PYTHON) test_ocicache.py

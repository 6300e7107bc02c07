# ocicache: the module is ocicache.py; nothing here is needed to use it.
PYTHON ?= python3
# What the integration tests run, as command:Debian-package pairs: the real peers
# (skopeo, umoci, podman, docker-registry) and the tools the tests drive them with;
# GNU tar and bsdtar write the layers the flatten differential test judges.
TEST_TOOLS := skopeo:skopeo umoci:umoci podman:podman docker-registry:docker-registry \
	jq:jq openssl:openssl git:git htpasswd:apache2-utils zstd:zstd xz:xz-utils bzip2:bzip2 \
	tar:tar bsdtar:libarchive-tools
# Before Python 3.14 zstd is read through the backports.zstd module or the zstd program;
# the tests cover both, so both are installed for them (ocicache itself needs neither).
ZSTD_BACKPORT := backports.zstd
# The test tools that come from PyPI: vermin checks that nothing needs a newer Python
# than 3.9.
PIP_TEST_TOOLS := vermin
# The test modules that come from PyPI: oras (oras-py) attaches and reads OCI 1.1
# referrers, the independent client the referrers tests compare with.
PIP_TEST_MODULES := oras

.PHONY: test test-fast stress deps help bench

help:
	@echo "make test   run the whole test suite (installs the test tools when it can)"
	@echo "make test-fast  the suite's fast part: every test that needs no external tool"
	@echo "make stress the reliability and security campaigns at full size (minutes)"
	@echo "make bench  measure pull, push, export and the cache against skopeo, umoci, linuxkit and the limits"
	@echo "make deps   install the Debian packages and PyPI tools the integration tests use"

# Install the missing test tools with apt-get when we are root; otherwise say how.
deps:
	@missing=""; for pair in $(TEST_TOOLS); do command=$${pair%%:*}; \
		command -v $$command >/dev/null 2>&1 || [ -x /usr/sbin/$$command ] || \
		missing="$$missing $${pair#*:}"; done; \
	if [ -z "$$missing" ]; then echo "test tools present"; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		echo "installing$$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq \
			--no-install-recommends $$missing >/dev/null; \
	else \
		echo "missing:$$missing; their tests will be skipped. Install them with:"; \
		echo "  sudo apt-get install -y --no-install-recommends$$missing"; \
	fi
	@$(PYTHON) -c 'import sys; sys.exit(sys.version_info < (3, 14))' 2>/dev/null || \
	$(PYTHON) -c 'import backports.zstd' 2>/dev/null || \
	$(PYTHON) -m pip install -q $(ZSTD_BACKPORT) >/dev/null 2>&1 || \
	echo "missing: $(ZSTD_BACKPORT); its test will be skipped. Install it with:" \
		"$(PYTHON) -m pip install $(ZSTD_BACKPORT)"
	@for tool in $(PIP_TEST_TOOLS); do command -v $$tool >/dev/null 2>&1 || \
		$(PYTHON) -m pip install -q $$tool || \
		echo "missing: $$tool; its test will be skipped. Install it with: pip install $$tool"; \
		done
	@for module in $(PIP_TEST_MODULES); do $(PYTHON) -c "import $$module" 2>/dev/null || \
		$(PYTHON) -m pip install -q $$module || \
		echo "missing: $$module; its tests will be skipped. Install it with: pip install $$module"; \
		done

test: deps
	$(PYTHON) test_ocicache.py

# What .ci/run runs on every other Python version present: the tests that need no
# external tool (the others are not run, and are counted apart from skips).
test-fast:
	OCICACHE_FAST=1 $(PYTHON) test_ocicache.py

# The campaigns of the regular suite at full size: faults, crashes, concurrency, full
# disks (a tmpfs, as root), files planted in the cache, and hostile inputs (400,000
# references against the grammar, the fuzzed parsers, archives and bombs, hostile
# registries, credential hygiene, flattening judged by podman and umoci on random layer
# stacks, hostile gzip streams read checked and unchecked, ls/rm/gc/verify answering with
# their memo as without it). Loopback only, bounded in time; not part of make test.
# OCICACHE_FUZZ_SEED=N
# repeats a run's fuzzing.
HOSTILE_CAMPAIGNS := TestReference.test_generated_references_agree_with_the_grammar \
	TestDigest.test_mutated_digests_raise_only_invalid_digest_errors \
	TestPlatform.test_mutated_platforms_raise_only_ocicache_errors \
	TestDescriptor.test_fuzzed_documents TestCredentials.test_fuzzed_challenges \
	TestCredentials.test_fuzzed_docker_configs \
	TestCredentials.test_broken_helpers_are_one_line_errors_without_the_secret \
	TestCredentialHygiene TestHostileRegistries \
	TestArchives.test_decompression_bombs_stay_within_memory_and_time \
	TestArchives.test_fuzzed_archives TestProviderSettings.test_fuzzed_mirror_files \
	TestPackageResolver.test_fuzzed_and_odd_build_yml \
	TestDiskWrites.test_planted_files_campaign \
	TestFlattenDifferential.test_generated_stacks_agree_with_podman \
	TestSources.test_gzip_streams_read_unchecked_as_checked \
	TestSources.test_a_flatten_of_hostile_gzip_layers_writes_what_their_tars_hold \
	TestMemoDifferential.test_commands_answer_with_a_memo_as_without_one
stress: deps
	OCICACHE_STRESS=1 $(PYTHON) test_ocicache.py TestReliability $(HOSTILE_CAMPAIGNS)

# Not part of test: measures pull, push and export against skopeo, umoci, cp, linuxkit ($LINUXKIT
# or on PATH) and the machine's limits (a quarter of an hour with the shapes). Quick run:
# make bench BENCH_ARGS="--size-mib 64 --rounds 1"; one group: BENCH_ARGS="--only names"
bench: deps
	$(PYTHON) bench_ocicache.py $(BENCH_ARGS)

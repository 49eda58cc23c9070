"""harmodt's benchmarks (pytest-benchmark suites) and the tools around them: ``bench.render``
turns a results file into bench/figures.md's tables. See bench/README.md."""

"""harmodt's benchmarks (pytest-benchmark suites) and the tools around them: ``bench.render``
turns a results file into bench/README.md's table. See bench/README.md."""

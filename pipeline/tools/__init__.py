"""Tools apart from the product: the benchmarks (`make bench`, `bench-scale`, `bench-memory`, `bench-gpu`)
and the memory table of docs/memory.md, with the public full-size configs they build."""

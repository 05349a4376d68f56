"""Benchmarks of cmdlog: the in-process core, HTTP appends, and their peers.

Run them from the repository root as modules (`python -m bench.run`), never
as scripts: `bench/http.py` would shadow the standard library's `http`
package if `bench/` itself were on `sys.path`.
"""

"""Every benchmark, one module each (DESIGN §3, L9): they measure the layers below and are imported by nobody but the
command line. ``python launch/bench.py COMMAND`` runs them (:mod:`offloadfr.bench.cli`); results are committed under
docs/benchmarks/.

- :mod:`offloadfr.bench.rows`: the shared helpers: one JSON row per measurement, its ``env``, markdown tables, a
  configuration measured in its own process;
- :mod:`offloadfr.bench.head`: one head step over the number of classes (``bench.py head``);
- :mod:`offloadfr.bench.kernel`: plain vs fused head kernels over K slots (``bench.py kernel``);
- :mod:`offloadfr.bench.bank`: bank block loads by ``bank.io_threads`` (``bench.py bank``);
- :mod:`offloadfr.bench.data`: our loader against a plain webdataset pipeline, and block order (``bench.py data``);
- :mod:`offloadfr.bench.backbone`: the plain engine against DeepSpeed configs (``bench.py backbone``);
- :mod:`offloadfr.bench.train`: the trainer's step with each head vs backbone only (``bench.py train``);
- :mod:`offloadfr.bench.quality`: every head and margin trained alike (``bench.py quality``).
"""

__all__: list[str] = []

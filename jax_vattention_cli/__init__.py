"""The ``jax-vattention`` command line: the application layer above ``jax_vattention`` and ``models``.

* ``demo``: the cache alone, grown inside a jitted loop (``demo.py``).
* ``generate``: a model on the cache through ``models.Generator`` (``generate.py``).
* ``serve``: the serving engine on a synthetic workload (``serve.py``).
"""

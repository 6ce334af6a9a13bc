"""MoMA-FL's benchmarks (``moma-bench``): not part of the product.

The one package that may import both sides, the coordinator's (:mod:`server`) and the site's
(:mod:`client`); nothing in the product imports it (tests/test_layout.py). The scripts in
``bench/`` are its entry points for figures that are not ``moma-bench accuracy``.
"""

"""Runnable measurements of ufaas, each printing a table: ``python -m bench`` runs the whole
suite against a real server (:mod:`bench.run`); ``python -m bench.pool`` measures the pool alone.
"""

"""Clustering tracks by identity, and everything that judges or follows a clustering.

``parameter_free`` is the method's clustering (per-cluster thresholds, merge
rounds to a fixed point, cannot-link), ``dissimilarity`` the measures it compares
crops with, ``identities`` keeps cluster ids stable across runs and applies
analysts' edits, ``metrics`` scores a clustering against ground truth and
``report`` draws it.
"""

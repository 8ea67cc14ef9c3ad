"""Clustering tracks by identity, and everything that judges or follows a clustering.

``parameter_free`` holds the movie-level entry point (quality screen, then a merge
rule) and the paper's rule (per-cluster thresholds, merge rounds to a fixed point),
``linkage`` the default rule (average linkage under cannot-link, cut at the movie's
own different-person distances), ``dissimilarity`` the measures it compares
crops with, ``identities`` keeps cluster ids stable across runs and applies
analysts' edits, ``metrics`` scores a clustering against ground truth and
``report`` draws it.
"""

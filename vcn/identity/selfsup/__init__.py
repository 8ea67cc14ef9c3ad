"""Self-supervised adaptation of a face-ID backbone to one movie (DESIGN.md section 2).

A student (backbone + :class:`~vcn.identity.selfsup.head.ProjectionHead`) learns to match a
teacher, the exponential moving average of the student (:mod:`vcn.identity.selfsup.ema`), on
positive pairs of face crops, through the centred and sharpened cross-entropy of
:mod:`vcn.identity.selfsup.loss`. The same loss between crops, symmetrised, is the learned
dissimilarity the clustering uses.

Submodules are imported on use; this package imports nothing heavy.
"""

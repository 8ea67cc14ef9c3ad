"""Faces: detection, tracking inside shots, alignment to a backbone's template, the crop filters.

From decoded frames to aligned face chips: ``detection`` finds boxes and five
landmarks, ``tracking`` links them into tracks that never cross a cut, ``align``
warps a face onto a template, ``filters`` and ``crops`` sample and judge a
movie's track crops, and ``loose_crops`` finds and aligns the face in the loose
crops of a track dataset.
"""

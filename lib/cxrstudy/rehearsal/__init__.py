"""A rehearsal of the paper profile on CPU: the real releases' layouts and label files, synthetic
pixels, random stand-ins for every pretrained weight, and params/paper.yaml scaled down.

``make rehearse`` (``python -m cxrstudy.rehearsal``) writes the miniature releases
(:mod:`.releases`) and the weight stand-ins (:mod:`.weights`) under one folder, points
``CXRSTUDY_DATA_ROOT`` and every weight cache at it, and runs every notebook of the paper profile
with only the scale keys of :mod:`.scale` overridden. It proves the paper path runs end to end;
its numbers mean nothing (and every page of its report says so).
"""

"""Dense-feature evaluations beside Patch-Seg, each protocol exact and named in its results.

    python -m fastloc.probe overcluster DATA    Leopart's overclustering (k-means, matched, mIoU)
    python -m fastloc.probe linear DATA         linear probes: leopart-voc, dinov3-ade20k
    python -m fastloc.probe hummingbird DATA    in-context retrieval (memory bank, k-NN transfer)

The recipes: ../shared/methods/OTHER-METHODS.md section 1 and the open-hummingbird-eval and
DINOv3 code; data.py holds what they share (the backbone at size, the label space, the feature
cache of the evaluation split), metrics.py the counts and matchings.
"""

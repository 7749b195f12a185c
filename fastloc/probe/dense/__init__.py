"""Dense-feature evaluations beside Patch-Seg, each protocol exact and named in its results.

    python -m fastloc.probe overcluster DATA    Leopart's overclustering (k-means, matched, mIoU)
    python -m fastloc.probe linear DATA         linear probes: leopart-voc, dinov3-ade20k
    python -m fastloc.probe hummingbird DATA    in-context retrieval (memory bank, k-NN transfer)

The recipes: ../shared/methods/OTHER-METHODS.md section 1 and the open-hummingbird-eval and
DINOv3 code; config.py holds their configs, data.py what they share (``open_run``: the checks,
the device, the splits, the label space, the backbone at size; the feature cache of the
evaluation split), metrics.py the counts and matchings; linear.py runs the two linear probes of
leopart_voc.py and dinov3_ade20k.py.
"""

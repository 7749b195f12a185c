"""Training-free zero-shot segmentation (the SCLIP / ClearCLIP / NACLIP harness, ZEROSHOT-SEG.md):
patch tokens read out against class-name embeddings of a paired text tower (fastloc.models.text).

readout.py: the last block's variants (plain CLIP, MaskCLIP's value path, NACLIP) and the tokens
in the text space; decide.py: the harness's rule from cosine logits to classes (scale, softmax
over every query, max over a class's synonyms, background threshold) and PAMR.
"""

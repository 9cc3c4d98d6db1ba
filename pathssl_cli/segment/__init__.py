"""HoVer-Net nuclei instance segmentation: targets, post-processing, metrics and scoring (see each module)."""

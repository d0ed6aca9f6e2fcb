"""capfilt: BLIP's CapFilt (caption, then filter by image-text matching) as a batch pipeline on Ray."""

import os

__version__ = "0.1.0"

# img2dataset imports albumentations, which asks PyPI for a newer version on import unless told not
# to. A data job must not make requests nobody asked for (and clusters are often offline).
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

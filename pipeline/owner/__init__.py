"""The data owner's own tool: `mtrack owner mark FOLDER --out FOLDER` marks a folder of images and
writes a private key; `mtrack owner audit --model M --user FOLDER` later tests a model for those
images.

It depends only on the numeric core and data access (no FFCV, plotting or stage code), so the
owner's commands start fast and work without a run directory.
"""
